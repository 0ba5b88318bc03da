"""ptune_rt.accelerate on PEFT prefix-tuning / P-tuning v2 models: the PeftModel keeps being the
object the user calls, on PEFT's own parameters, and must compute what an un-accelerated twin
computes (logits, training losses, generated tokens), with save_pretrained / disable_adapter /
restore still working; unsupported models are refused before anything changes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.prefix import attention as attention_fn
from ptune_rt.methods.prefix import inject as prefix_inject
from ptune_rt.methods.prefix import peft_bridge
from ptune_rt.testing.tolerances import FP32_END_TO_END, assert_fp32_end_to_end_close

from helpers_models import (HIDDEN, VOCAB, main_output, padded_batch, peft_lora_model, tiny_gpt2,
                            tiny_llama)

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

P = 4


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


def _bert(cls_name: str, seed: int = 0) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                                  num_labels=3)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(cfg).eval()


def _llama_cls(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, num_labels=3,
                      pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(cfg).eval()


#: name -> (base factory, PEFT task type)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (lambda: _bert("BertModel"), "FEATURE_EXTRACTION"),
    "bert-cls": (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS"),
    "llama-cls": (_llama_cls, "SEQ_CLS"),
}


def _peft(name: str, projection: bool = False, seed: int = 7, **kw):
    """(base, PEFT prefix model, its un-accelerated twin), with a random (non-zero) prefix MLP output
    and a random classifier where there is one."""
    factory, task = CASES[name]
    base = factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
            task_type=task, num_virtual_tokens=P, prefix_projection=projection, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad and not n.startswith("prompt_encoder."):  # the trained head
                    p.add_(torch.randn_like(p) * 0.1)
    return base, pm, copy.deepcopy(pm)




def _labels(name, ids, mask):
    if CASES[name][1] == "CAUSAL_LM":
        return ids.masked_fill(mask == 0, -100)
    if CASES[name][1] == "SEQ_CLS":
        return torch.tensor([0, 2])
    return None


def _loss(name, model, ids, mask):
    labels = _labels(name, ids, mask)
    if labels is not None:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = main_output(model(input_ids=ids, attention_mask=mask))
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(3))
    return ((out * w).sum(-1) * mask).sum() / mask.sum()


def _close(out, ref, what):
    return assert_fp32_end_to_end_close(out, ref, what)


#: Set on the base model (and its inner model) by PEFT's own generate, and left there.
_PEFT_GENERATE_ATTRS = {"prepare_inputs_for_generation", "generation_config"}


def _snapshot(pm):
    base = pm.base_model
    return {"dict": dict(pm.__dict__), "params": list(pm.named_parameters()),
            "grad": {n: p.requires_grad for n, p in pm.named_parameters()},
            "attn": base.config._attn_implementation, "base_dict": set(base.__dict__) - _PEFT_GENERATE_ATTRS,
            "hooks": sum(len(m._forward_pre_hooks) for m in pm.modules()),
            "mod_dicts": [set(m.__dict__) - _PEFT_GENERATE_ATTRS for m in pm.modules()],
            "sd": {k: v.clone() for k, v in pm.state_dict().items()}}


def _assert_same(pm, snap):
    now = _snapshot(pm)
    assert now["dict"].keys() == snap["dict"].keys()
    assert all(now["dict"][k] is snap["dict"][k] for k in snap["dict"])
    assert [(n, id(p)) for n, p in now["params"]] == [(n, id(p)) for n, p in snap["params"]]
    for key in ("grad", "attn", "base_dict", "hooks", "mod_dicts"):
        assert now[key] == snap[key], key
    assert now["sd"].keys() == snap["sd"].keys() and all(torch.equal(now["sd"][k], snap["sd"][k]) for k in now["sd"])


# ----------------------------------------------------------------------------------------
# parity with the un-accelerated twin
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                             ("bert", False), ("bert-cls", False), ("llama-cls", True)])
def test_logits_match_and_parameters_are_peft_s(name, projection):
    base, pm, twin = _peft(name, projection)
    params = list(pm.named_parameters())
    flags = {n: p.requires_grad for n, p in params}
    keys = list(pm.state_dict())
    rows = ptune_rt.accelerate(pm)
    assert rows[0]["method"] == "prefix" and rows[0]["num_virtual_tokens"] == P
    assert rows[0]["prefix_projection"] is projection
    # the very same Parameter objects under the same names, flags untouched, nothing added
    assert [(n, id(p)) for n, p in pm.named_parameters()] == [(n, id(p)) for n, p in params]
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags
    assert list(pm.state_dict()) == keys
    enc = prefix_inject.prefix_encoder(pm.base_model)
    assert enc.embedding is pm.prompt_encoder["default"].embedding
    assert pm.base_model.config._attn_implementation == attention_fn.ATTN_NAME
    for side in (None, "right", "left"):
        ids, mask = padded_batch(side=side)
        with torch.no_grad():
            got = main_output(pm(input_ids=ids, attention_mask=mask))
            ref = main_output(twin(input_ids=ids, attention_mask=mask))
            plain = main_output(base(input_ids=ids, attention_mask=mask))
        _close(got, ref, f"{name} {side} padding")
        assert (plain - ref).abs().max() > 1e-3, "the prefix must change the output"
    if CASES[name][1] == "CAUSAL_LM":  # positional arguments keep PEFT's order; explicit positions get +P
        pos = torch.arange(ids.shape[1])[None] + 3
        with torch.no_grad():
            _close(pm(ids, mask).logits, twin(ids, mask).logits, "positional arguments")
            _close(pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
                   twin(input_ids=ids, attention_mask=mask, position_ids=pos).logits, "explicit position_ids")


@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("gpt2", False), ("bert", False),
                                             ("bert-cls", False), ("llama-cls", False)])
def test_training_with_an_optimizer_made_before_accelerate(name, projection):
    """10 AdamW steps: the optimizer built on PEFT's parameters before the call keeps training them,
    with the twin's loss at every step; the trained prefix is PEFT's (save_pretrained sees it)."""
    _, pm, twin = _peft(name, projection)
    pm.train(), twin.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    ptune_rt.accelerate(pm)
    ids, mask = padded_batch(side="left")
    losses = []
    for _ in range(10):
        for model, o in ((pm, opt), (twin, opt_ref)):
            o.zero_grad()
            loss = _loss(name, model, ids, mask)
            loss.backward()
            o.step()
            losses.append(loss.item())
    got, ref = losses[0::2], losses[1::2]
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= FP32_END_TO_END * max(1.0, abs(b)), f"{name} step {step}: loss {a} vs twin {b}"
    assert ref[-1] < ref[0]
    for (n, p), (_, q) in zip(pm.named_parameters(), twin.named_parameters()):
        if q.requires_grad:
            assert_fp32_end_to_end_close(p.detach(), q.detach(), f"trained {n}")
            assert p.grad is not None, n


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_matches_twin(name):
    _, pm, twin = _peft(name)
    ptune_rt.accelerate(pm)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for side in ("left", None):
        ids, mask = padded_batch(seq=6, side=side)
        ref = twin.generate(input_ids=ids, attention_mask=mask, **kw)
        got = pm.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, ref), f"{name} {side}: {got.tolist()} vs {ref.tolist()}"
    # PEFT's generate puts back the base model's own prepare_inputs_for_generation afterwards
    assert "prepare_inputs_for_generation" not in pm.base_model.__dict__ or \
        pm.base_model.prepare_inputs_for_generation == pm.base_model_prepare_inputs_for_generation
    # the returned cache holds the real tokens only: a hand-written decoding loop over peft_model(...) works
    ids, mask = padded_batch(seq=6, side=None)
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, use_cache=True)
        assert out.past_key_values.get_seq_length() == ids.shape[1]
        toks = [ids, out.logits[:, -1:].argmax(-1)]
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        out = pm(input_ids=toks[-1], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        toks.append(out.logits[:, -1:].argmax(-1))
    ref = twin.generate(input_ids=ids, attention_mask=mask[:, :-1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.cat(toks, 1), ref)


def test_triton_backend_forward_and_backward():
    _, pm, twin = _peft("llama")
    ptune_rt.accelerate(pm, backend="triton")
    pm.train(), twin.train()
    ids, mask = padded_batch(side="right")
    got, ref = _loss("llama", pm, ids, mask), _loss("llama", twin, ids, mask)
    assert abs(got.item() - ref.item()) <= FP32_END_TO_END * max(1.0, abs(ref.item()))
    got.backward(), ref.backward()
    g, r = pm.prompt_encoder["default"].embedding.weight.grad, twin.prompt_encoder["default"].embedding.weight.grad
    scale = r.abs().max()
    assert_fp32_end_to_end_close(g / scale, r / scale, "triton prefix grad")


# ----------------------------------------------------------------------------------------
# PEFT features that keep working
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,projection", [("llama", True), ("bert-cls", False)])
def test_save_pretrained_after_training_loads_in_peft(name, projection, tmp_path):
    base, pm, _ = _peft(name, projection)
    ptune_rt.accelerate(pm)
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ids, mask = padded_batch(side="right")
    for _ in range(2):
        opt.zero_grad()
        _loss(name, pm, ids, mask).backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        _close(main_output(pm(input_ids=ids, attention_mask=mask)), main_output(loaded(input_ids=ids, attention_mask=mask)),
               f"{name} saved by PEFT after accelerate")
        # an inference-mode PEFT model (the prefix is embedding.weight itself) accelerates too
        twin = copy.deepcopy(loaded)
        ptune_rt.accelerate(loaded)
        assert not prefix_inject.prefix_encoder(loaded.base_model).prefix_projection
        _close(main_output(loaded(input_ids=ids, attention_mask=mask)), main_output(twin(input_ids=ids, attention_mask=mask)),
               f"{name} inference-mode PEFT model")


def test_disable_adapter_restore_and_reaccelerate():
    base, pm, twin = _peft("llama")
    ids, mask = padded_batch(side="right")
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    snap = _snapshot(pm)
    ptune_rt.accelerate(pm)
    with torch.no_grad():
        with pm.disable_adapter():
            _close(pm(input_ids=ids, attention_mask=mask).logits, plain, "disable_adapter() runs the base model")
            gen = pm.generate(input_ids=ids[1:], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(gen, base.generate(input_ids=ids[1:], max_new_tokens=4, do_sample=False,
                                                  pad_token_id=0))
        _close(pm(input_ids=ids, attention_mask=mask).logits, ref, "the prefix is back after disable_adapter()")
        with pytest.raises(ValueError, match="already accelerated"):
            ptune_rt.accelerate(pm)
        assert ptune_rt.restore(pm) is pm
        _assert_same(pm, snap)
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits, ref)  # PEFT's own forward again
        ptune_rt.accelerate(pm)
        _close(pm(input_ids=ids, attention_mask=mask).logits, ref, "accelerated again")
        clone = copy.deepcopy(pm)  # a copy carries its own prefix, on its own parameters
        with torch.no_grad():
            clone.prompt_encoder["default"].embedding.weight.mul_(2)
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits, pm(input_ids=ids, attention_mask=mask).logits)
        _close(pm(input_ids=ids, attention_mask=mask).logits, ref, "the original is unaffected by its copy")
        assert (clone(input_ids=ids, attention_mask=mask).logits - ref).abs().max() > 1e-3


def test_token_type_ids_are_treated_as_peft_treats_them():
    _, pm, twin = _peft("bert")
    ptune_rt.accelerate(pm)
    ids, mask = padded_batch(side="right")
    tt = torch.ones_like(ids)
    with torch.no_grad(), pytest.warns(UserWarning, match="token_type_ids"):
        got = pm(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    with torch.no_grad(), pytest.warns(UserWarning):
        ref = twin(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    _close(got, ref, "FEATURE_EXTRACTION drops token_type_ids")
    _, pm, twin = _peft("bert-cls")
    ptune_rt.accelerate(pm)
    with torch.no_grad():
        _close(pm(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits,
               twin(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, "SEQ_CLS keeps token_type_ids")


# ----------------------------------------------------------------------------------------
# refusals, before any change
# ----------------------------------------------------------------------------------------


def _refused(pm, match, exc=ValueError, **kw):
    snap = _snapshot(pm)
    with pytest.raises(exc, match=match):
        ptune_rt.accelerate(pm, **kw)
    _assert_same(pm, snap)


def test_unsupported_models_are_refused_unchanged():
    import transformers

    # several adapters
    _, pm, _ = _peft("llama")
    pm.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    _refused(pm, r"adapters \['default', 'other'\].*single prefix-tuning adapter")
    # inside disable_adapter()
    _, pm, _ = _peft("llama")
    with pm.disable_adapter():
        _refused(pm, "disabled")
    # a PEFT task class without prefix support here
    with torch.random.fork_rng(devices=[]):
        tok = get_peft_model(transformers.BertForTokenClassification(_bert("BertModel").config),
                             PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P))
    _refused(tok, "PeftModelForTokenClassification.*PeftModelForCausalLM")
    # a prefix that does not have the model's layout (PEFT lets num_layers be overridden)
    _, pm, _ = _peft("llama", num_layers=1)
    _refused(pm, r"num_layers=1.*\[P, 2\*L\*Hkv\*D\].*num_layers=2, num_attention_heads=2 \(kv heads\), "
                 r"token_dim=32")
    # a model type the fused attention does not support (PEFT runs OPT's prefix in the cache)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                              ffn_dim=64, vocab_size=VOCAB, word_embed_proj_dim=32))
    pm = get_peft_model(opt, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    _refused(pm, "model_type 'opt'")
    # a backend that cannot run here
    _, pm, _ = _peft("llama")
    _refused(pm, "backend", backend="cuda")
    # restore of a model that is not accelerated
    with pytest.raises(ValueError, match="no ptune-rt LoRA modules"):
        ptune_rt.restore(pm)


def test_lora_models_still_take_the_lora_path():
    pm = peft_lora_model(tiny_llama(), ["q_proj"])
    assert not peft_bridge.is_peft_prefix_model(pm)
    rows = ptune_rt.accelerate(pm)
    assert [r["method"] for r in rows] == ["lora", "lora"]
