"""Adapter checkpoints: PEFT interop both ways, the own format, and refusal of bad checkpoints
(which must leave the model exactly as it was)."""
from __future__ import annotations

import copy
import json
import shutil
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ptune_rt
from ptune_rt import LoRAConfig, LoRALinear, load_adapter, save_adapter
from ptune_rt.io import AdapterError
from ptune_rt.io.peft_config import infer_task_type
from ptune_rt.methods.lora import inject

from helpers_models import assert_unchanged, input_ids, randomize_lora_b, snapshot, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj"]


# ---------------------------------------------------------------------------------------------- helpers

def tiny_llama_cls(seed: int = 0, layers: int = 2, hidden: int = 64):
    """LlamaForSequenceClassification (head ``score``), 3 labels."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_labels=3,
                      pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(cfg).eval()


def tiny_llama_shape(layers: int, hidden: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids() if x is None else x).logits


def randomize(model, seed: int = 3, std: float = 0.1, biases: bool = False) -> None:
    """Seeded random values in every LoRA weight (and, with ``biases``, noise on every trained bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or biases and p.requires_grad and name.endswith(".bias"):
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def ours(base, targets, **kw):
    """A copy of ``base`` with ptune_rt LoRA on ``targets``, random A and B."""
    model = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=targets, **kw))
    randomize(model, biases=kw.get("bias", "none") != "none")
    return model


def peft_save(base, targets, path, *, bias="none", task_type=None, **kw):
    """A PEFT LoRA model on a copy of ``base`` with random non-zero adapter (and changed trained
    biases), saved with PEFT's own save_pretrained; returns the PEFT model."""
    fan = getattr(base.config, "model_type", None) == "gpt2"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias=bias, fan_in_fan_out=fan, task_type=task_type,
                     **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pm = get_peft_model(copy.deepcopy(base), cfg)
    randomize_lora_b(pm, seed=1)
    if bias != "none" or task_type is not None:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and ".lora_" not in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


def expect_refusal(model, path, match, **kw):
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(model, path, **kw)
    assert_unchanged(model, snap)
    return str(info.value)


def lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


# ---------------------------------------------------------------------------------------------- PEFT interop

CASES = {
    "llama": (tiny_llama, LLAMA_TARGETS),
    "llama-regex": (tiny_llama, r".*\.(q_proj|v_proj)"),
    "gpt2": (tiny_gpt2, GPT2_TARGETS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_with_same_logits(case, tmp_path):
    factory, targets = CASES[case]
    base = factory()
    pm = peft_save(base, targets, tmp_path)
    model = load_adapter(copy.deepcopy(base), tmp_path)
    expected_modules = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                              if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict))
    assert lora_names(model) == expected_modules
    torch.testing.assert_close(logits(model), logits(pm), **TOL)
    assert logits(model).sub(logits(base)).abs().max() > 1e-3  # the adapter does change the output
    cfg = inject.model_config(model)
    assert (cfg.r, cfg.alpha, cfg.bias, cfg.use_rslora) == (4, 8, "none", False)
    # the loaded adapter trains as after ptune_rt.apply
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_saved_peft_format_loads_in_peft(case, tmp_path):
    factory, targets = CASES[case]
    base = factory()
    model = ours(base, targets)
    save_adapter(model, tmp_path, format="peft")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(logits(pm), logits(model), **TOL)
    assert logits(model).sub(logits(base)).abs().max() > 1e-3


