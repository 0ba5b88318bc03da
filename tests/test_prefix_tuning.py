"""Prefix tuning / P-tuning v2 on tiny HF models through the fused prefix attention, against PEFT.

PEFT 0.21.2 puts the prefix into ``past_key_values``; ptune-rt keeps it out of the cache and hands
it to the fused attention. With the same prompt embeddings both must give the same logits (right
and left padding), prefix gradients, training losses and greedy tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.prefix import attention as attention_fn
from ptune_rt.methods.prefix import inject as prefix_inject
from ptune_rt.methods.prefix.inject import ATTN_NAME, has_prefix, prefix_encoder, remove_prefix
from ptune_rt.methods.prefix import PrefixConfig, PrefixEncoder
from ptune_rt.testing.tolerances import FP32_END_TO_END, assert_fp32_end_to_end_close

from helpers_models import (HIDDEN, VOCAB, copy_peft_lora_weights, input_ids, main_output, padded_batch,
                            peft_lora_model, tiny_gpt2, tiny_llama, tiny_qwen2)

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")]

P = 4
DECODERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP wake-ups that dominate at these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# models and helpers
# ----------------------------------------------------------------------------------------


def _encoder_model(cls_name: str = "BertModel", seed: int = 0) -> nn.Module:
    """A tiny BERT / RoBERTa (bidirectional encoder), eager attention, no dropout, eval mode."""
    import transformers

    cls = getattr(transformers, cls_name)
    cfg_cls = transformers.RobertaConfig if cls_name.startswith("Roberta") else transformers.BertConfig
    cfg = cfg_cls(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=3)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.eval()


def _decoder_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny Mistral / Qwen3 (GQA, 2 layers), shaped like helpers_models.tiny_llama."""
    import transformers

    cfg_cls, cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[model_type]
    kw = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.eval()


def _factory(name: str):
    if name in DECODERS:
        return DECODERS[name], "CAUSAL_LM"
    if name in ("mistral", "qwen3"):
        return (lambda: _decoder_model(name)), "CAUSAL_LM"
    if name == "bert":
        return (lambda: _encoder_model("BertModel")), "FEATURE_EXTRACTION"
    if name == "roberta":
        return (lambda: _encoder_model("RobertaForSequenceClassification")), "SEQ_CLS"
    raise KeyError(name)


def _pair(name: str, num_virtual_tokens: int = P, projection: bool = False, **cfg):
    """(base, PEFT prefix model, ptune-rt prefix model) sharing weights and prompt parameters."""
    from peft import PrefixTuningConfig, get_peft_model

    factory, task = _factory(name)
    base = factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
            task_type=task, num_virtual_tokens=num_virtual_tokens, prefix_projection=projection))
    if task == "SEQ_CLS":  # PEFT also trains the classifier head there; keep only the prefix trainable
        for n, p in peft_model.named_parameters():
            p.requires_grad_(n.startswith("prompt_encoder."))
    mine = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(num_virtual_tokens, prefix_projection=projection, **cfg))
    prefix_encoder(mine).load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    return base, peft_model, mine




def _prefix_grads(model) -> dict:
    enc = model.prompt_encoder["default"]
    return {n: p.grad.detach().clone() for n, p in enc.named_parameters()}


def _loss(name, model, ids, mask, weight=None):
    """A loss touching every real output (causal LM loss for decoders, a fixed projection otherwise)."""
    if name in DECODERS:
        labels = ids.masked_fill(mask == 0, -100)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = main_output(model(input_ids=ids, attention_mask=mask))
    return ((out * weight[: out.shape[-1]]).sum(-1) * mask).sum() / mask.sum()


def _close(out, ref, what) -> float:
    return assert_fp32_end_to_end_close(out, ref, what)


def _close_grad(got, ref, what) -> float:
    """Gradients are small (1e-3 .. 1e-2 here): compare them scaled to max|ref| = 1, so the fp32
    end-to-end bound acts relative to the gradient's own size rather than as an absolute 1e-5."""
    scale = ref.abs().max().clamp(min=1e-30)
    return assert_fp32_end_to_end_close(got / scale, ref / scale, what)


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


