"""Prefix-tuning checkpoints: PEFT's layout both ways (checked against PEFT 0.21.2 itself), the own
format's round trip, and refusal of checkpoints that do not fit (the model is left exactly as it was)."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig, PrefixConfig, load_adapter, save_adapter
from ptune_rt.methods.prefix import inject as prefix_inject
from ptune_rt.methods.prefix.inject import ATTN_NAME, has_prefix, prefix_encoder
from ptune_rt.io import AdapterError
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import HIDDEN, VOCAB, assert_unchanged, input_ids, snapshot, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

P = 4


# ---------------------------------------------------------------------------------------------- models

def _bert(cls_name: str = "BertModel", seed: int = 0) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                                  num_labels=3)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(cfg).eval()


def _llama(layers: int = 2, kv_heads: int = 2, heads: int = 4, hidden: int = HIDDEN, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


#: name -> (base factory, PEFT task type)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (lambda: _bert("BertModel"), "FEATURE_EXTRACTION"),
    "bert-cls": (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS"),
}


def _peft_save(name, path, projection=False, seed=7):
    """(base, PEFT prefix model with a random prefix and head) saved with PEFT's save_pretrained."""
    factory, task = CASES[name]
    base = factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=task, num_virtual_tokens=P,
                                                                    prefix_projection=projection))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad and not n.startswith("prompt_encoder."):
                    p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    pm.save_pretrained(str(path))
    return base, pm


def _ours(base, projection=False, seed=3, **cfg):
    """A copy of ``base`` with a ptune-rt prefix holding seeded random values (and a changed head)."""
    model = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(P, prefix_projection=projection, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix_encoder(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        head = getattr(model, "classifier", None)
        if head is not None:
            head.weight.add_(torch.randn(head.weight.shape, generator=g) * 0.1)
    return model


def _out(model, ids=None, mask=None):
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _padded():
    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _same(model, ref_model, what):
    ids, mask = _padded()
    return assert_fp32_end_to_end_close(_out(model, ids, mask), _out(ref_model, ids, mask), what)


def expect_refusal(model, path, match, **kw):
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(model, path, **kw)
    assert_unchanged(model, snap)
    return str(info.value)


def _edited_copy(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------------------- PEFT -> here

@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                             ("bert", False), ("bert-cls", False)])
def test_peft_checkpoint_loads_with_same_outputs(name, projection, tmp_path):
    base, pm = _peft_save(name, tmp_path, projection)
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert has_prefix(model) and model.config._attn_implementation == ATTN_NAME
    enc = prefix_encoder(model)
    assert not enc.prefix_projection  # PEFT saves the projected prefix: it loads as a plain prefix (as in PEFT)
    assert enc.embedding.weight.shape == (P, pm.peft_config["default"].num_layers * 2 *
                                          pm.peft_config["default"].token_dim)
    _same(model, pm, f"{name} PEFT checkpoint")
    assert (_out(model) - _out(base)).abs().max() > 1e-3
    # into a model that already carries a matching prefix: replaced in place
    mine = _ours(base)
    before = prefix_encoder(mine)
    assert load_adapter(mine, tmp_path) is mine and prefix_encoder(mine) is before
    _same(mine, pm, f"{name} PEFT checkpoint into an existing prefix")


# ---------------------------------------------------------------------------------------------- here -> PEFT

@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("gpt2", True), ("bert", False),
                                             ("bert-cls", False)])
def test_saved_checkpoint_loads_in_peft(name, projection, tmp_path):
    factory, _ = CASES[name]
    base = factory()
    model = _ours(base, projection)
    save_adapter(model, tmp_path, format="peft")
    other = copy.deepcopy(base)
    if hasattr(other, "classifier"):  # a fresh base has its own random head: the saved one must replace it
        nn.init.normal_(other.classifier.weight)
    pm = PeftModel.from_pretrained(other, str(tmp_path))
    _same(pm, model, f"{name} (projection={projection}) loaded by PEFT")


