"""PEFT's ``lora_bias`` (a trainable bias on lora_B, added times the scale): apply, accelerate,
checkpoints both ways, merge / unmerge, against PEFT on the same weights."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig

from helpers_models import MODELS, input_ids, main_output, strip_peft_prefix


def _pair(key):
    from peft import LoraConfig, get_peft_model

    factory, targets = MODELS[key]
    base = factory()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True,
                                                        fan_in_fan_out=key == "gpt2"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, lora_bias=True))
    src = {strip_peft_prefix(n): p for n, p in pm.named_parameters()}
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if "lora_" in n:
                p.copy_(src[n])
    return base, pm, mine


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = main_output(model(input_ids=ids))
    out.square().mean().backward()
    return out.detach(), {strip_peft_prefix(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("key", ["llama", "gpt2", "bert"])
def test_apply_and_accelerate_match_peft(key):
    base, pm, mine = _pair(key)
    ids = input_ids()
    want, g_peft = _grads(pm, ids)
    got, g_mine = _grads(mine, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert set(g_mine) == set(g_peft) and any(n.endswith("lora_B.default.bias") for n in g_mine)
    for n in g_peft:
        torch.testing.assert_close(g_mine[n], g_peft[n], rtol=1e-4, atol=1e-6, msg=n)
    ptune_rt.accelerate(pm)
    got, g_acc = _grads(pm, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for n in g_peft:
        torch.testing.assert_close(g_acc[n], g_peft[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_checkpoints_both_ways_and_merge(key, tmp_path):
    from peft import PeftModel

    base, pm, mine = _pair(key)
    ids = input_ids()
    want = main_output(pm(input_ids=ids)).detach()
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
    torch.testing.assert_close(main_output(back(input_ids=ids)), want, rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(main_output(loaded(input_ids=ids)), want, rtol=0, atol=1e-5)
    if key == "bert":  # Llama's linears have no bias to fold a lora_bias into
        state = {k: v.clone() for k, v in mine.state_dict().items()}
        ptune_rt.merge(mine)
        torch.testing.assert_close(main_output(mine(input_ids=ids)), want, rtol=0, atol=1e-5)
        ptune_rt.unmerge(mine)
        assert all(torch.equal(v, state[k]) for k, v in mine.state_dict().items())
    else:
        with pytest.raises(ValueError, match="has a lora_bias, and the base layer has no bias"):
            ptune_rt.merge(mine)
