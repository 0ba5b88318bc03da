"""The module-swap layer: apply / report / merge / unmerge / restore / accelerate, bad inputs
(a failed call leaves the model exactly as it was), dtype / device errors, torch.compile."""
import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt import state as model_state
from ptune_rt.methods.lora import inject
from ptune_rt.methods.lora.inject import lora_modules
from ptune_rt.testing.tolerances import assert_close_to_reference, assert_fp32_end_to_end_close

from helpers_models import (MODELS, copy_peft_lora_weights, input_ids, peft_lora_model, tiny_bert, tiny_gpt2,
                            tiny_llama, tiny_qwen2)

LLAMA_T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP wake-ups that dominate (and vary with machine
    load) at these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def snapshot(model):
    return {
        "modules": dict(model.named_modules()),
        "params": dict(model.named_parameters()),
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "attrs": model_state.applied(model),
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model, snap):
    mods = dict(model.named_modules())
    assert list(mods) == list(snap["modules"]), "module names changed"
    for n, m in mods.items():
        assert m is snap["modules"][n], f"module {n!r} was replaced"
        assert m.training == snap["training"][n], f"module {n!r} changed train/eval mode"
    params = dict(model.named_parameters())
    assert list(params) == list(snap["params"])
    for n, p in params.items():
        assert p is snap["params"][n], f"parameter {n!r} was replaced"
        assert p.requires_grad == snap["grad"][n], f"requires_grad of {n!r} changed"
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in state.items():
        assert v.dtype == snap["state"][k].dtype and torch.equal(v, snap["state"][k]), f"{k} changed"
    now = model_state.applied(model)
    assert list(now) == list(snap["attrs"])
    for k, v in snap["attrs"].items():
        assert now[k] is v


def fails_cleanly(model, fn, exc, *words):
    """``fn()`` raises ``exc`` whose message contains every word, and ``model`` is untouched."""
    snap = snapshot(model)
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message: {msg}"
    assert_unchanged(model, snap)
    return msg


