"""The prefixed KV-cache layer (ptune_rt.methods.prefix.cache): decode steps attend over [prefix ; cache]
kept in one buffer. Checked against the concatenating path (adoption switched off) and PEFT, and
unit by unit: appends, regrowth, crop, beam reordering, stale prefix rows, gradients."""
from __future__ import annotations

import copy

import pytest
import torch

import ptune_rt
from ptune_rt.methods.prefix import inject as prefix_inject
from ptune_rt.methods.prefix import cache as PC
from ptune_rt.methods.prefix import PrefixConfig
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import padded_batch, tiny_llama
from test_prefix_tuning import _pair

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer()


def _kv(B=2, H=2, L=3, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)


@pytest.fixture
def spy(monkeypatch):
    """Counts attention calls that got the joined [prefix ; cache] buffer from the cache."""
    calls = {"joined": 0}
    real = PC.prefixed_layer_class().joined

    def joined(self, *a):
        out = real(self, *a)
        calls["joined"] += out is not None
        return out

    monkeypatch.setattr(PC.prefixed_layer_class(), "joined", joined)
    return calls


def _no_adoption(monkeypatch):
    monkeypatch.setattr(prefix_inject, "adopt_cache", lambda *a, **k: None)


# ----------------------------------------------------------------------------------------
# the layer on its own
# ----------------------------------------------------------------------------------------


def test_appends_regrowth_and_crop_keep_dynamic_layer_semantics(monkeypatch):
    monkeypatch.setattr(PC, "_MIN_SPARE", 2)  # regrow often
    ref, layer = _dynamic_layer(), _dynamic_layer()
    assert PC.adopt(layer, 5)
    for step in range(9):
        k, v = _kv(L=3 if step == 0 else 1, seed=step)
        want = ref.update(k, v)
        got = layer.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert layer.get_seq_length() == ref.get_seq_length() == 3 + step
    buf = layer._side("keys").buf
    for layer_ in (ref, layer):
        layer_.crop(-2)
    assert layer._side("keys").buf is buf, "crop must shorten the view, not copy the buffer"
    assert torch.equal(layer.keys, ref.keys) and layer.get_seq_length() == ref.get_seq_length()
    k, v = _kv(L=1, seed=99)
    assert torch.equal(layer.update(k, v)[1], ref.update(k, v)[1])


def test_reorder_select_and_repeat_rebuild_and_mark_the_prefix_stale():
    ref, layer = _dynamic_layer(), _dynamic_layer()
    PC.adopt(layer, 3)
    k, v = _kv(B=3)
    ref.update(k, v)
    layer.update(k, v)
    pk, pv = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert layer.joined(pk, pv, None) is not None and layer._ptune_rt_stamp is not None
    idx = torch.tensor([2, 0, 0])
    for layer_ in (ref, layer):
        layer_.reorder_cache(idx)
    assert torch.equal(layer.keys, ref.keys) and layer._ptune_rt_stamp is None
    keys, values = layer.joined(pk, pv, None)
    assert torch.equal(keys[:, :, :3], pk.expand(3, -1, -1, -1)) and torch.equal(values[:, :, 3:], ref.values)
    for layer_ in (ref, layer):
        layer_.batch_select_indices(torch.tensor([1, 2]))
        layer_.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert layer.joined(pk, pv, None)[0].shape == (4, 2, 3 + 3, 4)


def test_prefix_rows_follow_in_place_changes_and_task_ids():
    layer = _dynamic_layer()
    PC.adopt(layer, 2)
    k, v = _kv(B=2)
    layer.update(k, v)
    pk, pv = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)  # three tasks
    tasks = torch.tensor([2, 0], dtype=torch.int32)
    keys, _ = layer.joined(pk, pv, tasks)
    assert torch.equal(keys[:, :, :2], pk[tasks.long()])
    with torch.no_grad():
        pk.add_(1.0)  # same tensor, new contents: the version counter moves
    keys, _ = layer.joined(pk, pv, tasks)
    assert torch.equal(keys[:, :, :2], pk[tasks.long()]), "stale prefix rows after an in-place update"
    tasks[0] = 1
    keys, values = layer.joined(pk, pv, tasks)
    assert torch.equal(keys[:, :, :2], pk[tasks.long()]) and torch.equal(values[:, :, :2], pv[tasks.long()])
    other = pk.clone()  # equal contents, another tensor: written again (identity is part of the stamp)
    assert torch.equal(layer.joined(other, pv, tasks)[0][:, :, :2], other[tasks.long()])
    assert layer.joined(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None) is None, "another P: no joined buffer"


def test_grad_enabled_update_falls_back_to_concatenation():
    layer = _dynamic_layer()
    PC.adopt(layer, 2)
    k0, v0 = _kv(L=2)
    layer.update(k0, v0)
    k1, v1 = (t.requires_grad_() for t in _kv(L=1, seed=1))
    keys, values = layer.update(k1, v1)
    assert type(layer) is type(_dynamic_layer())
    assert torch.equal(keys.detach(), torch.cat([k0, k1.detach()], 2))
    (keys.sum() + values.sum()).backward()
    assert torch.equal(k1.grad, torch.ones_like(k1))