def test_config_validation_and_json_round_trip():
    cfg = PrefixConfig(8, prefix_projection=True, encoder_hidden_size=32, position_mode="none", dropout=0.1,
                       backend="torch")
    assert PrefixConfig.from_json(cfg.to_json()) == cfg
    assert PrefixConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["method"] == "prefix"
    for kwargs, match in [({"num_virtual_tokens": 0}, "num_virtual_tokens"),
                          ({"num_virtual_tokens": 2.0}, "num_virtual_tokens"),
                          ({"num_virtual_tokens": True}, "num_virtual_tokens"),
                          ({"num_virtual_tokens": 4, "position_mode": "rope"}, "position_mode"),
                          ({"num_virtual_tokens": 4, "dropout": 1.0}, "dropout"),
                          ({"num_virtual_tokens": 4, "backend": "cuda"}, "backend"),
                          ({"num_virtual_tokens": 4, "encoder_hidden_size": 0}, "encoder_hidden_size"),
                          ({"num_virtual_tokens": 4, "prefix_projection": 1}, "prefix_projection")]:
        with pytest.raises(ValueError, match=match):
            PrefixConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown PrefixConfig fields"):
        PrefixConfig.from_dict({"num_virtual_tokens": 4, "token_dim": 8})
    with pytest.raises(ValueError, match="not a prefix config"):
        PrefixConfig.from_dict({"method": "lora", "num_virtual_tokens": 4})


def test_encoder_layout_matches_peft():
    """Parameter names and shapes are PEFT's; layer l reads E.view(P, 2L, Hkv, D)[:, 2l] / [:, 2l+1]."""
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder

    for projection in (False, True):
        pc = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=8, num_layers=2,
                                num_attention_heads=2, encoder_hidden_size=16, prefix_projection=projection)
        theirs = PeftPrefixEncoder(pc)
        mine = PrefixEncoder(3, 2, 2, 4, prefix_projection=projection, encoder_hidden_size=16)
        assert {n: tuple(p.shape) for n, p in mine.named_parameters()} == \
            {n: tuple(p.shape) for n, p in theirs.named_parameters()}
        mine.load_state_dict(theirs.state_dict())
        e = mine()
        torch.testing.assert_close(e, theirs(torch.arange(3)), rtol=0, atol=0)
    pk, pv = mine.layer_prefix(e, 1)
    view = e.view(3, 4, 2, 4)
    assert torch.equal(pk, view[:, 2].transpose(0, 1)) and torch.equal(pv, view[:, 3].transpose(0, 1))
    assert pk.shape == (2, 3, 4)


# ----------------------------------------------------------------------------------------
# parity with PEFT
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "roberta", "mistral", "qwen3"])
def test_logits_match_peft(name):
    base, peft_model, mine = _pair(name)
    assert mine.config._attn_implementation == ATTN_NAME
    for side in (None, "right", "left"):
        ids, mask = padded_batch(side=side)
        with torch.no_grad():
            ref = main_output(peft_model(input_ids=ids, attention_mask=mask))
            out = main_output(mine(input_ids=ids, attention_mask=mask))
            plain = main_output(base(input_ids=ids, attention_mask=mask))
        _close(out, ref, f"{name} {side} padding")
        assert (plain - ref).abs().max() > 1e-3, "the prefix must change the output"
    if name not in ("bert", "roberta"):  # no mask at all (transformers then skips the causal mask)
        with torch.no_grad():
            _close(main_output(mine(input_ids=ids)), main_output(peft_model(input_ids=ids)), f"{name} without a mask")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert"])
def test_prefix_gradients_match_peft(name):
    _, peft_model, mine = _pair(name)
    mine.train(), peft_model.train()
    ids, mask = padded_batch(side="left")
    weight = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    _loss(name, peft_model, ids, mask, weight).backward()
    _loss(name, mine, ids, mask, weight).backward()
    ref, got = _prefix_grads(peft_model), _prefix_grads(mine)
    assert set(got) == {"embedding.weight"}
    _close_grad(got["embedding.weight"], ref["embedding.weight"], f"{name} prefix grad")
    assert ref["embedding.weight"].abs().max() > 1e-4
    assert all(p.grad is None for n, p in mine.named_parameters() if not n.startswith("prompt_encoder."))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert"])