def cfg(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    kw.setdefault("backend", "torch")
    return LoRAConfig(**kw)


def randomize_b(model, std=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------
# apply / report / restore
# ----------------------------------------------------------------------------------------


def test_apply_swaps_freezes_and_reports():
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    out = ptune_rt.apply(model, cfg(target_modules=["q_proj", "v_proj"]))
    assert out is model
    mods = lora_modules(model)
    assert set(mods) == set(originals) and len(mods) == 4
    for n, m in mods.items():
        assert m.base_layer is originals[n] and m.training == originals[n].training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 8
    assert inject.model_config(model).r == 4
    rows = ptune_rt.report(model)
    assert [r["module"] for r in rows] == list(mods)
    for r in rows:
        assert r["backend"] == "torch" and "backend='torch'" in r["why"] and r["source"] == "apply"
        assert r["r"] == 4 and r["scaling"] == 2.0 and not r["merged"] and r["dtype"] == "float32"
    text = ptune_rt.format_report(rows)
    assert all(r["module"] in text for r in rows) and "4 LoRA modules: torch 4" in text
    assert ptune_rt.format_report([]) == "no ptune-rt modules"


def test_report_auto_and_triton_reasons():
    model = ptune_rt.apply(tiny_gpt2(), cfg(target_modules=["c_attn"], backend="auto"))
    rows = ptune_rt.report(model)
    assert {r["backend"] for r in rows} == {"torch"} and all("cpu tensors" in r["why"] for r in rows)
    model = ptune_rt.apply(tiny_gpt2(), cfg(target_modules=["c_attn"], backend="triton"))
    rows = ptune_rt.report(model)
    assert {r["backend"] for r in rows} == {"triton"} and all("TRITON_INTERPRET=1" in r["why"] for r in rows)
    assert rows[0]["in_features"] == 64 and rows[0]["out_features"] == 192  # Conv1D [in, out] layout


LORA_ROW_KEYS = {"module", "method", "source", "adapter", "in_features", "out_features", "r", "scaling", "dropout",
                 "dtype", "device", "backend", "why", "merged", "recompute_input", "input_group"}


def test_report_rows_for_prefix_layers():
    from ptune_rt import PrefixConfig

    model = ptune_rt.apply(tiny_llama(), PrefixConfig(4, backend="torch"))
    ptune_rt.apply(model, cfg(target_modules=["q_proj"]))
    rows = ptune_rt.report(model)
    assert [r["method"] for r in rows] == ["lora", "lora", "prefix", "prefix"]
    assert all(set(r) == LORA_ROW_KEYS for r in rows[:2])  # LoRA rows keep their keys
    for i, r in enumerate(rows[2:]):
        assert r["module"] == f"model.layers.{i}.self_attn" and r["layer"] == i and r["num_virtual_tokens"] == 4
        assert (r["kv_heads"], r["head_dim"], r["prefix_projection"], r["source"]) == (2, 16, False, "apply")
        assert r["backend"] == "torch" and r["why"] == "backend='torch' requested" and r["merged"] is False
    text = ptune_rt.format_report(rows)
    assert text.splitlines()[-2:] == ["2 LoRA modules: torch 2", "2 prefix layers (P=4): torch 2"]
    line = next(x for x in text.splitlines() if x.startswith("model.layers.1.self_attn "))
    assert line.split()[:8] == ["model.layers.1.self_attn", "prefix", "2x16", "kv", "P=4", "float32", "torch", "-"]

    # a prefix alone: no LoRA in the summary; the backend decision is resolve_backend's for the layer's device
    model = ptune_rt.apply(tiny_gpt2(), PrefixConfig(3, backend="triton"))
    rows = ptune_rt.report(model)
    assert [r["module"] for r in rows] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(r["backend"] == "triton" and "TRITON_INTERPRET=1" in r["why"] for r in rows)
    text = ptune_rt.format_report(rows)
    assert "LoRA" not in text and text.splitlines()[-1] == "2 prefix layers (P=3): triton 2"
    model = ptune_rt.apply(tiny_gpt2(), PrefixConfig(3, backend="auto", num_tasks=2))
    rows = ptune_rt.report(model)
    assert all(r["backend"] == "torch" and "cpu tensors" in r["why"] and r["num_tasks"] == 2 for r in rows)
    assert ptune_rt.format_report(rows).splitlines()[-1] == "2 prefix layers (P=3, 2 tasks): torch 2"

    # attention dropout while training runs an unfused torch SDPA instead of the fused op
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2().config
    config.attn_pdrop = 0.25
    model = ptune_rt.apply(GPT2LMHeadModel(config).train(), PrefixConfig(2, backend="triton"))
    rows = ptune_rt.report(model)
    assert all(r["backend"] == "torch" and "attention dropout p=0.25" in r["why"] for r in rows)
    assert all(r["backend"] == "triton" for r in ptune_rt.report(model.eval()))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_report_rows_for_an_accelerated_peft_prefix_model():
    from peft import PrefixTuningConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    ptune_rt.accelerate(pm)
    rows = ptune_rt.report(pm)
    assert [(r["module"], r["layer"], r["source"]) for r in rows] == [
        ("base_model.model.layers.0.self_attn", 0, "peft"), ("base_model.model.layers.1.self_attn", 1, "peft")]
    assert ptune_rt.format_report(rows).splitlines()[-1] == "2 prefix layers (P=5): torch 2"


def test_report_rows_for_soft_prompts():
    from ptune_rt import PromptTuningConfig, PTuningConfig

    model = ptune_rt.apply(tiny_gpt2(), PTuningConfig(4, encoder="lstm", encoder_hidden_size=8, num_tasks=3,
                                                      backend="triton"))
    rows = ptune_rt.report(model)
    assert len(rows) == 1
    r = rows[0]
    assert (r["module"], r["method"], r["num_virtual_tokens"], r["num_tasks"], r["encoder"]) == (
        "prompt_encoder.default", "p_tuning", 4, 3, "lstm")
    assert r["backend"] == "triton" and "TRITON_INTERPRET=1" in r["why"] and r["hidden_size"] == 64
    assert r["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = ptune_rt.format_report(rows)
    assert text.splitlines()[2].split()[:7] == ["prompt_encoder.default", "p_tuning", "3x4x64", "P=4", "float32",
                                                "triton", "-"]
    assert "LoRA" not in text
    assert text.splitlines()[-1] == "1 p_tuning soft prompt (P=4, 3 tasks, lstm encoder): triton 1"

    model = ptune_rt.apply(tiny_llama(), PromptTuningConfig(6))
    ptune_rt.apply(model, cfg(target_modules=["v_proj"]))
    rows = ptune_rt.report(model)
    assert [r["method"] for r in rows] == ["lora", "lora", "prompt_tuning"]
    assert rows[2]["backend"] == "torch" and "cpu tensors" in rows[2]["why"] and rows[2]["encoder"] is None
    assert ptune_rt.format_report(rows).splitlines()[-2:] == ["2 LoRA modules: torch 2",
                                                              "1 prompt_tuning soft prompt (P=6, 1 task): torch 1"]
    ptune_rt.restore(model)
    assert ptune_rt.report(model) == []


def test_target_selection_modes():
    model = tiny_llama()
    names = inject.resolve_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 14
    assert inject.resolve_targets(model, r"model\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert len(inject.resolve_targets(model, None)) == 4  # llama default: q_proj, v_proj
    assert len(inject.resolve_targets(tiny_gpt2(), None)) == 2  # gpt2 default: c_attn


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_modes(bias):
    model = ptune_rt.apply(tiny_gpt2(), cfg(target_modules=["c_attn"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 4
    biases = trainable - lora
    if bias == "none":
        assert not biases
    elif bias == "lora_only":
        assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    else:
        every_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
        assert biases == every_bias and "transformer.ln_f.bias" in biases and len(biases) > 10


def test_restore_is_exact_and_gives_back_flags():
    model = tiny_qwen2()
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own freezing survives the round trip
    snap = snapshot(model)
    ids = input_ids()
    before = model(input_ids=ids).logits
    ptune_rt.apply(model, cfg(target_modules="all-linear", bias="all"))
    randomize_b(model)
    assert not torch.equal(model(input_ids=ids).logits, before)
    ptune_rt.merge(model)
    ptune_rt.restore(model)  # unmerges first
    assert_unchanged(model, snap)
    assert torch.equal(model(input_ids=ids).logits, before)
    ptune_rt.apply(model, cfg(target_modules=["q_proj"]))  # and it can be applied again
    assert len(lora_modules(model)) == 2


def test_train_eval_mode_follows_the_model():
    model = tiny_llama().train()
    ptune_rt.apply(model, cfg(target_modules=["q_proj"]))
    assert all(m.training for m in lora_modules(model).values())
    model.eval()
    assert not any(m.training for m in lora_modules(model).values())
    ptune_rt.restore(model)
    assert not model.model.layers[0].self_attn.q_proj.training


# ----------------------------------------------------------------------------------------
# bad inputs: clear errors, model unchanged
# ----------------------------------------------------------------------------------------


def test_config_rank_validation():
    with pytest.raises(ValueError, match="LoRAConfig.r"):
        LoRAConfig(r=0)
    model = tiny_llama()
    c = cfg(target_modules=["q_proj"])
    c.r = 0  # mutated after construction: apply validates again
    fails_cleanly(model, lambda: ptune_rt.apply(model, c), ValueError, "LoRAConfig.r", "0")


def test_rank_larger_than_a_target():
    model = tiny_llama()  # q_proj 64x64 is fine, k_proj 64->32 is not: nothing may change
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(r=33, target_modules=["q_proj", "k_proj"])),
                  ValueError, "LoRAConfig.r=33", "out_features=32", "model.layers.0.self_attn.k_proj")
    model = tiny_gpt2()
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(r=65, target_modules=["c_attn"])),
                  ValueError, "LoRAConfig.r=65", "in_features=64", "c_attn")


def test_unknown_target():
    model = tiny_llama()
    msg = fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules=["q_proj", "qq_proj"])),
                        ValueError, "target_modules", "qq_proj")
    assert "q_proj" in msg.split("e.g.")[1]  # suggests real names
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules=r"nothing\.here")), ValueError,
                  "matches no module")
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules="q_proj(")), ValueError,
                  "regular expression")
    m = nn.Sequential(nn.Linear(4, 4))
    fails_cleanly(m, lambda: ptune_rt.apply(m, cfg(r=2)), ValueError, "target_modules is None")


