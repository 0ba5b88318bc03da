"""PEFT's ``trainable_token_indices`` next to LoRA: chosen embedding rows train (and the tied output
layer's matching columns with them), without a table-sized copy; against PEFT on Llama (untied) and
GPT-2 (tied): logits, gradients, checkpoints both ways, accelerate, merge_and_unload, disable, restore."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig

from helpers_models import tiny_gpt2, tiny_llama

CASES = {"llama": (tiny_llama, ["q_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}
TOKENS = [1, 5, 7]
IDS = torch.tensor([[1, 2, 5, 7, 9, 1], [3, 7, 7, 0, 5, 8]])


def _pair(key, indices=TOKENS):
    from peft import LoraConfig, get_peft_model

    factory, targets = CASES[key]
    base = factory()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, trainable_token_indices=indices,
                                                        fan_in_fan_out=key == "gpt2"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n or "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, target_modules=targets,
                                                          trainable_token_indices=indices))
    src = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters()}
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if p.requires_grad:
                p.copy_(src[n])
    return base, pm, mine


def _run(model):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=IDS).logits
    logits.square().mean().backward()
    return logits.detach(), {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters()
                             if p.requires_grad}


@pytest.mark.parametrize("key", list(CASES))
def test_matches_peft(key):
    _, pm, mine = _pair(key)
    want, g_peft = _run(pm)
    got, g_mine = _run(mine)
    assert set(g_mine) == set(g_peft) and any("trainable_tokens_delta" in n for n in g_mine)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for n in g_peft:
        torch.testing.assert_close(g_mine[n], g_peft[n], rtol=1e-4, atol=1e-7, msg=n)


def test_no_table_sized_tensor_is_made():
    """The forward and backward allocate nothing of the embedding table's size (PEFT copies it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, _, mine = _pair("llama")
    table = mine.get_input_embeddings().weight.numel()

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() == table:
                    self.big.append(str(func))
            return out

    emb = mine.get_input_embeddings()
    with Sizes() as sizes:
        emb(IDS).square().sum().backward()
    assert sizes.big == [], sizes.big


@pytest.mark.parametrize("key", list(CASES))
def test_checkpoints_both_ways_and_accelerate(key, tmp_path):
    from peft import PeftModel

    base, pm, mine = _pair(key)
    want = pm(input_ids=IDS).logits.detach()
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
    torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
    assert any("trainable_tokens_delta" in n and p.requires_grad for n, p in loaded.named_parameters())
    ptune_rt.accelerate(pm)
    ptune_rt.save_adapter(pm, tmp_path / "accelerated")  # PEFT's own token wrapper is saved too
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "accelerated")
    torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", list(CASES))
def test_merge_and_unload_disable_restore(key):
    base, _, mine = _pair(key)
    want = mine(input_ids=IDS).logits.detach()
    with torch.no_grad():
        with ptune_rt.disable_adapter(mine):
            torch.testing.assert_close(mine(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=1e-6)
    plain = ptune_rt.merge_and_unload(copy.deepcopy(mine))
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    torch.testing.assert_close(plain(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
    ptune_rt.restore(mine)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in mine.named_parameters())


def test_bad_token_indices_are_refused_before_any_change():
    from helpers_models import assert_unchanged, snapshot

    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"token ids \[100000\] are outside 'model.embed_tokens'"):
        ptune_rt.apply(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[1, 100000]))
    with pytest.raises(ValueError, match="trainable_token_indices key 'nothing' must name one nn.Embedding"):
        ptune_rt.apply(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"nothing": [1]}))
    with pytest.raises(ValueError, match="both a LoRA target and holds trainable_token_indices"):
        ptune_rt.apply(model, LoRAConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="trainable_token_indices must be None, a non-empty list of distinct"):
        LoRAConfig(trainable_token_indices=[1, 1])


def test_checkpoint_loads_into_a_model_that_already_carries_the_tokens(tmp_path):
    """The load that copies into existing trainable-token modules (not a fresh apply) checks and fills
    their rows too."""
    base, _, mine = _pair("llama")
    want = mine(input_ids=IDS).logits.detach()
    ptune_rt.save_adapter(mine, tmp_path)
    target = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, target_modules=["q_proj"],
                                                            trainable_token_indices=TOKENS))
    ptune_rt.load_adapter(target, tmp_path)
    torch.testing.assert_close(target(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