@pytest.mark.parametrize("name,projection", [("llama", False), ("gpt2", True), ("bert-cls", False)])
def test_layout_matches_peft_save_pretrained(name, projection, tmp_path):
    """File names, keys, shapes, dtypes and metadata as PEFT writes them, and every config field we
    write has PEFT's value."""
    base, pm = _peft_save(name, tmp_path / "peft", projection)
    save_adapter(_ours(base, projection), tmp_path / "ours", format="peft")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]

    def layout(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}, f.metadata()

    theirs, their_meta = layout(tmp_path / "peft")
    mine, my_meta = layout(tmp_path / "ours")
    assert mine == theirs and my_meta == their_meta == {"format": "pt"}
    if name == "bert-cls":
        assert set(mine) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}

    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    my_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(my_cfg) == set(peft_cfg) - {"peft_version"}, set(my_cfg) ^ set(peft_cfg)
    for k, v in my_cfg.items():
        if k == "modules_to_save" and v is not None:  # PEFT's own list repeats the task's head names
            assert set(v) <= set(peft_cfg[k]), (v, peft_cfg[k])
        else:
            assert v == peft_cfg[k], f"{k}: ours {v!r}, PEFT {peft_cfg[k]!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning from PEFT's config loader
        loaded = PrefixTuningConfig.from_pretrained(str(tmp_path / "ours"))
    assert (loaded.num_virtual_tokens, loaded.prefix_projection) == (P, projection)


# ---------------------------------------------------------------------------------------------- own format