@pytest.mark.parametrize("case,bias", [("llama", "none"), ("gpt2", "lora_only"), ("gpt2", "all")])
def test_peft_layout_matches_peft_save_pretrained(case, bias, tmp_path):
    """Same file names, keys, shapes, dtypes and metadata as PEFT's own save, and every config field
    written has the value PEFT writes."""
    factory, targets = CASES[case]
    base = factory()
    peft_save(base, targets, tmp_path / "peft", bias=bias, task_type="CAUSAL_LM")
    save_adapter(ours(base, targets, bias=bias), tmp_path / "ours", format="peft")

    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        theirs = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        their_meta = f.metadata()
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        mine = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        my_meta = f.metadata()
    assert mine == theirs
    assert my_meta == their_meta == {"format": "pt"}
    if bias == "lora_only":
        assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in mine
    if bias == "all":
        assert "base_model.model.transformer.h.0.ln_1.bias" in mine

    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    my_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(my_cfg) <= set(peft_cfg), f"fields PEFT does not write: {set(my_cfg) - set(peft_cfg)}"
    for k, v in my_cfg.items():
        if k == "target_modules":
            assert sorted(v) == sorted(peft_cfg[k])
        else:
            assert v == peft_cfg[k], f"{k}: ours {v!r}, PEFT {peft_cfg[k]!r}"
    assert my_cfg["fan_in_fan_out"] is (case == "gpt2")
    assert my_cfg["task_type"] == "CAUSAL_LM" and my_cfg["base_model_name_or_path"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning from PEFT's config loader
        loaded = LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert (loaded.r, loaded.lora_alpha, loaded.bias, set(loaded.target_modules)) == (4, 8, bias, set(targets))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_round_trip_both_ways(bias, tmp_path):
    base = tiny_gpt2()
    pm = peft_save(base, GPT2_TARGETS, tmp_path / "peft", bias=bias)
    model = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model), logits(pm), **TOL)
    assert inject.model_config(model).bias == bias

    mine = ours(base, GPT2_TARGETS, bias=bias)  # random adapter and changed biases
    save_adapter(mine, tmp_path / "ours", format="peft")
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(pm2), logits(mine), **TOL)


def test_sequence_classification_head_both_ways(tmp_path):
    base = tiny_llama_cls()
    pm = peft_save(base, ["q_proj", "v_proj"], tmp_path / "peft", task_type="SEQ_CLS")  # trains `score`
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.score.weight" in f.keys()
    model = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model), logits(pm), **TOL)

    save_adapter(model, tmp_path / "ours", format="peft")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"] and cfg["auto_mapping"] is None
    other_head = copy.deepcopy(base)
    torch.nn.init.normal_(other_head.score.weight)  # as a fresh from_pretrained base would: its own random head
    pm2 = PeftModel.from_pretrained(other_head, str(tmp_path / "ours"))
    torch.testing.assert_close(logits(pm2), logits(model), **TOL)


def test_peft_exclude_modules(tmp_path):
    base = tiny_llama()
    pm = peft_save(base, ["q_proj", "v_proj"], tmp_path, exclude_modules=r".*layers\.0\.self_attn\.q_proj")
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert "model.layers.0.self_attn.q_proj" not in lora_names(model) and len(lora_names(model)) == 3
    torch.testing.assert_close(logits(model), logits(pm), **TOL)


@pytest.mark.skipif(not hasattr(ptune_rt, "accelerate"), reason="needs ptune_rt.accelerate")
def test_accelerated_peft_model_saves_and_loads(tmp_path):
    base = tiny_gpt2()
    pm = peft_save(base, GPT2_TARGETS, tmp_path / "peft", bias="lora_only")
    expected = logits(pm)
    ptune_rt.accelerate(pm)
    save_adapter(pm, tmp_path / "ours")  # names are the base model's, bias mode from the PEFT config
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and cfg["task_type"] == "CAUSAL_LM"
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(pm2), expected, **TOL)
    assert load_adapter(pm, tmp_path / "ours") is pm  # into the swapped modules, through the wrapper
    torch.testing.assert_close(logits(pm), expected, **TOL)


