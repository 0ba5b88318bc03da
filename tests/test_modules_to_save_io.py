"""Whole modules trained next to a method (``modules_to_save``) go into its checkpoints and come back
trainable with their trained values, in both formats and for every method that has the option, as
PEFT's ``modules_to_save`` do (PEFT itself reads the PEFT-format ones)."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt.methods.ia3 import IA3Config

from helpers_models import tiny_llama

CONFIGS = {
    "lora": lambda: ptune_rt.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]),
    "prefix": lambda: ptune_rt.PrefixConfig(3, modules_to_save=["norm"]),
    "prompt_tuning": lambda: ptune_rt.PromptTuningConfig(3, modules_to_save=["norm"]),
    "ia3": lambda: IA3Config(modules_to_save=["norm"]),
}


@pytest.mark.parametrize("fmt", ["peft", "ptune"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_trained_module_round_trips_trainable(method, fmt, tmp_path):
    base = tiny_llama()
    model = ptune_rt.apply(copy.deepcopy(base), CONFIGS[method]())
    assert model.model.norm.weight.requires_grad
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    ptune_rt.save_adapter(model, tmp_path, format=fmt)
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.model.norm.weight.requires_grad
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    if fmt == "peft":
        from peft import PeftModel

        prompt_learning = method in ("prefix", "prompt_tuning")  # PEFT loads these for inference only
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=not prompt_learning)
        wrapped = pm.base_model.model.norm if prompt_learning else pm.base_model.model.model.norm
        trained = dict(wrapped.named_parameters())["modules_to_save.default.weight"]
        assert torch.equal(trained, model.model.norm.weight) and trained.requires_grad != prompt_learning