@pytest.mark.parametrize("name,projection", [("llama", True), ("gpt2", False), ("bert-cls", False)])
def test_ptune_format_round_trip(name, projection, tmp_path):
    factory, _ = CASES[name]
    base = factory()
    model = _ours(base, projection, encoder_hidden_size=24 if projection else None, position_mode="shift",
                  dropout=0.1, backend="torch")
    save_adapter(model, tmp_path, format="ptune")
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "ptune_config.json"]
    cfg = json.loads((tmp_path / "ptune_config.json").read_text())
    layers, kv, hd = model.config.num_hidden_layers, getattr(model.config, "num_key_value_heads", 4), 16
    assert cfg["format_version"] == 1 and cfg["method"] == "prefix"
    assert cfg["model"] == {"model_type": base.config.model_type, "class": type(base).__name__}
    assert cfg["prefix"] == {"num_virtual_tokens": P, "num_layers": layers, "num_kv_heads": kv, "head_dim": hd,
                             "prefix_projection": projection, "encoder_hidden_size": 24 if projection else None}
    assert cfg["config"]["dropout"] == 0.1 and cfg["config"]["backend"] == "torch"
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    enc = prefix_encoder(model)
    want = {f"prompt_encoder.{n}" for n, _ in enc.named_parameters()}
    if name == "bert-cls":
        want |= {"classifier.weight", "classifier.bias"}
        assert cfg["modules_to_save"] == ["classifier"]
    assert set(saved) == want

    other = copy.deepcopy(base)
    if hasattr(other, "classifier"):
        nn.init.normal_(other.classifier.weight)
    loaded = load_adapter(other, tmp_path)
    got = prefix_encoder(loaded)
    assert prefix_inject.prefix_state(loaded).config == prefix_inject.prefix_state(model).config
    assert [n for n, _ in got.named_parameters()] == [n for n, _ in enc.named_parameters()]  # training can resume
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), enc.parameters()))
    ids, mask = _padded()
    assert torch.equal(_out(loaded, ids, mask), _out(model, ids, mask))
    save_adapter(loaded, tmp_path / "again", format="ptune")
    again = load_file(str(tmp_path / "again" / "adapter.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    # the backend can be chosen at load time
    assert prefix_inject.prefix_state(load_adapter(copy.deepcopy(base), tmp_path, backend="auto")).config.backend == "auto"


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A PEFT checkpoint and an own-format one of the 2-layer, 2-kv-head, head_dim 16 tiny Llama."""
    root = tmp_path_factory.mktemp("prefix_ckpt")
    _peft_save("llama", root / "peft")
    save_adapter(_ours(tiny_llama(), True), root / "ptune", format="ptune")
    return root / "peft", root / "ptune"


def test_wrong_base_model_is_refused(llama_dirs):
    peft_dir, ptune_dir = llama_dirs
    for d in (peft_dir, ptune_dir):
        msg = expect_refusal(_llama(layers=3), d, "made for another base model")
        assert "[4, 2*2*2*16] = [4, 128]" in msg and "[4, 2*3*2*16] = [4, 192]" in msg and "layers 3 here vs 2" in msg
        msg = expect_refusal(_llama(kv_heads=4), d, "made for another base model")
        assert "[4, 2*2*4*16]" in msg and "kv heads 4 here vs 2" in msg
        msg = expect_refusal(_llama(hidden=32), d, "made for another base model")
        assert "[4, 2*2*2*8]" in msg and "head_dim 8 here vs 16" in msg
    expect_refusal(tiny_gpt2(), ptune_dir, r"saved for model_type 'llama' \(LlamaForCausalLM\), this model is 'gpt2'")
    expect_refusal(tiny_gpt2(), peft_dir, r"\[4, 2\*2\*4\*16\].*kv heads 4 here vs 2")
    # a PEFT config without the layout fields: the tensor's shape decides
    d = _edited_copy(peft_dir, peft_dir.parent / "no_layout",
                     edit_config=lambda c: [c.pop(k) for k in ("num_layers", "num_attention_heads", "token_dim")])
    msg = expect_refusal(_llama(layers=3), d, r"shape mismatch for 'prompt_embeddings'")
    assert "expected [4, 192]" in msg and "found [4, 128]" in msg
    assert torch.equal(_out(load_adapter(tiny_llama(), d)), _out(load_adapter(tiny_llama(), peft_dir)))


def test_existing_prefix_that_does_not_match_is_refused(llama_dirs):
    peft_dir, ptune_dir = llama_dirs
    base = tiny_llama()
    msg = expect_refusal(ptune_rt.apply(copy.deepcopy(base), PrefixConfig(6)), peft_dir,
                         "num_virtual_tokens=4, the model's prefix has 6")
    assert "ptune_rt.restore(model)" in msg
    expect_refusal(_ours(base, projection=True), peft_dir, r"PEFT's prompt_embeddings.*prefix_projection=True")
    expect_refusal(_ours(base, projection=False), ptune_dir, "prefix_projection=True, the model's prefix False")
    expect_refusal(_ours(base, projection=True, encoder_hidden_size=8), ptune_dir,
                   "encoder_hidden_size=32, the model's 8")
    expect_refusal(_ours(base, position_mode="none"), peft_dir, "position_mode='shift', the model's prefix with 'none'")
    expect_refusal(_ours(base), peft_dir, "a prefix has one adapter", adapter_name="other")


def test_bad_checkpoints_are_named(llama_dirs, tmp_path):
    peft_dir, _ = llama_dirs
    model = tiny_llama()
    d = _edited_copy(peft_dir, tmp_path / "missing", lambda t: t.pop("prompt_embeddings"))
    expect_refusal(model, d, r"missing key 'prompt_embeddings' \(expected shape \[4, 128\]\)")
    d = _edited_copy(peft_dir, tmp_path / "shape", lambda t: t.update(prompt_embeddings=torch.zeros(4, 96)))
    msg = expect_refusal(model, d, "shape mismatch for 'prompt_embeddings'")
    assert "expected [4, 128] [P, 2*L*Hkv*D] = [4, 2*2*2*16] = [4, 128], found [4, 96]" in msg
    d = _edited_copy(peft_dir, tmp_path / "int", lambda t: t.update(prompt_embeddings=torch.zeros(4, 128,
                                                                                                 dtype=torch.int32)))
    expect_refusal(model, d, "expected a floating-point tensor")
    d = _edited_copy(peft_dir, tmp_path / "nan", lambda t: t["prompt_embeddings"].__setitem__((0, 0), float("nan")))
    expect_refusal(model, d, "non-finite")
    d = _edited_copy(peft_dir, tmp_path / "head", lambda t: t.update({"base_model.lm_head.bias": torch.zeros(VOCAB)}))
    expect_refusal(model, d, r"unexpected key 'base_model\.lm_head\.bias'")
    d = _edited_copy(peft_dir, tmp_path / "nohead", lambda t: t.update({"base_model.score.weight": torch.zeros(3, 64)}))
    expect_refusal(model, d, r"unexpected key 'base_model\.score\.weight' \(there is no module 'score'")
    d = _edited_copy(peft_dir, tmp_path / "key", lambda t: t.update({"prompt_encoder.weight": torch.zeros(1)}))
    expect_refusal(model, d, r"key 'prompt_encoder\.weight' is neither 'prompt_embeddings' nor a head key")
    for field, value, match in [("num_transformer_submodules", 2, "num_transformer_submodules=2"),
                                ("num_virtual_tokens", 0, "'num_virtual_tokens' must be an integer >= 1"),
                                ("token_dim", 33, "token_dim=33 is not a multiple of num_attention_heads=2"),
                                ("prefix_projection", "yes", "'prefix_projection' must be true or false")]:
        d = _edited_copy(peft_dir, tmp_path / field, edit_config=lambda c: c.update({field: value}))
        expect_refusal(model, d, match)
    # a model the fused attention does not support: refused by apply, before anything changed
    import transformers
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                              ffn_dim=64, vocab_size=VOCAB, word_embed_proj_dim=32))
    expect_refusal(opt, peft_dir, "does not support model_type 'opt'")


def test_corrupt_truncated_and_pickle_files_are_refused(llama_dirs, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load must never be called")
    monkeypatch.setattr(torch, "load", refuse)
    peft_dir, ptune_dir = llama_dirs
    model = tiny_llama()
    for src, weights, config in ((peft_dir, "adapter_model.safetensors", "adapter_config.json"),
                                 (ptune_dir, "adapter.safetensors", "ptune_config.json")):
        data = (src / weights).read_bytes()
        for name, blob in [("truncated", data[:-7]), ("header", data[:5]), ("garbage", b"\x00not safetensors" * 8)]:
            d = tmp_path / f"{src.name}-{name}"
            os.makedirs(d)
            (d / weights).write_bytes(blob)
            (d / config).write_text((src / config).read_text())
            msg = expect_refusal(model, d, "not a readable safetensors file")
            assert str(d / weights) in msg
    d = tmp_path / "pickle"
    os.makedirs(d)
    (d / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    torch.save({"prompt_embeddings": torch.zeros(4, 128)}, str(d / "adapter_model.bin"))
    msg = expect_refusal(model, d, "pickle checkpoints")
    assert "adapter_model.bin" in msg
    expect_refusal(model, d / "adapter_model.bin", "pickle checkpoints")


def test_failure_while_loading_rolls_back(llama_dirs, monkeypatch):
    """A copy failing after the others (the last encoder tensor) leaves the model as it was."""
    peft_dir, ptune_dir = llama_dirs
    original = torch.Tensor.copy_
    fired = []

    def failing_copy(self, src, *a, **k):
        if not fired and tuple(src.shape) in ((P, 128), (128,)):  # prompt_embeddings / transform.2.bias
            fired.append(1)
            raise RuntimeError("injected copy failure")
        return original(self, src, *a, **k)

    for d in (peft_dir, ptune_dir):
        for model in (tiny_llama(), _ours(tiny_llama(), projection=d == ptune_dir)):
            fired.clear()
            snap = snapshot(model)
            monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
            with pytest.raises(RuntimeError, match="injected"):
                load_adapter(model, d)
            monkeypatch.undo()
            assert_unchanged(model, snap)
    real_apply = prefix_inject.apply_prefix

    def apply_then_fail(model, config):
        real_apply(model, config)
        raise RuntimeError("injected failure after apply")

    model = tiny_llama()
    snap = snapshot(model)
    monkeypatch.setattr(prefix_inject, "apply_prefix", apply_then_fail)
    with pytest.raises(RuntimeError, match="after apply"):
        load_adapter(model, peft_dir)
    monkeypatch.undo()
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- saving

def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    base = tiny_llama()
    for fmt, config in (("peft", "adapter_config.json"), ("ptune", "ptune_config.json")):
        d = tmp_path / fmt
        save_adapter(_ours(base), d, format=fmt)
        before = {f: (d / f).read_bytes() for f in os.listdir(d)}
        import ptune_rt.io.adapters as adapters
        real_replace = os.replace

        def failing_replace(src, dst):
            if str(dst).endswith(config):
                raise OSError("injected: disk full")
            return real_replace(src, dst)

        monkeypatch.setattr(adapters.os, "replace", failing_replace)
        with pytest.raises(OSError, match="disk full"):
            save_adapter(_ours(base, seed=9), d, format=fmt)
        monkeypatch.undo()
        after = {f: (d / f).read_bytes() for f in os.listdir(d)}
        assert set(after) == set(before)  # no temporary files left behind
        assert after[config] == before[config]
    with pytest.raises(AdapterError, match="a prefix has one adapter"):
        save_adapter(_ours(base), tmp_path / "x", adapter_name="other")
    with pytest.raises(AdapterError, match="position_mode='none'.*format='ptune'"):
        save_adapter(_ours(base, position_mode="none"), tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


def test_lora_and_prefix_on_one_model_are_saved_one_by_one(tmp_path):
    base = tiny_llama()
    model = _ours(base)
    ptune_rt.apply(model, LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="several methods.*method='lora' / method='prefix'"):
        save_adapter(model, tmp_path)
    save_adapter(model, tmp_path / "prefix", method="prefix")
    save_adapter(model, tmp_path / "lora", method="lora")
    assert json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="method must be None or one of"):
        save_adapter(model, tmp_path, method="loha")
    with pytest.raises(AdapterError, match="carries no prefix adapter"):
        save_adapter(tiny_llama(), tmp_path, method="prefix")


@pytest.mark.parametrize("name", ["llama", "bert-cls"])
def test_accelerated_peft_prefix_model_saves_and_loads(name, tmp_path):
    base, pm = _peft_save(name, tmp_path / "peft")
    expected = _out(pm)
    with pytest.raises(AdapterError, match=r"PEFT prefix-tuning model.*ptune_rt\.accelerate"):
        save_adapter(pm, tmp_path / "refused")
    with pytest.raises(AdapterError, match=r"PEFT prefix-tuning model.*ptune_rt\.accelerate"):
        load_adapter(pm, tmp_path / "peft")
    ptune_rt.accelerate(pm)
    save_adapter(pm, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["task_type"] == CASES[name][1] and cfg["num_virtual_tokens"] == P
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert_fp32_end_to_end_close(_out(pm2), expected, "saved through the accelerated PEFT model")
    # loading through the wrapper fills PEFT's own parameter
    other = _ours(base, seed=11)
    save_adapter(other, tmp_path / "other")
    weight = pm.prompt_encoder["default"].embedding.weight
    assert load_adapter(pm, tmp_path / "other", adapter_name="default") is pm
    assert pm.prompt_encoder["default"].embedding.weight is weight
    assert torch.equal(weight, prefix_encoder(other).embedding.weight)
    assert_fp32_end_to_end_close(_out(pm), _out(other), "loaded into the accelerated PEFT model")
