"""DoRA end to end against HF PEFT's ``use_dora=True`` on tiny random Llama, GPT-2 (Conv1D) and BERT:
``apply(LoRAConfig(use_dora=True))`` and ``accelerate`` of a PEFT DoRA model (logits, gradients of
A, B and the magnitude, 20-step losses, by the tolerance rule with PEFT in float64 as gold),
checkpoints both ways, merge / unmerge, PEFT's merge_and_unload after accelerate, the refusals."""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.io.common import AdapterError
from ptune_rt.testing.tolerances import assert_close_to_reference

from helpers_models import MODELS, input_ids, main_output, peft_lora_model, strip_peft_prefix

KEYS = ["llama", "gpt2", "bert"]
STEPS, LR = 20, 3e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _peft_dora(key, seed=0):
    factory, targets = MODELS[key]
    base = factory(seed=seed)
    pm = peft_lora_model(copy.deepcopy(base), targets, r=4, alpha=8.0, seed=seed, use_dora=True)
    with torch.no_grad():  # magnitudes away from the norms, so m / norm is not 1
        g = torch.Generator().manual_seed(seed + 5)
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
    return base, targets, pm


def _copy_into(pm, mine):
    """PEFT's adapter tensors (A, B, magnitude) into ``mine``, by name."""
    src = {strip_peft_prefix(n).replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    with torch.no_grad():
        n_copied = 0
        for n, p in mine.named_parameters():
            if "lora_" in n:
                p.copy_(src[n.replace(".default", "")])
                n_copied += 1
    assert n_copied == len(src)


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = main_output(model(input_ids=ids))
    (out.float() ** 2).mean().backward()
    grads = {strip_peft_prefix(n).replace(".default", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _check(key, pm, mine):
    ids = input_ids()
    g_out, g_grads = _run(copy.deepcopy(pm).double(), ids)
    r_out, r_grads = _run(pm, ids)
    o_out, o_grads = _run(mine, ids)
    assert_close_to_reference(o_out, r_out, g_out, torch.float32, f"{key} output")
    assert set(o_grads) == set(r_grads) and any("lora_magnitude_vector" in n for n in o_grads)
    for n in r_grads:
        assert_close_to_reference(o_grads[n], r_grads[n], g_grads[n], torch.float32, f"{key} grad {n}")


@pytest.mark.parametrize("key", KEYS)
def test_apply_matches_peft_dora(key):
    base, targets, pm = _peft_dora(key)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    _copy_into(pm, mine)
    _check(key, pm, mine)


@pytest.mark.parametrize("key", KEYS)
def test_accelerate_matches_peft_dora_and_restores(key):
    _, _, pm = _peft_dora(key)
    gold = copy.deepcopy(pm)
    params = dict(pm.named_parameters())
    ptune_rt.accelerate(pm)
    assert all(p is params[n] for n, p in pm.named_parameters()), "accelerate must keep PEFT's Parameters"
    _check(key, gold, pm)
    ptune_rt.restore(pm)
    ids = input_ids()
    assert torch.equal(main_output(pm(input_ids=ids)), main_output(gold(input_ids=ids)))


def test_training_losses_match_peft_dora():
    """20 AdamW steps, ptune-rt apply vs PEFT, fp32, against PEFT in float64."""
    base, targets, pm = _peft_dora("llama")
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    _copy_into(pm, mine)
    gold = copy.deepcopy(pm).double()
    ids = input_ids()
    losses = {}
    for tag, model in (("gold", gold), ("peft", pm), ("mine", mine)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        out = []
        for _ in range(STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
        losses[tag] = torch.stack(out)
    assert losses["gold"][-1] < losses["gold"][0] - 0.05  # it trains
    assert_close_to_reference(losses["mine"], losses["peft"], losses["gold"], torch.float32, "20-step losses")


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_checkpoints_both_ways(key, tmp_path):
    from peft import PeftModel

    base, targets, pm = _peft_dora(key)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    _copy_into(pm, mine)
    ids = input_ids()
    want = main_output(pm(input_ids=ids))
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
    assert back.peft_config["default"].use_dora
    torch.testing.assert_close(main_output(back(input_ids=ids)), want, rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(main_output(loaded(input_ids=ids)), want, rtol=0, atol=1e-5)
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in loaded.named_parameters())


def test_plain_checkpoint_into_dora_model_is_refused(tmp_path):
    base, targets, _ = _peft_dora("llama")
    plain = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets))
    ptune_rt.save_adapter(plain, tmp_path)
    dora = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    with pytest.raises(AdapterError, match="use_dora=True, the checkpoint use_dora=False"):
        ptune_rt.load_adapter(dora, tmp_path)


def test_merge_unmerge_and_merge_and_unload():
    base, targets, pm = _peft_dora("gpt2")
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    _copy_into(pm, mine)
    ids = input_ids()
    want = main_output(mine(input_ids=ids)).detach()
    weights = {n: p.detach().clone() for n, p in mine.named_parameters() if "base_layer.weight" in n}
    ptune_rt.merge(mine)
    torch.testing.assert_close(main_output(mine(input_ids=ids)), want, rtol=0, atol=1e-5)
    ptune_rt.unmerge(mine)
    assert all(torch.equal(p, weights[n]) for n, p in mine.named_parameters() if n in weights)
    plain = ptune_rt.merge_and_unload(copy.deepcopy(mine))
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(main_output(plain(input_ids=ids)), want, rtol=0, atol=1e-5)


def test_peft_merge_and_unload_after_accelerate():
    _, _, pm = _peft_dora("llama")
    ptune_rt.accelerate(pm)
    ids = input_ids()
    want = main_output(pm(input_ids=ids)).detach()
    plain = pm.merge_and_unload()
    torch.testing.assert_close(main_output(plain(input_ids=ids)), want, rtol=0, atol=1e-5)


def test_mixed_batches_and_weighted_combination_refuse_dora(tmp_path):
    base, targets, _ = _peft_dora("llama")
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapters: add_weighted_adapter combines plain LoRA"):
        ptune_rt.add_weighted_adapter(mine, ["default"], [1.0], "combo")
    with torch.no_grad(), pytest.raises(ValueError, match="are DoRA adapters or have a lora_bias: a mixed-adapter batch"):
        with ptune_rt.mixed_adapters(mine, ["default", None]):
            mine(input_ids=input_ids())


def test_eval_reuses_the_norm_and_training_recomputes_it():
    """The norm cache is keyed on W, A and B: an optimizer step invalidates it, eval steps reuse it."""
    base, targets, _ = _peft_dora("llama")
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, use_dora=True))
    layer = next(m for m in mine.modules() if isinstance(m, ptune_rt.LoRALinear))
    ids = input_ids()
    with torch.no_grad():
        mine(input_ids=ids)
        first = layer._dora_norm("default")
        mine(input_ids=ids)
        assert layer._dora_norm("default") is first
        layer.lora_B["default"].weight.add_(0.5)
        again = layer._dora_norm("default")
    assert again is not first and not torch.equal(again, first)