def test_task_type_inference():
    from transformers import GPT2Config, GPT2ForTokenClassification, LlamaConfig, LlamaModel
    assert infer_task_type(tiny_llama()) == "CAUSAL_LM"
    assert infer_task_type(tiny_gpt2()) == "CAUSAL_LM"  # GPT2LMHeadModel
    assert infer_task_type(tiny_llama_cls()) == "SEQ_CLS"
    tiny = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    assert infer_task_type(LlamaModel(LlamaConfig(**tiny))) == "FEATURE_EXTRACTION"
    assert infer_task_type(GPT2ForTokenClassification(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=32))) \
        == "TOKEN_CLS"
    assert infer_task_type(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None


def test_no_task_type_writes_auto_mapping(tmp_path):
    model = ours(tiny_llama(), ["q_proj"])
    save_adapter(model, tmp_path, task_type=None)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] is None
    assert cfg["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                   "parent_library": "transformers.models.llama.modeling_llama"}


# ---------------------------------------------------------------------------------------------- own format

@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_ptune_format_round_trip(case, tmp_path):
    factory, _ = CASES[case]
    base = factory()
    model = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=3, alpha=5.0, dropout=0.1, target_modules="all-linear",
                                                           use_rslora=True, init="gaussian", backend="torch"))
    randomize(model)
    save_adapter(model, tmp_path, format="ptune")
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "ptune_config.json"]
    cfg = json.loads((tmp_path / "ptune_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "lora"
    assert cfg["model"]["model_type"] == base.config.model_type
    assert cfg["config"]["r"] == 3 and cfg["config"]["use_rslora"] is True and cfg["config"]["dropout"] == 0.1
    targets = {t["module"]: (t["in_features"], t["out_features"]) for t in cfg["targets"]}
    assert targets == {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                       if isinstance(m, LoRALinear)}
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    first = next(iter(targets))
    assert saved[f"{first}.lora_A.weight"].shape == (3, targets[first][0])

    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert lora_names(loaded) == lora_names(model)
    torch.testing.assert_close(logits(loaded), logits(model), **TOL)
    a, b = inject.model_config(loaded), inject.model_config(model)
    assert (a.r, a.alpha, a.dropout, a.use_rslora, a.init, a.backend) == (b.r, b.alpha, b.dropout, b.use_rslora,
                                                                          b.init, b.backend)
    # the loaded model saves the same checkpoint again
    save_adapter(loaded, tmp_path / "again", format="ptune")
    again = load_file(str(tmp_path / "again" / "adapter.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_load_into_model_that_already_has_matching_lora(tmp_path):
    base = tiny_llama()
    pm = peft_save(base, LLAMA_TARGETS, tmp_path)
    model = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS))
    modules = dict(model.named_modules())
    load_adapter(model, tmp_path)
    assert all(m is modules[n] for n, m in model.named_modules())  # weights replaced in place
    torch.testing.assert_close(logits(model), logits(pm), **TOL)


def test_existing_lora_that_does_not_match_is_refused(tmp_path):
    base = tiny_llama()
    peft_save(base, LLAMA_TARGETS, tmp_path)
    other_rank = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=2, alpha=8.0, target_modules=LLAMA_TARGETS))
    expect_refusal(other_rank, tmp_path, "rank r=2, the checkpoint r=4")
    other_scale = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=4.0, target_modules=LLAMA_TARGETS))
    expect_refusal(other_scale, tmp_path, "scaling 1.0, the checkpoint 2.0")
    fewer = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj"]))
    expect_refusal(fewer, tmp_path, "has no LoRA adapter")
    more = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS + ["o_proj"]))
    expect_refusal(more, tmp_path, "are not in the adapter")


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load must never be called")
    monkeypatch.setattr(torch, "load", refuse)


