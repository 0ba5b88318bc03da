"""PEFT's per-module LoRA options through apply, accelerate and checkpoints both ways: rank_pattern /
alpha_pattern and layers_to_transform / layers_pattern, each matching PEFT on the same weights."""
import copy
import json

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.io.common import AdapterError

from helpers_models import MODELS, input_ids, randomize_lora_b, strip_peft_prefix

OPTIONS = {
    "patterns": dict(rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 5}),
    "layers": dict(layers_to_transform=[1], layers_pattern="layers"),
    "both": dict(rank_pattern={"down_proj": 3}, layers_to_transform=0),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _shapes(model):
    return {strip_peft_prefix(n).replace(".default", ""): tuple(p.shape)
            for n, p in model.named_parameters() if "lora_" in n}


def _pair(options):
    from peft import LoraConfig, get_peft_model

    base = MODELS["llama"][0]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options))
    randomize_lora_b(pm)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, **options))
    src = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if "lora_" in n:
                p.copy_(src["base_model.model." + n])
    return base, pm, mine


@pytest.mark.parametrize("case", list(OPTIONS))
def test_apply_matches_peft(case):
    _, pm, mine = _pair(OPTIONS[case])
    assert _shapes(mine) == _shapes(pm) and _shapes(mine)
    ids = input_ids()
    torch.testing.assert_close(mine(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(OPTIONS))
def test_checkpoints_both_ways(case, tmp_path):
    from peft import PeftModel

    base, pm, mine = _pair(OPTIONS[case])
    ids = input_ids()
    want = pm(input_ids=ids).logits.detach()
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
    assert _shapes(back) == _shapes(pm)
    torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert _shapes(loaded) == _shapes(pm)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_accelerate_then_save_writes_per_module_ranks(tmp_path):
    """A PEFT model with a rank_pattern runs accelerated; its adapter saved from there loads in PEFT."""
    from peft import PeftModel

    base, pm, _ = _pair(OPTIONS["patterns"])
    ids = input_ids()
    want = pm(input_ids=ids).logits.detach()
    ptune_rt.accelerate(pm)
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    ptune_rt.save_adapter(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["rank_pattern"]) == 3  # two v_proj at rank 2, layer 1's q_proj at 6
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_bad_options_are_refused_by_name():
    model = MODELS["llama"][0]()
    for kw, match in ((dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be an integer >= 1"),
                      (dict(alpha_pattern={"(": 2}), "alpha_pattern key"),
                      (dict(rank_pattern=["q_proj"]), "rank_pattern must be None or a dict"),
                      (dict(layers_to_transform="0"), "layers_to_transform must be None, a layer index"),
                      (dict(layers_pattern="layers"), "layers_pattern='layers' needs layers_to_transform")):
        with pytest.raises(ValueError, match=match):
            LoRAConfig(target_modules=TARGETS, **kw)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*keeps none of the"):
        ptune_rt.apply(model, LoRAConfig(target_modules=TARGETS, layers_to_transform=[7]))
    with pytest.raises(ValueError, match=r"rank_pattern entry=99 must be at most"):
        ptune_rt.apply(model, LoRAConfig(target_modules=TARGETS, rank_pattern={"v_proj": 99}))
    assert not any(isinstance(m, ptune_rt.LoRALinear) for m in model.modules())


def test_checkpoint_rank_mismatch_names_the_module(tmp_path):
    base, pm, _ = _pair(OPTIONS["patterns"])
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"v_proj.lora_A.weight.*\(r=3"):
        ptune_rt.load_adapter(copy.deepcopy(base), tmp_path)