def test_training_run_matches_peft(name):
    """20 AdamW steps on the same batch: the same loss at every step."""
    _, peft_model, mine = _pair(name)
    mine.train(), peft_model.train()
    ids, mask = padded_batch(side="right")
    weight = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    opt_ref = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    trainable = [p for p in mine.parameters() if p.requires_grad]
    assert trainable == list(prefix_encoder(mine).parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        for model, o in ((peft_model, opt_ref), (mine, opt)):
            o.zero_grad()
            loss = _loss(name, model, ids, mask, weight)
            loss.backward()
            o.step()
            losses.append(loss.item())
    ref, got = losses[0::2], losses[1::2]
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= FP32_END_TO_END * max(1.0, abs(b)), f"{name} step {step}: loss {a} vs PEFT {b}"
    assert ref[-1] < ref[0]


def test_prefix_projection_matches_peft():
    _, peft_model, mine = _pair("llama", projection=True)
    enc = prefix_encoder(mine)
    assert {n for n, _ in enc.named_parameters()} == {"embedding.weight", "transform.0.weight", "transform.0.bias",
                                                      "transform.2.weight", "transform.2.bias"}
    assert enc.embedding.weight.shape == (P, 2 * 16)  # kv_heads * head_dim, PEFT's token_dim
    mine.train(), peft_model.train()
    for side in ("right", "left"):
        ids, mask = padded_batch(side=side)
        _close(mine(input_ids=ids, attention_mask=mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits,
               f"projection logits {side}")
    _loss("llama", peft_model, ids, mask).backward()
    _loss("llama", mine, ids, mask).backward()
    ref, got = _prefix_grads(peft_model), _prefix_grads(mine)
    assert set(got) == set(ref)
    for n in ref:
        _close_grad(got[n], ref[n], f"projection grad {n}")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_generate_matches_peft(name):
    base, peft_model, mine = _pair(name)
    for side in ("left", None):
        ids, mask = padded_batch(seq=6, side=side)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)
        got = mine.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, ref), f"{name} {side}: {got.tolist()} vs PEFT {ref.tolist()}"
        assert not torch.equal(base.generate(input_ids=ids, attention_mask=mask, **kw), ref)
        if name == "llama":  # a pre-allocated cache: the mask covers only the filled slots
            static = mine.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kw)
            assert torch.equal(static, ref)


def _decode_loop(model, ids, mask, steps, positions=False):
    """Greedy decoding by hand, one token per call, reusing the returned cache."""
    kw = {}
    if positions:
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    cache, toks = out.past_key_values, [ids]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if positions:
            kw["position_ids"] = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt, past_key_values=cache, attention_mask=mask, use_cache=True, **kw)
        cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1] + steps, "the prefix must stay out of the cache"
    return torch.cat(toks, dim=1)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decode_loop_matches_generate(name):
    _, peft_model, mine = _pair(name)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ids, mask = padded_batch(seq=6, side=None)
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(_decode_loop(mine, ids, mask, 6), ref)
        ids, mask = padded_batch(seq=6, side="left")  # left padding: positions as generate numbers them
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(_decode_loop(mine, ids, mask, 6, positions=True), ref)
        assert torch.equal(mine.generate(input_ids=ids, attention_mask=mask, **kw), ref)


# ----------------------------------------------------------------------------------------
# positions
# ----------------------------------------------------------------------------------------