def test_pickle_checkpoints_are_refused(tmp_path, no_torch_load):
    base = tiny_llama()
    peft_save(base, ["q_proj"], tmp_path)
    os.replace(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    msg = expect_refusal(copy.deepcopy(base), tmp_path, "pickle checkpoints")
    assert "adapter_model.bin" in msg and "save_file" in msg and "weights_only=True" in msg
    for name in ("adapter.pt", "model.pth", "x.ckpt"):
        expect_refusal(copy.deepcopy(base), tmp_path / name, "pickle checkpoints")


@pytest.fixture(scope="module")
def llama_peft_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_peft")
    peft_save(tiny_llama(), LLAMA_TARGETS, d)
    return d


def _edited_copy(src, dst, edit):
    os.makedirs(dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


K_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
K_B = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"


def test_missing_unexpected_and_misshapen_keys_are_named(llama_peft_dir, tmp_path):
    model = tiny_llama()
    d = _edited_copy(llama_peft_dir, tmp_path / "missing", lambda t: t.pop(K_A))
    msg = expect_refusal(model, d, "missing key")
    assert K_A in msg and "[4, 64]" in msg

    d = _edited_copy(llama_peft_dir, tmp_path / "unexpected",
                     lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight":
                                         torch.zeros(4, 64)}))
    expect_refusal(model, d, r"unexpected key .*k_proj\.lora_A\.weight.*not selected by the adapter's target_modules")

    d = _edited_copy(llama_peft_dir, tmp_path / "shape", lambda t: t.update({K_B: torch.zeros(64, 5)}))
    msg = expect_refusal(model, d, "shape mismatch")
    assert f"{K_B!r}: expected [64, 4]" in msg and "found [64, 5]" in msg

    d = _edited_copy(llama_peft_dir, tmp_path / "dtype",
                     lambda t: t.update({K_B: torch.zeros(64, 4, dtype=torch.int32)}))
    expect_refusal(model, d, "expected a floating-point tensor")

    d = _edited_copy(llama_peft_dir, tmp_path / "prefix", lambda t: t.update({"lm_head.weight": torch.zeros(1)}))
    expect_refusal(model, d, "do not start with 'base_model.model.'")


def test_corrupt_or_truncated_safetensors_are_named(llama_peft_dir, tmp_path):
    model = tiny_llama()
    data = (llama_peft_dir / "adapter_model.safetensors").read_bytes()
    for name, blob in [("truncated", data[:-7]), ("header", data[:5]), ("garbage", b"\x00not safetensors" * 8)]:
        d = tmp_path / name
        os.makedirs(d)
        (d / "adapter_model.safetensors").write_bytes(blob)
        (d / "adapter_config.json").write_text((llama_peft_dir / "adapter_config.json").read_text())
        msg = expect_refusal(model, d, "not a readable safetensors file")
        assert str(d / "adapter_model.safetensors") in msg
    d = tmp_path / "badjson"
    os.makedirs(d)
    (d / "adapter_config.json").write_text("{not json")
    expect_refusal(model, d, "adapter_config.json is not valid JSON")


def test_wrong_base_model_is_refused(llama_peft_dir, tmp_path):
    expect_refusal(tiny_gpt2(), llama_peft_dir, r"match no module of this GPT2LMHeadModel")
    expect_refusal(tiny_llama_shape(layers=2, hidden=32), llama_peft_dir, "shape mismatch")
    bigger = tiny_llama_shape(layers=3, hidden=64)  # has layer 2 with no weights in the file
    expect_refusal(bigger, llama_peft_dir, r"missing key 'base_model\.model\.model\.layers\.2\.")

    mine = load_adapter(tiny_llama(), llama_peft_dir)
    save_adapter(mine, tmp_path, format="ptune")
    expect_refusal(tiny_gpt2(), tmp_path, r"saved for model_type 'llama' \(LlamaForCausalLM\), this model is 'gpt2'")
    expect_refusal(tiny_llama_shape(layers=1, hidden=64), tmp_path,
                   r"target modules \['model\.layers\.1\..*do not exist in this LlamaForCausalLM")
    expect_refusal(tiny_llama_shape(layers=2, hidden=32), tmp_path,
                   r"adapter expects a linear layer with in_features=64, out_features=64; this model has a linear "
                   r"layer with in_features=32")


def test_unsupported_peft_types_and_features_are_refused(llama_peft_dir, tmp_path):
    from peft import LoHaConfig
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "loha"))
    expect_refusal(base, tmp_path / "loha", r"peft_type 'LOHA' is not supported.*LORA")

    for field, value in [("use_qalora", True), ("init_lora_weights", "pissa")]:
        d = _edited_copy(llama_peft_dir, tmp_path / field, lambda t: None)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg[field] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        expect_refusal(base, d, f"does not support: {field}=")


