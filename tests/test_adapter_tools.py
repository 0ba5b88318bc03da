"""PEFT's everyday helpers over every registered method: merge_and_unload (the plain model, loadable
by the stock class), disable_adapter (the base model inside the block, everything back after it),
trainable_parameters / print_trainable_parameters."""
import pytest
import torch
from transformers import LlamaForCausalLM

import ptune_rt
from ptune_rt import registry
from ptune_rt.methods.lora import LoRALinear
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import assert_unchanged, peft_lora_model, snapshot, tiny_llama
from test_registry import ids, logits, tiny_llama_with_biases, train_steps

MERGEABLE = [m for m in registry.methods() if m.merge_and_unload is not None]


def lora_config():
    return ptune_rt.LoRAConfig(r=4, alpha=8, target_modules="all-linear")


def test_merge_and_unload_gives_the_plain_model_with_merged_weights(tmp_path):
    model = tiny_llama_with_biases()
    plain_mlp = type(model.model.layers[0].mlp)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptune_rt.apply(model, lora_config())
    train_steps(model)
    assert type(model.model.layers[0].mlp) is not plain_mlp  # the SwiGLU recompute swapped its class
    adapted = logits(model)

    assert ptune_rt.merge_and_unload(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].mlp) is plain_mlp
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not registry.applied_methods(model) and not ptune_rt.report(model)
    assert not any(k.startswith("_ptune_rt") for k in model.__dict__) and "save_pretrained" not in model.__dict__
    merged = logits(model)
    assert_fp32_end_to_end_close(merged, adapted, "merged vs adapter logits")

    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    want = model.state_dict()
    got = reloaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # (the stock class loads with its default attention implementation, not the test model's eager one)
    assert_fp32_end_to_end_close(logits(reloaded), merged, "from_pretrained of the merged export")


@pytest.mark.parametrize("method", MERGEABLE, ids=lambda m: m.name)
def test_merge_and_unload_keeps_every_mergeable_method_s_training(method):
    model = tiny_llama_with_biases()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptune_rt.apply(model, method.example())
    train_steps(model)
    adapted = logits(model)
    ptune_rt.merge_and_unload(model)
    assert not method.is_applied(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert_fp32_end_to_end_close(logits(model), adapted, f"{method.name}: merged vs adapted logits")


def test_merge_and_unload_of_lora_and_bitfit_together():
    model = tiny_llama_with_biases()
    ptune_rt.apply(model, lora_config())
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    train_steps(model)
    adapted = logits(model)
    ptune_rt.merge_and_unload(model)
    assert not registry.applied_methods(model)
    assert_fp32_end_to_end_close(logits(model), adapted, "LoRA + BitFit merged")


def test_merge_and_unload_refuses_what_cannot_merge_before_any_change():
    model = tiny_llama_with_biases()
    ptune_rt.apply(model, lora_config())
    ptune_rt.apply(model, ptune_rt.PrefixConfig(num_virtual_tokens=3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"\['prefix'\], which cannot be merged"):
        ptune_rt.merge_and_unload(model)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="carries no ptune-rt method"):
        ptune_rt.merge_and_unload(tiny_llama())


def test_peft_merge_and_unload_after_accelerate():
    """PEFT's own merge_and_unload on an accelerated model: the MLPs whose class ptune-rt swapped run
    their plain forward once PEFT has put the base layers back."""
    base = tiny_llama()
    x = ids()
    peft_model = peft_lora_model(base, ["q_proj", "v_proj", "down_proj", "up_proj", "gate_proj"], r=4, alpha=8)
    with torch.no_grad():  # (peft_lora_model draws random B: the adapters change the logits)
        want = peft_model(input_ids=x).logits
    ptune_rt.accelerate(peft_model)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        got = merged(input_ids=x).logits
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert_fp32_end_to_end_close(got, want, "PEFT merge_and_unload after accelerate")
    with pytest.raises(ValueError, match="PEFT's own"):
        peft_model = peft_lora_model(tiny_llama(), ["q_proj"], r=4, alpha=8)
        ptune_rt.accelerate(peft_model)
        ptune_rt.merge_and_unload(peft_model)


@pytest.mark.parametrize("method", registry.methods(), ids=lambda m: m.name)
def test_disable_adapter_runs_the_base_model(method):
    model = tiny_llama_with_biases()
    base = logits(model)
    ptune_rt.apply(model, method.example())
    train_steps(model)
    adapted = logits(model)
    assert adapted.shape != base.shape or not torch.allclose(adapted, base)  # a soft prompt adds positions
    with ptune_rt.disable_adapter(model) as m:
        assert m is model
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)