def test_position_ids_shift_and_none():
    """shift: explicit position_ids get +P as in PEFT; none: the model's own positions (ChatGLM style),
    i.e. PEFT's model fed position_ids - P."""
    _, peft_model, mine = _pair("llama")
    ids, mask = padded_batch(side="right")
    pos = torch.arange(ids.shape[1]).unsqueeze(0) + 5
    with torch.no_grad():
        _close(mine(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
               peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, "explicit position_ids")
        shifted = mine(input_ids=ids, attention_mask=mask).logits
        # the inner model called directly, arguments by position: the same hidden states
        inner = mine.model(ids, mask).last_hidden_state
        assert torch.equal(inner, mine.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    none = copy.deepcopy(mine)
    remove_prefix(none)
    ptune_rt.apply(none, PrefixConfig(P, position_mode="none"))
    prefix_encoder(none).load_state_dict(prefix_encoder(mine).state_dict())
    with torch.no_grad():
        got = none(input_ids=ids, attention_mask=mask).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None] - P).logits
        _close(got, ref, "position_mode='none'")
        assert (got - shifted).abs().max() > 1e-3
        ids, mask = padded_batch(seq=6, side=None)
        gen = none.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(_decode_loop(none, ids, mask, 5), gen)


def test_too_long_sequence_raises_before_running():
    for name in ("llama", "gpt2"):
        model = ptune_rt.apply(DECODERS[name](), PrefixConfig(P))
        calls = []
        model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
        ids = input_ids(1, 128 - P)
        model(input_ids=ids)  # exactly at the limit
        calls.clear()
        with pytest.raises(ValueError, match="max_position_embeddings=128"):
            model(input_ids=input_ids(1, 128 - P + 1))
        with pytest.raises(ValueError, match="max_position_embeddings=128"):
            model.generate(input_ids=input_ids(1, 120), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert len(calls) == 5  # the prompt and 4 new tokens ran; the step past the limit did not
    with pytest.raises(ValueError, match="num_virtual_tokens=128"):
        ptune_rt.apply(tiny_llama(), PrefixConfig(128))
    ptune_rt.apply(tiny_llama(), PrefixConfig(128, position_mode="none"))


# ----------------------------------------------------------------------------------------
# gradient checkpointing, Triton backend, dtypes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,projection,reentrant", [("llama", False, False), ("llama", True, False),
                                                       ("llama", False, True), ("llama", True, True),
                                                       ("gpt2", False, False), ("gpt2", True, True)])
def test_gradient_checkpointing_same_grads(name, projection, reentrant):
    _, _, mine = _pair(name, projection=projection)
    ids, mask = padded_batch(side="left")
    mine.train()
    loss = _loss(name, mine, ids, mask)
    loss.backward()
    ref = _prefix_grads(mine)
    mine.zero_grad()
    kwargs = {"use_reentrant": True} if reentrant else None
    mine.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    loss_gc = _loss(name, mine, ids, mask)
    loss_gc.backward()
    got = _prefix_grads(mine)
    assert loss_gc.item() == pytest.approx(loss.item(), rel=1e-6)
    for n in ref:
        _close_grad(got[n], ref[n], f"checkpointed grad {n}")


def test_triton_backend_llama_forward_backward():
    """The fused Triton kernels (interpreted on CPU) inside the model: batch 2, seq 8, P 4."""
    _, peft_model, mine = _pair("llama", backend="triton")
    ids, mask = padded_batch(seq=8, side="right")
    mine.train(), peft_model.train()
    out = mine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    ref = peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    _close(out.logits, ref.logits, "triton logits")
    out.loss.backward()
    ref.loss.backward()
    _close_grad(_prefix_grads(mine)["embedding.weight"], _prefix_grads(peft_model)["embedding.weight"],
                "triton grad")


def test_half_precision_model_trains_fp32_prefix():
    model = ptune_rt.apply(tiny_llama(dtype=torch.bfloat16), PrefixConfig(P))
    enc = prefix_encoder(model)
    assert enc.embedding.weight.dtype == torch.float32
    ids, mask = padded_batch(side="left")
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    g = enc.embedding.weight.grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


# ----------------------------------------------------------------------------------------
# model state: apply, remove, caching, composition with LoRA
# ----------------------------------------------------------------------------------------


def _snapshot(model):
    return {"sd": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "attn": model.config._attn_implementation,
            "dict": set(model.__dict__), "modules": [n for n, _ in model.named_modules()],
            "hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
            "mod_dicts": [set(m.__dict__) for m in model.modules()]}


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["sd"].keys() == snap["sd"].keys()
    assert all(torch.equal(now["sd"][k], snap["sd"][k]) for k in snap["sd"])
    for key in ("grad", "attn", "dict", "modules", "hooks", "mod_dicts"):
        assert now[key] == snap[key], key