def test_failure_while_loading_rolls_back(llama_peft_dir, tmp_path, monkeypatch):
    """An error after the swap or in the middle of copying leaves the model as it was."""
    original_copy = torch.Tensor.copy_
    calls = {"n": 0}

    def flaky_copy(self, src, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected copy failure")
        return original_copy(self, src, *a, **k)

    fresh = tiny_llama()
    snap = snapshot(fresh)
    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(fresh, llama_peft_dir)
    monkeypatch.undo()
    assert_unchanged(fresh, snap)

    swapped = ptune_rt.apply(tiny_llama(), LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS))
    randomize(swapped)
    snap = snapshot(swapped)
    calls["n"] = 0
    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(swapped, llama_peft_dir)
    monkeypatch.undo()
    assert_unchanged(swapped, snap)

    gpt2 = tiny_gpt2()
    peft_save(gpt2, GPT2_TARGETS, tmp_path / "all", bias="all")
    snap = snapshot(gpt2)
    real_apply = inject.apply_lora

    def apply_then_fail(model, config):
        real_apply(model, config)
        raise RuntimeError("injected failure after the swap")

    monkeypatch.setattr(inject, "apply_lora", apply_then_fail)
    with pytest.raises(RuntimeError, match="after the swap"):
        load_adapter(gpt2, tmp_path / "all")
    monkeypatch.undo()
    assert_unchanged(gpt2, snap)


def test_format_detection(llama_peft_dir, tmp_path):
    model = load_adapter(tiny_llama(), llama_peft_dir / "adapter_config.json")  # a file in the directory is fine
    save_adapter(model, tmp_path, format="peft")
    save_adapter(model, tmp_path, format="ptune")
    expect_refusal(tiny_llama(), tmp_path, "pass format='peft' or format='ptune'")
    a = logits(load_adapter(tiny_llama(), tmp_path, format="peft"))
    b = logits(load_adapter(tiny_llama(), tmp_path, format="ptune"))
    torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        load_adapter(tiny_llama(), tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- saving

def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    base = tiny_llama()
    save_adapter(ours(base, ["q_proj"]), tmp_path, format="peft")
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    with pytest.raises(AdapterError, match="carries no adapter modules"):  # validation fails: nothing written
        save_adapter(base, tmp_path)
    with pytest.raises(AdapterError, match="carries no adapter modules"):
        save_adapter(base, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    import ptune_rt.io.adapters as adapters
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("injected: disk full")
        return real_replace(src, dst)

    other = ours(base, ["q_proj"])
    randomize(other, seed=9)
    monkeypatch.setattr(adapters.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(other, tmp_path, format="peft")
    monkeypatch.undo()
    after = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert set(after) == set(before)  # no temporary files left behind
    assert after["adapter_config.json"] == before["adapter_config.json"]
    load_file(str(tmp_path / "adapter_model.safetensors"))  # whatever is there is a whole file


def test_save_validation_errors(tmp_path):
    model = ours(tiny_llama(), ["q_proj", "v_proj"])
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    m.add_adapter("other", r=2, alpha=8.0)
    m.active_adapter = "other"
    with pytest.raises(AdapterError, match="different active adapters"):
        save_adapter(model, tmp_path)
    for mod in model.modules():
        if isinstance(mod, LoRALinear) and "other" not in mod.lora_A:
            mod.add_adapter("other", r=4, alpha=8.0)
    save_adapter(model, tmp_path / "ranks", adapter_name="other")  # per-module ranks: PEFT's rank_pattern
    cfg = json.loads((tmp_path / "ranks" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}
    shutil.rmtree(tmp_path / "ranks")
    with pytest.raises(AdapterError, match="'missing' is not an adapter"):
        save_adapter(model, tmp_path, adapter_name="missing")
    with pytest.raises(ValueError, match="format must be one of"):
        save_adapter(model, tmp_path, format="bin")
    with pytest.raises(AdapterError, match="'nothing' matches no module"):
        save_adapter(model, tmp_path, adapter_name="default", modules_to_save=["nothing"])
    assert not os.listdir(tmp_path)
    save_adapter(model, tmp_path, adapter_name="default")  # the uniform adapter saves fine
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
