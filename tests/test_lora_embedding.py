"""LoRA on an nn.Embedding (``LoRAEmbedding``) against PEFT's LoRA ``Embedding``: apply, accelerate (the
same Parameters under PEFT's names), checkpoints both ways, merge / unmerge, restore; Llama, GPT-2, BERT."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.methods.lora.embedding import LoRAEmbedding

from helpers_models import input_ids, main_output, tiny_bert, tiny_gpt2, tiny_llama

CASES = {"llama": (tiny_llama, ["embed_tokens", "q_proj"]), "gpt2": (tiny_gpt2, ["wte", "c_attn"]),
         "bert": (tiny_bert, ["word_embeddings", "query"])}


def _pair(key, backend="auto"):
    from peft import LoraConfig, get_peft_model

    factory, targets = CASES[key]
    base = factory()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                        fan_in_fan_out=key == "gpt2"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # A of an embedding and B of a linear start at zero: make both matter
        for n, p in pm.named_parameters():
            if "lora_embedding_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, backend=backend))
    src = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    mine.load_state_dict({k: src[k] for k in mine.state_dict() if "lora_" in k}, strict=False)
    return base, pm, mine


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = main_output(model(input_ids=ids))
    out.square().mean().backward()
    return out.detach(), {k.removeprefix("base_model.model."): p.grad for k, p in model.named_parameters()
                          if p.requires_grad}


@pytest.mark.parametrize("key", list(CASES))
def test_apply_matches_peft_with_peft_names(key):
    _, pm, mine = _pair(key)
    assert any(isinstance(m, LoRAEmbedding) for m in mine.modules())
    names = {k.removeprefix("base_model.model.") for k, p in pm.named_parameters() if p.requires_grad}
    assert {k for k, p in mine.named_parameters() if p.requires_grad} == names
    ids = input_ids()
    want, g_peft = _run(pm, ids)
    got, g_mine = _run(mine, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for n in g_peft:
        torch.testing.assert_close(g_mine[n], g_peft[n], rtol=1e-4, atol=1e-6, msg=n)


def test_triton_backend_under_the_interpreter():
    _, pm, mine = _pair("llama", backend="triton")
    ids = input_ids()
    want, g_peft = _run(pm, ids)
    got, g_mine = _run(mine, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    for n in g_peft:
        torch.testing.assert_close(g_mine[n], g_peft[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_accelerate_keeps_peft_parameters_and_save(key, tmp_path):
    from peft import PeftModel

    base, pm, _ = _pair(key)
    ids = input_ids()
    want = main_output(pm(input_ids=ids)).detach()
    params = dict(pm.named_parameters())
    ptune_rt.accelerate(pm)
    assert dict(pm.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in pm.named_parameters())
    torch.testing.assert_close(main_output(pm(input_ids=ids)), want, rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")  # PEFT's own save of the accelerated model
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(main_output(back(input_ids=ids)), want, rtol=0, atol=1e-5)
    ptune_rt.restore(pm)
    assert type(pm.get_input_embeddings()).__name__ == "Embedding"


@pytest.mark.parametrize("fmt", ["peft", "ptune"])
def test_checkpoints_both_ways(fmt, tmp_path):
    from peft import PeftModel

    base, pm, mine = _pair("llama")
    ids = input_ids()
    want = main_output(pm(input_ids=ids)).detach()
    ptune_rt.save_adapter(mine, tmp_path / "mine", format=fmt)
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "mine")
    torch.testing.assert_close(main_output(loaded(input_ids=ids)), want, rtol=0, atol=1e-5)
    if fmt == "peft":
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
        torch.testing.assert_close(main_output(back(input_ids=ids)), want, rtol=0, atol=1e-5)
        pm.save_pretrained(tmp_path / "from_peft")  # PEFT also writes the adapted table (save_embedding_layers)
        loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "from_peft")
        torch.testing.assert_close(main_output(loaded(input_ids=ids)), want, rtol=0, atol=1e-5)


def test_merge_unmerge_restore_exact():
    base, _, mine = _pair("llama")
    ids = input_ids()
    want = main_output(mine(input_ids=ids)).detach()
    table = mine.model.embed_tokens.base_layer.weight.detach().clone()
    ptune_rt.merge(mine)
    torch.testing.assert_close(main_output(mine(input_ids=ids)), want, rtol=0, atol=1e-5)
    ptune_rt.unmerge(mine)
    assert torch.equal(mine.model.embed_tokens.base_layer.weight, table)
    ptune_rt.restore(mine)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in mine.named_parameters())


def test_embedding_refuses_what_peft_does_not_offer():
    with pytest.raises(ValueError, match="LoRA on an embedding takes neither use_dora nor lora_bias"):
        ptune_rt.apply(tiny_llama(), LoRAConfig(target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(ValueError, match="init='pissa' is not supported for LoRA on an embedding"):
        ptune_rt.apply(tiny_llama(), LoRAConfig(target_modules=["embed_tokens"], init="pissa"))


def test_a_failed_apply_leaves_base_weights_as_they_were():
    """PiSSA changes each target's base weight as its module is built; a later target that refuses
    the config (an embedding) must not leave the earlier ones changed."""
    from helpers_models import assert_unchanged, snapshot

    class LinearThenEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.emb = torch.nn.Embedding(32, 16)

    model = LinearThenEmbedding()
    weight = model.proj.weight.detach().clone()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="init='pissa' is not supported for LoRA on an embedding"):
        ptune_rt.apply(model, LoRAConfig(r=2, target_modules=["proj", "emb"], init="pissa"))
    assert_unchanged(model, snap)
    assert torch.equal(model.proj.weight, weight)