def _tiny_unrouted(kind):
    import transformers

    if kind == "bloom":
        cfg = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=VOCAB)
        return transformers.BloomForCausalLM(cfg)
    if kind == "gpt_neo":
        cfg = transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=VOCAB,
                                        attention_types=[[["global"], 2]], max_position_embeddings=64)
        return transformers.GPTNeoForCausalLM(cfg)
    cfg = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=VOCAB)
    return transformers.DebertaV2Model(cfg)


def test_bad_inputs_raise_and_leave_the_model_unchanged():
    for kind, cls_name in (("bloom", "BloomForCausalLM"), ("gpt_neo", "GPTNeoForCausalLM"),
                           ("deberta", "DebertaV2Model")):
        model = _tiny_unrouted(kind)
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=f"{cls_name}.*AttentionInterface"):
            ptune_rt.apply(model, PrefixConfig(P))
        _assert_same(model, snap)
    import transformers

    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=VOCAB,
        word_embed_proj_dim=32))
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="does not support model_type 'opt'"):
        ptune_rt.apply(opt, PrefixConfig(P))
    _assert_same(opt, snap)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ptune_rt.apply(model, PrefixConfig(1000))
    _assert_same(model, snap)
    model.config.is_causal = False
    with pytest.raises(ValueError, match="is_causal=False"):
        ptune_rt.apply(model, PrefixConfig(P))
    del model.config.is_causal
    _assert_same(model, snap)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ptune_rt.apply(nn.Linear(2, 2), PrefixConfig(P))
    with pytest.raises(TypeError, match="PrefixConfig"):
        prefix_inject.apply_prefix(model, {"num_virtual_tokens": 4})
    ptune_rt.apply(model, PrefixConfig(P))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already carries a ptune-rt prefix"):
        ptune_rt.apply(model, PrefixConfig(P))
    _assert_same(model, snap)
    ids = input_ids()
    with pytest.raises(NotImplementedError, match="2D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))


def test_apply_attaches_encoder_and_remove_restores():
    base = tiny_llama()
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    ids, mask = padded_batch(side="left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    ptune_rt.apply(model, PrefixConfig(P))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["prompt_encoder.default.embedding.weight"]
    assert "prompt_encoder.default.embedding.weight" in model.state_dict()
    assert prefix_encoder(model).embedding.weight.shape == (P, 2 * 2 * 2 * 16)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    twin = copy.deepcopy(model)  # a copy carries its own prefix, hook and encoder
    assert prefix_encoder(twin) is twin.prompt_encoder["default"] is not prefix_encoder(model)
    remove_prefix(twin)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, plain)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, out.logits.detach())
    ptune_rt.restore(model)  # the public undo removes a prefix-only model's prefix
    _assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with pytest.raises(ValueError, match="carries no ptune-rt prefix"):
        remove_prefix(model)
    with pytest.raises(ValueError, match="no ptune-rt LoRA modules and no prefix or soft prompt"):
        ptune_rt.restore(model)


def test_prefix_computed_once_per_forward_and_cached_at_inference(monkeypatch):
    model = ptune_rt.apply(tiny_llama(), PrefixConfig(P, prefix_projection=True))
    enc = prefix_encoder(model)
    calls = []
    original = PrefixEncoder._compute
    monkeypatch.setattr(PrefixEncoder, "_compute", lambda self: calls.append(1) or original(self))
    ids = input_ids()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 1  # once per forward, not per layer
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert len(calls) == 2 and torch.equal(a, b)  # one computation for both inference forwards
    with torch.no_grad():
        enc.transform[2].bias.add_(0.5)  # an in-place update (as an optimizer makes) invalidates the cache
        c = model(input_ids=ids).logits
    assert len(calls) == 3 and (c - a).abs().max() > 1e-3
    model(input_ids=ids)  # with autograd: always fresh
    assert len(calls) == 4


