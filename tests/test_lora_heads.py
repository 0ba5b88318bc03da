"""LoRAConfig.modules_to_save: a classifier's head trains whole next to the adapters (PEFT's default for
sequence / token classification and QA), is saved with them, and loads back, by ptune-rt and by PEFT."""
import copy

import peft
import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import assert_unchanged, input_ids, snapshot, tiny_llama
from test_io import tiny_llama_cls



def train(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    x, y = input_ids(), torch.tensor([0, 2])
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()


def scores(model):
    with torch.no_grad():
        return model(input_ids=input_ids(seed=7)).logits


def test_the_task_head_trains_by_default_and_round_trips(tmp_path):
    base = tiny_llama_cls()
    model = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.weight"} <= trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    head_before = model.score.weight.detach().clone()
    train(model)
    assert not torch.equal(model.score.weight, head_before), "the head did not train"
    trained = scores(model)

    ptune_rt.save_adapter(model, tmp_path / "peft")
    fresh = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_fp32_end_to_end_close(scores(fresh), trained, "ptune-rt load of the saved adapter and head")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        got = pm(input_ids=input_ids(seed=7)).logits
    assert_fp32_end_to_end_close(got, trained, "PEFT load of the saved adapter and head")

    ptune_rt.save_adapter(model, tmp_path / "own", format="ptune")
    fresh = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "own")
    assert_fp32_end_to_end_close(scores(fresh), trained, "own format")

    ptune_rt.restore(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in base.named_parameters()}


def test_empty_list_trains_the_adapters_alone_and_a_named_module_trains_whole():
    model = ptune_rt.apply(tiny_llama_cls(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=[]))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model = ptune_rt.apply(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"],
                                                    modules_to_save=["model.norm"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {"model.norm.weight"}


def test_heads_and_targets_do_not_overlap():
    model = ptune_rt.apply(tiny_llama_cls(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert type(model.score).__name__ == "Linear"  # the head trains whole, it is no LoRA target
    assert "model.layers.0.self_attn.q_proj" in {r["module"] for r in ptune_rt.report(model)}
    base = tiny_llama_cls()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"LoRAConfig.target_modules selects \['score'\], inside the modules trained"):
        ptune_rt.apply(base, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "score"]))
    assert_unchanged(base, snap)
    with pytest.raises(ValueError, match="modules_to_save entry 'nothing' matches no module"):
        ptune_rt.apply(base, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["nothing"]))
    assert_unchanged(base, snap)
    with pytest.raises(ValueError, match="LoRAConfig.modules_to_save must be None or a list"):
        LoRAConfig(modules_to_save="score")
