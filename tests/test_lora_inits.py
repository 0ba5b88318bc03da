"""LoRA initializations beyond the default (PEFT's init_lora_weights names): orthogonal, MiCA (B
frozen), PiSSA and OLoRA (base-modifying). Each against PEFT's own init on the same base: the same
adapter (up to the random draw for orthogonal), the same residual base; restore gives the original
weights back, and a base-modifying adapter is saved as a plain LoRA of the original base."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig

from helpers_models import input_ids, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft(base, init, targets=TARGETS, **kw):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=init, **kw))


def _adapters(model):
    return {n.replace("base_model.model.", "").replace(".default", ""): p.detach()
            for n, p in model.named_parameters() if "lora_" in n or "base_layer.weight" in n}


@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_svd_inits_match_peft(init):
    base = tiny_llama()
    pm = _peft(base, init)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, init=init))
    theirs, ours = _adapters(pm), _adapters(mine)
    assert set(theirs) == set(ours)
    for n in theirs:
        if init == "mica" and "lora_B" in n:  # singular vectors are defined up to sign
            torch.testing.assert_close(ours[n].abs(), theirs[n].abs(), rtol=1e-4, atol=1e-5, msg=n)
        elif init == "pissa" and "lora_" in n:
            torch.testing.assert_close(ours[n].abs(), theirs[n].abs(), rtol=1e-4, atol=1e-5, msg=n)
        else:
            torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-5, msg=n)
    ids = input_ids()
    torch.testing.assert_close(mine(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=1e-4)
    frozen = [n for n, p in mine.named_parameters() if "lora_B" in n and not p.requires_grad]
    assert bool(frozen) == (init == "mica") and (init != "mica" or len(frozen) == 6)


def test_orthogonal_init_is_orthogonal_and_refuses_odd_ranks():
    mine = ptune_rt.apply(tiny_llama(), LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, init="orthogonal"))
    layer = mine.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert (b @ a).abs().max() > 0  # starts away from the base, as PEFT's
    with pytest.raises(ValueError, match="init='orthogonal' needs even ranks"):
        LoRAConfig(r=3, init="orthogonal")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_base_modifying_inits_restore_and_save_against_the_original(init, factory, tmp_path):
    from peft import PeftModel

    base = factory()
    targets = TARGETS if factory is tiny_llama else ["c_attn", "c_proj"]
    model = copy.deepcopy(base)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ptune_rt.apply(model, LoRAConfig(r=4, alpha=8.0, target_modules=targets, init=init))
    ids = input_ids()
    with torch.no_grad():  # the adapted model starts as the base (up to fp32 rounding)
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-4)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)  # "training"
    trained = model(input_ids=ids).logits.detach()
    ptune_rt.save_adapter(model, tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # plain LoRA on the original base
    torch.testing.assert_close(back(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
    ptune_rt.restore(model)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_mica_checkpoints_keep_b_frozen(tmp_path):
    base = tiny_llama()
    pm = _peft(base, "mica")
    pm.save_pretrained(tmp_path / "peft")
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    b = [p.requires_grad for n, p in loaded.named_parameters() if "lora_B" in n]
    a = [p.requires_grad for n, p in loaded.named_parameters() if "lora_A" in n]
    assert b and not any(b) and all(a)
    ptune_rt.accelerate(pm)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_B" in n)
    pm.set_adapter("default")
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_B" in n)