def test_prefix_dropout_only_while_training():
    model = ptune_rt.apply(tiny_llama(), PrefixConfig(P, dropout=0.5))
    ids = input_ids()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(a, b)
        model.train()
        c = model(input_ids=ids).logits
    assert (c - a).abs().max() > 1e-4


def test_lora_and_prefix_compose_in_either_order():
    """LoRA + prefix equals PEFT's prefix model over the LoRA-merged base; both orders agree; trainable
    parameters are exactly the adapters; restore + remove_prefix give the base back."""
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny_llama()
    targets = ["q_proj", "v_proj"]
    peft_lora = peft_lora_model(copy.deepcopy(base), targets)
    merged = peft_lora.merge_and_unload()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        peft_prefix = get_peft_model(merged, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    prompt = peft_prefix.prompt_encoder["default"].state_dict()
    ids, mask = padded_batch(side="left")
    with torch.no_grad():
        ref = peft_prefix(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    peft_lora = peft_lora_model(copy.deepcopy(base), targets)
    results = []
    for order in (("lora", "prefix"), ("prefix", "lora")):
        model = copy.deepcopy(base)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for step in order:
            if step == "lora":
                ptune_rt.apply(model, ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=targets))
                copy_peft_lora_weights(peft_lora, model)
            else:
                ptune_rt.apply(model, PrefixConfig(P))
                prefix_encoder(model).load_state_dict(prompt)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert len(trainable) == 9 and "prompt_encoder.default.embedding.weight" in trainable, trainable
        assert all(".lora_" in n for n in trainable if not n.startswith("prompt_encoder."))
        model.train()
        out = model(input_ids=ids, attention_mask=mask).logits
        _close(out, ref, f"LoRA + prefix logits ({' then '.join(order)})")
        out.sum().backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
        results.append(out.detach())
        # one restore takes out both: LoRA modules first, then the prefix
        ptune_rt.restore(model)
        assert not has_prefix(model) and not any("lora" in n for n, _ in model.named_parameters())
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.config._attn_implementation == base.config._attn_implementation
    assert torch.equal(results[0], results[1])


def test_attention_function_paths():
    """The unfused fallbacks equal the fused op: [prefix ; sequence] with torch SDPA (used for attention
    dropout while training) and plain attention for modules without a prefix (cross-attention)."""
    from ptune_rt.ops.prefix_attention import prefix_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    pk, pv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    kv_mask = torch.ones(2, 7, dtype=torch.bool)
    kv_mask[0, :2] = False
    for causal in (True, False):
        for m in (None, kv_mask):
            ref = prefix_attention(q, k, v, pk, pv, kv_mask=m, causal=causal, sm_scale=0.3, backend="torch")
            got = attention_fn._sdpa_concat(q, k, v, pk, pv, m, causal, 0.3, 0.0)
            _close(got, ref, f"SDPA over the concatenation (causal={causal})")
    plain = nn.Module()
    plain.is_causal = True
    out, weights = attention_fn.prefix_attention_forward(plain, q, k, v, None, scaling=0.3)
    ref = nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                     attn_mask=torch.ones(5, 7, dtype=torch.bool).tril(2), scale=0.3)
    assert weights is None and out.shape == (2, 5, 4, 8)
    _close(out, ref.transpose(1, 2), "plain causal attention (mask None on a causal module)")


def test_attention_dropout_while_training():
    """Attention-probability dropout (which the fused op has no counterpart for) takes the SDPA path:
    it trains, and eval mode is unaffected."""
    base = tiny_llama()
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(P))
    ids, mask = padded_batch(side="left")
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert prefix_encoder(model).embedding.weight.grad.abs().max() > 0
    assert (out.logits.detach() - a).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, a)


def test_sliding_window_beyond_the_window_raises():
    """Mistral's sliding window: fine while prefix + sequence fit in it (as in PEFT, where the prefix
    occupies the first cache slots), a clear error beyond."""
    model = ptune_rt.apply(_decoder_model("mistral", sliding_window=12), PrefixConfig(P))
    ids = input_ids(2, 8)
    model(input_ids=ids)  # 4 + 8 keys: inside the window
    with pytest.raises(NotImplementedError, match="sliding"):
        model(input_ids=input_ids(2, 9))