@pytest.mark.parametrize("factory,target,kind", [
    (tiny_llama, ["input_layernorm"], "LlamaRMSNorm"),
    (tiny_llama, ["q_proj", "self_attn"], "LlamaAttention"),
    (tiny_gpt2, ["c_attn", "ln_1"], "LayerNorm"),
    (tiny_bert, ["query", "LayerNorm"], "LayerNorm"),
])
def test_non_linear_target(factory, target, kind):
    model = factory()
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules=target)), TypeError,
                  "target_modules", kind, "nn.Linear, GPT-2 Conv1D or nn.Embedding")


def test_already_swapped_and_peft_models():
    model = ptune_rt.apply(tiny_llama(), cfg(target_modules=["q_proj"]))
    for targets in (["q_proj"], ["v_proj"], "all-linear"):
        fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules=targets)), ValueError,
                      "already carries ptune-rt LoRA modules", "ptune_rt.restore")
    peft_model = peft_lora_model(tiny_llama(), ["q_proj"])
    fails_cleanly(peft_model, lambda: ptune_rt.apply(peft_model, cfg(target_modules=["v_proj"])), ValueError,
                  "PEFT LoRA layers", "ptune_rt.accelerate")


def test_wrong_argument_types():
    model = tiny_llama()
    fails_cleanly(model, lambda: ptune_rt.apply(model, {"r": 4}), TypeError, "config", "LoRAConfig")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ptune_rt.apply("not a model", cfg(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="peft_model must be a torch.nn.Module"):
        ptune_rt.accelerate(42)
    for fn in (ptune_rt.merge, ptune_rt.unmerge, ptune_rt.restore):
        fails_cleanly(model, lambda: fn(model), ValueError, "no ptune-rt LoRA modules")
    with pytest.raises(TypeError, match="rows"):
        ptune_rt.format_report("rows")


def test_triton_backend_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_llama()
    fails_cleanly(model, lambda: ptune_rt.apply(model, cfg(target_modules=["q_proj"], backend="triton")),
                  ValueError, "LoRAConfig.backend='triton'", "q_proj", "TRITON_INTERPRET=1")
    peft_model = peft_lora_model(tiny_llama(), ["q_proj"])
    fails_cleanly(peft_model, lambda: ptune_rt.accelerate(peft_model, backend="triton"), ValueError,
                  "backend='triton'", "TRITON_INTERPRET=1")
    fails_cleanly(peft_model, lambda: ptune_rt.accelerate(peft_model, backend="cuda"), ValueError,
                  "backend must be one of")


def test_dtype_and_device_mismatch():
    model = ptune_rt.apply(tiny_llama(), cfg(target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    assert layer(x).shape == (2, 3, 64)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the frozen weight has torch.float32"):
        layer(x.bfloat16())
    with pytest.raises(ValueError, match=r"x is on meta but weight is on cpu"):
        layer(torch.empty(2, 3, 64, device="meta"))
    with pytest.raises(ValueError, match="last dimension in_features=64"):
        layer(torch.randn(2, 3, 65))


def test_dtype_and_device_mismatch_without_grad():
    """The no-grad (decode) path caches its checks: bad input still gets the same clear errors, before
    and after a good call has filled the cache."""
    model = ptune_rt.apply(tiny_llama(), cfg(target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for _ in range(2):
            with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the frozen weight has torch.float32"):
                layer(torch.randn(2, 3, 64).bfloat16())
            with pytest.raises(ValueError, match=r"x is on meta but weight is on cpu"):
                layer(torch.empty(2, 3, 64, device="meta"))
            with pytest.raises(ValueError, match="last dimension in_features=64"):
                layer(torch.randn(2, 3, 65))
            assert layer(torch.randn(1, 1, 64)).shape == (1, 1, 64)


@pytest.mark.parametrize("factory,target", [(tiny_llama, "q_proj"), (tiny_gpt2, "c_attn")], ids=["linear", "conv1d"])
def test_inference_cache_follows_every_change(factory, target):
    """The no-grad path's cached checks never serve stale weights: after in-place updates, replaced
    Parameter objects, replaced .data, a dtype change, an adapter switch, disable and merge, its output
    equals the autograd path's (the checked op) bit for bit."""
    model = ptune_rt.apply(factory(), cfg(target_modules=[target]))
    layer = next(m for n, m in model.named_modules() if n.endswith(target))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, layer.in_features)

    def both():
        with torch.no_grad():
            fast = layer(x)
        slow = layer(x).detach()  # grad mode: the checked custom-op path
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        return fast

    def both_bf16(layer, xb):
        with torch.no_grad():
            fast = layer(xb)
        torch.testing.assert_close(fast, layer(xb).detach(), rtol=0, atol=0)
        return fast

    y0 = both()
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(2.0)  # in place, same Parameter (an optimizer step)
    y1 = both()
    assert not torch.equal(y0, y1)
    layer.lora_B["default"].weight = nn.Parameter(torch.randn_like(layer.lora_B["default"].weight))
    y2 = both()
    assert not torch.equal(y1, y2)
    layer.base_layer.weight.data = torch.randn_like(layer.base_layer.weight)  # same Parameter, new storage
    y3 = both()
    assert not torch.equal(y2, y3)
    layer.bfloat16()
    with torch.no_grad():  # x still float32 against the bfloat16 model: the clear error, not a stale cache
        with pytest.raises(TypeError, match="x has dtype torch.float32"):
            layer(x)
    assert both_bf16(layer, x.bfloat16()).dtype == torch.bfloat16
    layer.float()  # back to float32 (values now bf16-rounded)
    layer.add_adapter("other", 4, 8.0)
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_()
    layer.active_adapter = "other"
    y_other = both()
    layer.active_adapter = "default"
    assert not torch.equal(both(), y_other)
    layer.disabled = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    layer.disabled = False
    y_before = both()
    layer.merge()
    with torch.no_grad():  # merged: the base layer alone, with the folded weight
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
        assert not torch.equal(layer(x), y_before)  # fp32 rounding of the fold: not the cached unmerged path
    layer.unmerge()
    torch.testing.assert_close(both(), y_before, rtol=0, atol=0)


def test_inference_cache_never_pins_old_weights():
    """The no-grad path's cache holds views of the weights: .to() / .half(), load_state_dict and
    deepcopy drop it, so a moved model never keeps its old copies alive."""
    model = ptune_rt.apply(tiny_llama(), cfg(target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    ids = input_ids()
    with torch.no_grad():
        model(input_ids=ids)
    assert layer._inference_cache is not None
    assert copy.deepcopy(model).model.layers[0].self_attn.q_proj._inference_cache is None
    model.half()
    assert layer._inference_cache is None
    model.float()
    with torch.no_grad():
        model(input_ids=ids)
    assert layer._inference_cache is not None
    model.load_state_dict(model.state_dict())
    assert layer._inference_cache is None


# ----------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------


def _bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("factory,targets", [(tiny_llama, LLAMA_T), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2"])
def test_merge_unmerge_exact(factory, targets, dtype):
    model = ptune_rt.apply(factory(dtype=dtype), cfg(target_modules=targets))
    randomize_b(model, std=0.1)
    mods = lora_modules(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in mods.items()}
    objects = {n: m.base_layer.weight for n, m in mods.items()}
    ids = input_ids()
    unmerged = model(input_ids=ids).logits

    gold_model = copy.deepcopy(model).double()  # the same weights in float64

    ptune_rt.merge(model)
    assert all(r["merged"] for r in ptune_rt.report(model))
    merged = model(input_ids=ids).logits
    # Merged weights equal the delta rounded once into W's dtype.
    for n, m in mods.items():
        d = (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()) * m.scaling["default"]
        d = d.t() if m.fan_in_fan_out else d
        assert torch.equal(m.base_layer.weight, (weights[n].float() + d).to(dtype))
        # The documented bound of the uncorrected round trip U = cast(cast(W + d) - d).
        u_w = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        U = (m.base_layer.weight.float() - d).to(dtype).float()
        W = weights[n].float()
        bound = (u_w + 2.0**-24) * (2 * W.abs() + 3 * d.abs()) * (1 + 1e-3)
        assert ((U - W).abs() <= bound).all(), n
        assert m.merge_extra_bytes() <= W.numel() * weights[n].element_size() + 4 * 4 * (64 + 256)
    ptune_rt.merge(gold_model)  # a merged fp64 model runs only its (exact) base layers
    gold = gold_model(input_ids=ids).logits
    assert_close_to_reference(merged, unmerged, gold, dtype, "merged logits")
    ptune_rt.merge(model)  # idempotent

    ptune_rt.unmerge(model)
    for n, m in mods.items():
        assert m.base_layer.weight is objects[n]
        assert torch.equal(_bits(m.base_layer.weight), _bits(weights[n])), f"{n} not restored bit for bit"
        assert m.merge_extra_bytes() == 0
    assert torch.equal(model(input_ids=ids).logits, unmerged)
    ptune_rt.unmerge(model)  # no-op when not merged


def test_merge_patches_little_when_delta_is_small():
    model = ptune_rt.apply(tiny_llama(dtype=torch.bfloat16), cfg(target_modules=["q_proj"]))
    randomize_b(model, std=1e-3)  # a typical fine-tuned delta, |d| << |W|
    ptune_rt.merge(model)
    for m in lora_modules(model).values():
        rec = m._merge_record
        assert rec.index is not None and rec.index.numel() < 0.02 * m.base_layer.weight.numel()
    ptune_rt.unmerge(model)


def test_merge_uses_snapshot_when_adapter_changes():
    model = ptune_rt.apply(tiny_gpt2(), cfg(target_modules=["c_attn"]))
    randomize_b(model)
    before = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(model).items()}
    ptune_rt.merge(model)
    randomize_b(model, seed=9)  # e.g. an optimizer step with stale gradients while merged
    ptune_rt.unmerge(model)
    for n, m in lora_modules(model).items():
        assert torch.equal(m.base_layer.weight, before[n])


def test_merge_is_all_or_nothing():
    model = ptune_rt.apply(tiny_llama(dtype=torch.float16), cfg(target_modules=["q_proj", "v_proj"]))
    randomize_b(model)
    last = list(lora_modules(model).values())[-1]
    with torch.no_grad():
        last.lora_B["default"].weight.fill_(1e6)  # would overflow fp16
    fails_cleanly(model, lambda: ptune_rt.merge(model), ValueError, "non-finite", "unchanged")
    assert not any(m.merged for m in lora_modules(model).values())
    first = next(iter(lora_modules(model).values()))
    first.disabled = True
    fails_cleanly(model, lambda: ptune_rt.merge(model), ValueError, "disabled",
                  "model.layers.0.self_attn.q_proj")


# ----------------------------------------------------------------------------------------
# accelerate: refusals and restore
# ----------------------------------------------------------------------------------------


def test_accelerate_reads_scaling_and_dropout():
    pm = peft_lora_model(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.25, use_rslora=True)
    peft_layers = {n: m for n, m in pm.named_modules() if n.endswith(("q_proj", "v_proj"))}
    rows = ptune_rt.accelerate(pm)
    assert len(rows) == 4 and all(r["source"] == "peft" and r["backend"] == "torch" for r in rows)
    for n, m in lora_modules(pm).items():
        assert m.scaling["default"] == 8 / 2 == peft_layers[n].scaling["default"]
        assert m.lora_dropout_p["default"] == 0.25 and m.r["default"] == 4
        assert m.lora_A["default"] is peft_layers[n].lora_A["default"]
        assert m.base_layer is peft_layers[n].base_layer
    ptune_rt.restore(pm)
    for n, m in pm.named_modules():
        if n in peft_layers:
            assert m is peft_layers[n]
    assert not lora_modules(pm)


def test_accelerate_dropout_is_active_in_training():
    pm = peft_lora_model(tiny_llama(), ["q_proj"], dropout=0.5)
    ptune_rt.accelerate(pm)
    layer = lora_modules(pm)["base_model.model.model.layers.0.self_attn.q_proj"]
    x = torch.randn(4, 64)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2) and not torch.equal(y1, y_eval)


def _peft(targets=("q_proj",), factory=tiny_llama, **kw):
    return peft_lora_model(factory(), list(targets), **kw)


def test_accelerate_refuses_unsupported():
    from peft import LoraConfig

    cases = []
    pm = _peft()
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    cases.append((pm, ValueError, ["adapters ['default', 'other']", "delete_adapter"]))
    pm2 = _peft()
    pm2.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    pm2.base_model.set_adapter(["default", "other"])
    cases.append((pm2, ValueError, ["active adapters ['default', 'other']"]))
    pm = _peft()
    pm.merge_adapter()
    cases.append((pm, ValueError, ["is merged", "unmerge_adapter"]))
    cases.append((tiny_llama(), ValueError, ["no PEFT LoRA layers", "get_peft_model"]))
    pm = _peft()
    ptune_rt.accelerate(pm)
    cases.append((pm, ValueError, ["already carries ptune-rt LoRA modules"]))
    for model, exc, words in cases:
        fails_cleanly(model, lambda: ptune_rt.accelerate(model), exc, *words)

    pm = _peft()
    with pm.disable_adapter():
        fails_cleanly(pm, lambda: ptune_rt.accelerate(pm), ValueError, "disabled")


def test_accelerate_gpt2_conv1d_and_merge():
    pm = peft_lora_model(tiny_gpt2(), ["c_attn", "c_fc"])
    ids = input_ids()
    ref = pm(input_ids=ids).logits
    base_w = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer" in n}
    ptune_rt.accelerate(pm)
    assert all(m.fan_in_fan_out for m in lora_modules(pm).values())
    assert_fp32_end_to_end_close(pm(input_ids=ids).logits, ref, "accelerated logits")
    ptune_rt.merge(pm)
    assert_fp32_end_to_end_close(pm(input_ids=ids).logits, ref, "merged logits")
    ptune_rt.restore(pm)  # unmerge + PEFT's layers back
    for n, p in pm.named_parameters():
        if n in base_w:
            assert torch.equal(p, base_w[n])
    assert torch.equal(pm(input_ids=ids).logits, ref)


def test_apply_after_accelerate_restore_roundtrip_with_copy_helper():
    base = tiny_bert()
    pm = peft_lora_model(copy.deepcopy(base), MODELS["bert"][1])
    mine = ptune_rt.apply(copy.deepcopy(base), cfg(target_modules=MODELS["bert"][1]))
    assert copy_peft_lora_weights(pm, mine) == 13
    ids = input_ids()
    assert_fp32_end_to_end_close(mine(input_ids=ids).logits, pm(input_ids=ids).logits, "bert logits")


# ----------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------


def test_torch_compile_forward_backward():
    model = ptune_rt.apply(tiny_llama(layers=1), cfg(target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_b(model)
    ids = input_ids()
    eager = copy.deepcopy(model)
    loss_e = eager(input_ids=ids, labels=ids).loss
    loss_e.backward()
    compiled = torch.compile(model, fullgraph=True)  # no graph break anywhere, the op included
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    assert_fp32_end_to_end_close(loss_c, loss_e, "compiled loss")
    grads_e = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    grads_c = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads_c) == set(grads_e) and len(grads_c) == 6
    for n in grads_e:
        assert_fp32_end_to_end_close(grads_c[n], grads_e[n], f"compiled grad {n}")


def test_accelerated_model_keeps_peft_features(tmp_path):
    """PEFT sees the swapped layers as its own: save/load, disable_adapter, merge_adapter,
    merge_and_unload; adapter switching raises clearly; the model pickles."""
    import pickle

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    base = tiny_llama()
    pm = peft_lora_model(copy.deepcopy(base), ["q_proj", "v_proj"])
    ids = input_ids()
    ref, plain = pm(input_ids=ids).logits, base(input_ids=ids).logits
    keys = list(get_peft_model_state_dict(pm))
    ptune_rt.accelerate(pm)
    assert list(get_peft_model_state_dict(pm)) == keys
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, ref)

    with pm.disable_adapter():
        assert torch.equal(pm(input_ids=ids).logits, plain)
        assert not any(p.requires_grad for p in pm.parameters())
    assert_fp32_end_to_end_close(pm(input_ids=ids).logits, ref, "re-enabled logits")
    assert sum(p.requires_grad for p in pm.parameters()) == 8
    pm.merge_adapter()
    assert all(r["merged"] for r in ptune_rt.report(pm))
    assert_fp32_end_to_end_close(pm(input_ids=ids).logits, ref, "PEFT-merged logits")
    with pm.disable_adapter():  # a disabled merged layer unmerges first, as in PEFT
        assert torch.equal(pm(input_ids=ids).logits, plain)
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert not any(r["merged"] for r in ptune_rt.report(pm))
    pickle.loads(pickle.dumps(pm))
    unloaded = copy.deepcopy(pm).merge_and_unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_fp32_end_to_end_close(unloaded(input_ids=ids).logits, ref, "merge_and_unload logits")

    layer = lora_modules(pm)["base_model.model.model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="holds only the adapter"):
        layer.set_adapter("other")
    with pytest.raises(ValueError, match="ptune_rt.restore"):
        layer.delete_adapter("default")
    with pytest.raises(TypeError, match="adapter_names"):
        layer(torch.randn(2, 64), adapter_names=["default"])


def test_peft_adapter_management_after_accelerate():
    """PEFT's add_adapter / load_adapter / set_adapter(other) raise a clear error after accelerate (PEFT
    would wrap the swapped layers and run two adapters at once); set_adapter of the held adapter passes;
    forward(adapter_names=...) runs the rows as PEFT's mixed batch does; restore gives PEFT its methods back."""
    from peft import LoraConfig

    pm = _peft(("q_proj", "v_proj"))
    ref = copy.deepcopy(pm)
    ptune_rt.accelerate(pm)
    snap = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match="PeftModel.add_adapter after ptune_rt.accelerate: the swapped layers hold"):
        pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"set_adapter\('other'\) after ptune_rt.accelerate"):
        pm.set_adapter("other")
    with pytest.raises(ValueError, match="load_adapter after ptune_rt.accelerate"):
        pm.load_adapter("/nonexistent", adapter_name="other")
    assert list(dict(pm.named_parameters())) == list(snap)
    pm.set_adapter("default")
    ids = input_ids(batch=3)
    pm.eval()
    ref.eval()
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        got = pm(input_ids=ids, adapter_names=names).logits
        want = ref(input_ids=ids, adapter_names=names).logits
        with ref.disable_adapter():
            base_row = ref(input_ids=ids[1:2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1:2], base_row, rtol=0, atol=1e-5)  # the "__base__" row really is the base
    ptune_rt.restore(pm)
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))  # PEFT's own again
    pm.set_adapter("other")
    assert pm.active_adapter == "other"