def test_disable_adapter_restores_on_error_and_refuses_merged_lora():
    model = tiny_llama_with_biases()
    ptune_rt.apply(model, lora_config())
    train_steps(model)
    adapted = logits(model)
    with pytest.raises(RuntimeError, match="inside the block"):
        with ptune_rt.disable_adapter(model):
            raise RuntimeError("inside the block")
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    ptune_rt.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with ptune_rt.disable_adapter(model):
            pass
    with pytest.raises(ValueError, match="carries no ptune-rt method"):
        with ptune_rt.disable_adapter(tiny_llama()):
            pass


def test_trainable_parameters(capsys):
    model = tiny_llama_with_biases()
    total = sum(p.numel() for p in model.parameters())
    assert ptune_rt.trainable_parameters(model) == (total, total)
    ptune_rt.apply(model, ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * 4 * (64 + 64)  # two layers, A [4, 64] and B [64, 4]
    assert ptune_rt.trainable_parameters(model) == (lora, total + lora)
    ptune_rt.print_trainable_parameters(model)
    share = 100 * lora / (total + lora)
    assert capsys.readouterr().out == (f"trainable params: {lora:,d} || all params: {total + lora:,d} || "
                                       f"trainable%: {share:.4f}\n")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ptune_rt.trainable_parameters("model")


@pytest.mark.parametrize("combination_type, rank_b", [("linear", 4), ("cat", 2), ("svd", 2)])
def test_add_weighted_adapter_matches_peft(combination_type, rank_b, tmp_path):
    import copy

    import peft

    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=rank_b, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    model = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "a")  # "a" is its adapter "default"
    ptune_rt.load_adapter(model, tmp_path / "b", adapter_name="b")

    weights = [0.7, -0.4]
    pm.add_weighted_adapter(["a", "b"], weights, "c", combination_type=combination_type)
    pm.set_adapter("c")
    ptune_rt.add_weighted_adapter(model, ["default", "b"], weights, "c", combination_type=combination_type)
    ptune_rt.set_adapter(model, "c")
    x = ids()
    with torch.no_grad():
        want, got = pm(input_ids=x).logits, model(input_ids=x).logits
    assert_fp32_end_to_end_close(got, want, f"add_weighted_adapter {combination_type} vs PEFT")
    q = model.model.layers[0].self_attn.q_proj
    assert q.r["c"] == {"linear": 4, "cat": 6, "svd": 4}[combination_type] and q.scaling["c"] == 1.0


def test_add_weighted_adapter_refuses_bad_input_before_any_change():
    model = ptune_rt.apply(tiny_llama(), ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    snap = snapshot(model)
    for kwargs, err, match in [
            (dict(adapters=["nope"], weights=[1.0], adapter_name="c"), ValueError, "'nope' is not an adapter"),
            (dict(adapters=["default"], weights=[1.0, 2.0], adapter_name="c"), ValueError, "weights must be 1"),
            (dict(adapters=["default"], weights=[float("nan")], adapter_name="c"), ValueError, "finite"),
            (dict(adapters="default", weights=[1.0], adapter_name="c"), TypeError, "list of adapter names"),
            (dict(adapters=["default"], weights=[1.0], adapter_name="default"), ValueError, "new adapter name"),
            (dict(adapters=["default"], weights=[1.0], adapter_name="c", combination_type="ties"), ValueError,
             "combination_type must be one of"),
            (dict(adapters=["default"], weights=[1.0], adapter_name="c", svd_rank=1000), ValueError,
             "svd_rank=1000 exceeds")]:
        with pytest.raises(err, match=match):
            ptune_rt.add_weighted_adapter(model, **kwargs)
        assert_unchanged(model, snap)