def test_adopt_only_plain_dynamic_layers_and_release_restores():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    sliding = DynamicSlidingWindowLayer(sliding_window=8)
    assert not PC.adopt(sliding, 2) and type(sliding) is DynamicSlidingWindowLayer
    layer = _dynamic_layer()
    k, v = _kv()
    layer.update(k, v)
    assert PC.adopt(layer, 2)  # adopting a filled layer keeps what it holds
    assert torch.equal(layer.keys, k) and layer.get_seq_length() == 3
    assert PC.adopt(layer, 2) and not PC.adopt(layer, 3), "an adopted layer serves one prefix length"
    PC.release(layer)
    assert type(layer) is type(_dynamic_layer()) and torch.equal(layer.values, v)
    assert not any(n.startswith("_ptune_rt") for n in vars(layer))


# ----------------------------------------------------------------------------------------
# through the model
# ----------------------------------------------------------------------------------------


def _decode(model, ids, mask, steps, **kw):
    """Greedy decode by hand; returns the logits of every step and the cache."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(input_ids=nxt, past_key_values=cache, attention_mask=mask, use_cache=True, **kw)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def test_generate_uses_the_joined_buffer_and_matches_peft(spy):
    _, peft_model, mine = _pair("llama")
    ids, mask = padded_batch(seq=6, side="left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = mine.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    layers = mine.config.num_hidden_layers
    assert spy["joined"] == layers * 7, "every decode step of every layer must attend over the joined buffer"
    assert all(type(la) is PC.prefixed_layer_class() for la in out.past_key_values.layers)
    assert out.past_key_values.get_seq_length() == 6 + 7, "the prefix must stay out of the cache"
    # beam reordering rebuilds the buffers and rewrites the prefix rows; the beam scores (not only the
    # tokens, which this tiny model soon repeats) must be PEFT's
    beams = dict(kw, num_beams=3, return_dict_in_generate=True, output_scores=True)
    got = mine.generate(input_ids=ids, attention_mask=mask, **beams)
    want = peft_model.generate(input_ids=ids, attention_mask=mask, **beams)
    assert torch.equal(got.sequences, want.sequences)
    assert_fp32_end_to_end_close(torch.stack(got.scores), torch.stack(want.scores), "beam search scores")


def test_decode_loop_equals_the_concatenating_path_across_regrowth(monkeypatch, spy):
    monkeypatch.setattr(PC, "_MIN_SPARE", 3)
    base = tiny_llama()
    model = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(5, num_tasks=3))
    with torch.no_grad():
        for p in model.prompt_encoder["default"].parameters():
            p.normal_(0.0, 0.5)
    ids, mask = padded_batch(batch=3, seq=6, side="left")
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad():
        got, cache = _decode(model, ids, mask, 10, task_ids=tasks)
        assert spy["joined"] == 10 * model.config.num_hidden_layers
        assert type(cache.layers[0]) is PC.prefixed_layer_class()
        _no_adoption(monkeypatch)
        want, cache = _decode(model, ids, mask, 10, task_ids=tasks)
        assert type(cache.layers[0]) is not PC.prefixed_layer_class()
    assert_fp32_end_to_end_close(got, want, "decode logits, joined buffer vs concatenation")


def test_new_prefix_weights_between_steps_of_one_cache(monkeypatch):
    """The prefix rows are written again when the prefix changes while a cache lives on."""
    _, _, mine = _pair("llama")
    ids, mask = padded_batch(seq=6, side=None)
    emb = mine.prompt_encoder["default"].embedding.weight

    def run():
        with torch.no_grad():
            out = mine(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            m2 = torch.cat([mask, mask.new_ones((2, 1))], 1)
            mine(input_ids=nxt, past_key_values=cache, attention_mask=m2, use_cache=True)  # writes the prefix rows
            cache.crop(-1)
            emb.mul_(-1.0)
            try:
                return mine(input_ids=nxt, past_key_values=cache, attention_mask=m2, use_cache=True).logits
            finally:
                emb.mul_(-1.0)

    got = run()
    _no_adoption(monkeypatch)
    assert_fp32_end_to_end_close(got, run(), "decode logits after the prefix changed")


def test_prefix_rows_are_written_once_per_cache(monkeypatch):
    """Decode steps reuse the written prefix rows: one write per layer for a whole generation."""
    writes = {"n": 0}
    cls = PC.prefixed_layer_class()
    joined = cls.joined

    def counting(self, *a):
        stamp = self._ptune_rt_stamp
        out = joined(self, *a)
        writes["n"] += self._ptune_rt_stamp is not stamp
        return out

    monkeypatch.setattr(cls, "joined", counting)
    _, _, mine = _pair("llama")
    ids, mask = padded_batch(seq=6, side=None)
    mine.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert writes["n"] == mine.config.num_hidden_layers
