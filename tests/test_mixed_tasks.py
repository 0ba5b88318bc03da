"""Mixed-task prefix tuning: ``PrefixConfig(num_tasks=T)`` holds T prefixes and every row of a batch
attends to its own task's prefix (``task_ids`` through forward and generate).

The reference for a row is the same row run alone with its own task: logits, gradients (summed
over a task's rows only; a task without rows gets exactly zero) and greedy tokens must agree, on
padded batches, and also equal a one-task model holding that task's weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.prefix import attention as attention_fn
from ptune_rt.methods.prefix import inject as prefix_inject
from ptune_rt.methods.prefix.inject import prefix_encoder
from ptune_rt.methods.prefix import PrefixConfig, PrefixEncoder
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import HIDDEN, VOCAB, input_ids, main_output, tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*right-padding was detected.*")]

P = 4
T = 3
#: Rows of the mixed batch and their tasks: task 1 has no row.
TASKS = [2, 0, 2, 0]


def _bert():
    import transformers

    cfg = transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.BertModel(cfg).eval()


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": _bert}


def _model(name="llama", num_tasks=T, projection=False, seed=5, **cfg):
    """A model with ``num_tasks`` distinct random prefixes (seeded, so tasks really differ)."""
    model = ptune_rt.apply(FACTORIES[name](), PrefixConfig(P, prefix_projection=projection, num_tasks=num_tasks,
                                                          **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix_encoder(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if projection else 1.0))
    return model


def _single_task_copy(model, task: int, projection=False):
    """A one-task model (PEFT's parameter shapes) holding task ``task``'s parameters of ``model``."""
    base = copy.deepcopy(model)
    ptune_rt.restore(base)
    single = ptune_rt.apply(base, PrefixConfig(P, prefix_projection=projection))
    enc = prefix_encoder(single)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.copy_(prefix_encoder(model).task_parameters(task)[n])
    return single


def _batch(side, rows=4, seq=7, seed=1):
    """(input_ids, attention_mask): rows 0 and 2 padded on ``side`` (None: no padding)."""
    ids = input_ids(rows, seq, seed=seed)
    mask = torch.ones_like(ids)
    if side == "right":
        mask[0, seq - 3:] = 0
        mask[2, seq - 1:] = 0
    elif side == "left":
        mask[0, :3] = 0
        mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _positions(mask):
    """Positions as a row alone numbers them (left padding: counted from the first real token)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)



def _run(model, ids, mask, tasks, side):
    kw = {"position_ids": _positions(mask)} if side == "left" else {}
    return main_output(model(input_ids=ids, attention_mask=mask, task_ids=tasks, **kw))


# ----------------------------------------------------------------------------------------
# config and encoder
# ----------------------------------------------------------------------------------------


def test_config_num_tasks():
    cfg = PrefixConfig(8, num_tasks=4, modules_to_save=("classifier",))
    assert cfg.modules_to_save == ["classifier"]
    assert PrefixConfig.from_json(cfg.to_json()) == cfg
    assert PrefixConfig(8).num_tasks == 1 and PrefixConfig(8).modules_to_save is None
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="PrefixConfig.num_tasks must be an integer >= 1"):
            PrefixConfig(8, num_tasks=bad)
    for bad in ("classifier", [1], [""]):
        with pytest.raises(ValueError, match="PrefixConfig.modules_to_save must be None or a list"):
            PrefixConfig(8, modules_to_save=bad)


@pytest.mark.parametrize("projection", [False, True])
def test_encoder_stacks_one_task_encoders(projection):
    """T tasks: every parameter gets a leading task dimension; task t's slice is a one-task encoder
    (PEFT's names and shapes) and E[t] is what that encoder computes."""
    multi = PrefixEncoder(3, 2, 2, 4, prefix_projection=projection, encoder_hidden_size=6, num_tasks=T)
    one = PrefixEncoder(3, 2, 2, 4, prefix_projection=projection, encoder_hidden_size=6)
    shapes = {n: tuple(p.shape) for n, p in one.named_parameters()}
    assert {n: tuple(p.shape) for n, p in multi.named_parameters()} == {n: (T,) + s for n, s in shapes.items()}
    e = multi()
    assert e.shape == (T, 3, multi.output_dim)
    for t in range(T):
        params = multi.task_parameters(t)
        assert {n: tuple(p.shape) for n, p in params.items()} == shapes
        with torch.no_grad():
            for n, p in one.named_parameters():
                p.copy_(params[n])
        torch.testing.assert_close(e[t], one(), rtol=1e-6, atol=1e-6)
        pk, pv = multi.layer_prefix(e, 1)
        rk, rv = one.layer_prefix(one(), 1)
        assert pk.shape == (T, 2, 3, 4)
        torch.testing.assert_close(pk[t], rk, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pv[t], rv, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"task must be an integer in \[0, num_tasks=3\)"):
        multi.task_parameters(3)
    if not projection:
        flat = torch.randn(3, multi.output_dim)
        multi.load_prompt_embeddings(flat, task=1)
        assert torch.equal(multi.embedding.weight[1], flat)
        with pytest.raises(ValueError, match="or pass task="):
            multi.load_prompt_embeddings(flat)


def test_one_task_keeps_peft_names_and_accepts_task_ids():
    model = _model(num_tasks=1)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad] == \
        [("prompt_encoder.default.embedding.weight", (P, 2 * 2 * 2 * 16))]
    ids, mask = _batch("right")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask, task_ids=torch.zeros(4, dtype=torch.long)).logits,
                           ref)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, task_ids=0).logits, ref)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, num_tasks=1\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 0, 0]))


# ----------------------------------------------------------------------------------------
# forward, backward, generate: each row as if alone
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,side,projection", [("llama", "right", False), ("llama", "left", False),
                                                  ("llama", "left", True), ("gpt2", "right", False),
                                                  ("gpt2", "left", False), ("bert", "right", False),
                                                  ("bert", "left", True)])
def test_mixed_forward_equals_rows_alone(name, side, projection):
    model = _model(name, projection=projection)
    ids, mask = _batch(side)
    tasks = torch.tensor(TASKS)
    with torch.no_grad():
        out = _run(model, ids, mask, tasks, side)
        singles = {t: _single_task_copy(model, t, projection) for t in set(TASKS)}
        diffs = []
        for i, t in enumerate(TASKS):
            real = mask[i].bool()
            alone = main_output(model(input_ids=ids[i:i + 1, real], task_ids=tasks[i:i + 1]))[0]
            diffs.append(assert_fp32_end_to_end_close(out[i, real], alone, f"{name} row {i} (task {t}) vs alone"))
            # the stacked path equals the one-task path on the task's own weights
            one = main_output(singles[t](input_ids=ids[i:i + 1, real]))[0]
            assert_fp32_end_to_end_close(out[i, real], one, f"{name} row {i} vs the one-task model of task {t}")
        # the prefix matters: another task gives another output
        other = _run(model, ids, mask, torch.tensor([1, 1, 1, 1]), side)
    assert (other[1] - out[1]).abs().max() > 1e-3
    print(f"{name} {side} projection={projection}: max |row in batch - row alone| = {max(diffs):.2e}")


@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("bert", False)])
def test_mixed_backward_per_task_gradients(name, projection):
    """The batch's gradient of each task equals the sum of its rows' gradients run alone; task 1 has
    no row and gets exactly zero."""
    model = _model(name, projection=projection)
    model.train()
    ids, mask = _batch("right")
    tasks = torch.tensor(TASKS)
    out = main_output(model(input_ids=ids, attention_mask=mask, task_ids=tasks))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * w).sum(-1) * mask).sum().backward()
    params = dict(prefix_encoder(model).named_parameters())
    batch = {n: p.grad.clone() for n, p in params.items()}
    alone = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(TASKS)):
        for p in params.values():
            p.grad = None
        real = mask[i].bool()
        o = main_output(model(input_ids=ids[i:i + 1, real], task_ids=tasks[i:i + 1]))[0]
        ((o * w[i, real]).sum(-1)).sum().backward()
        for n, p in params.items():
            alone[n] += p.grad
    diffs = {}
    for n in params:
        assert batch[n].shape[0] == T
        assert torch.count_nonzero(batch[n][1]) == 0, f"{n}: the task without rows got a gradient"
        for t in (0, 2):
            assert batch[n][t].abs().max() > 0, f"{n}: task {t} got no gradient"
        scale = alone[n].abs().max()
        diffs[n] = assert_fp32_end_to_end_close(batch[n] / scale, alone[n] / scale, f"{name} grad {n} (scaled)")
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prompt_encoder."))
    print(f"{name} projection={projection}: max scaled |batch grad - sum of rows alone| = {max(diffs.values()):.2e}")


def test_training_steps_move_only_the_tasks_in_the_batch():
    model = _model("llama")
    model.train()
    enc = prefix_encoder(model)
    before = enc.embedding.weight.detach().clone()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    ids, mask = _batch(None)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor(TASKS)).loss.backward()
        opt.step()
    after = enc.embedding.weight.detach()
    assert torch.equal(after[1], before[1])
    assert (after[0] - before[0]).abs().max() > 0 and (after[2] - before[2]).abs().max() > 0


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_generate_equals_rows_alone(name):
    model = _model(name)
    ids, mask = _batch("left", seq=6)
    tasks = torch.tensor(TASKS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **kw)
    for i, t in enumerate(TASKS):
        real = mask[i].bool()
        row = model.generate(input_ids=ids[i:i + 1, real], task_ids=tasks[i:i + 1], **kw)
        assert torch.equal(gen[i, -6:], row[0, -6:]), f"{name} row {i} (task {t})"
    # a hand-written decode loop with the cache (task_ids at every step) gives the same tokens
    with torch.no_grad():
        pos = _positions(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, task_ids=tasks, use_cache=True)
        toks, m = [], mask
        for _ in range(6):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            m = torch.cat([m, m.new_ones((m.shape[0], 1))], dim=1)
            out = model(input_ids=nxt, attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1,
                        past_key_values=out.past_key_values, task_ids=tasks, use_cache=True)
    assert torch.equal(torch.cat(toks, dim=1), gen[:, -6:])
    # different tasks really generate differently somewhere
    same_task = model.generate(input_ids=ids, attention_mask=mask, task_ids=torch.ones(4, dtype=torch.long), **kw)
    assert not torch.equal(same_task, gen)


def test_inner_model_takes_task_ids_and_checkpointing_keeps_them():
    model = _model("llama")
    ids, mask = _batch("right")
    tasks = torch.tensor(TASKS)
    with torch.no_grad():
        top = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
        inner = model.lm_head(model.model(input_ids=ids, attention_mask=mask, task_ids=tasks).last_hidden_state)
    assert torch.equal(top, inner)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=tasks).loss
    loss.backward()
    ref = prefix_encoder(model).embedding.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    loss_gc = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=tasks).loss
    loss_gc.backward()
    got = prefix_encoder(model).embedding.weight.grad
    assert loss_gc.item() == pytest.approx(loss.item(), rel=1e-6)
    assert_fp32_end_to_end_close(got / ref.abs().max(), ref / ref.abs().max(), "checkpointed mixed-task grad")


def test_triton_backend_mixed_tasks():
    """The fused Triton kernels (interpreted on CPU) on the task_ids path: logits and per-task
    gradients equal the torch backend's."""
    models = {b: _model("llama", backend=b) for b in ("torch", "triton")}
    ids, mask = _batch("right", rows=3, seq=5)
    tasks = torch.tensor([2, 0, 2])
    out, grads = {}, {}
    for b, m in models.items():
        m.train()
        o = m(input_ids=ids, attention_mask=mask, task_ids=tasks, labels=ids.masked_fill(mask == 0, -100))
        o.loss.backward()
        out[b], grads[b] = o.logits.detach(), prefix_encoder(m).embedding.weight.grad
    assert_fp32_end_to_end_close(out["triton"], out["torch"], "triton mixed-task logits")
    scale = grads["torch"].abs().max()
    assert_fp32_end_to_end_close(grads["triton"] / scale, grads["torch"] / scale, "triton mixed-task grads")
    assert torch.count_nonzero(grads["triton"][1]) == 0


def test_sdpa_fallback_takes_per_row_prefixes():
    """The unfused path (attention-probability dropout while training) gathers each row's prefix."""
    from ptune_rt.ops.prefix_attention import prefix_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, 8, generator=g)
    pk, pv = torch.randn(T, 2, 3, 8, generator=g), torch.randn(T, 2, 3, 8, generator=g)
    tasks = torch.tensor([2, 0, 2], dtype=torch.int32)
    ref = prefix_attention(q, k, v, pk, pv, task_ids=tasks, causal=True, sm_scale=0.3, backend="torch")
    got = attention_fn._sdpa_concat(q, k, v, pk, pv, None, True, 0.3, 0.0, tasks)
    assert_fp32_end_to_end_close(got, ref, "SDPA fallback with per-row prefixes")


# ----------------------------------------------------------------------------------------
# errors leave everything as it was; restore
# ----------------------------------------------------------------------------------------


def test_task_ids_are_read_once_per_forward_not_per_layer(monkeypatch):
    """Range-checking task ids reads their values (a device synchronization on a GPU): the model glue
    does it once per forward and the layers' attention op skips it; the op called directly checks."""
    from ptune_rt.ops import prefix_attention as op

    reads = []
    real_min = torch.Tensor.min

    def counting_min(self, *a, **k):
        reads.append(self.dtype)
        return real_min(self, *a, **k)

    model = _model("llama")
    ids, mask = _batch("right")
    tasks = torch.tensor(TASKS)
    monkeypatch.setattr(torch.Tensor, "min", counting_min)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, task_ids=tasks)
        assert len(reads) == 1, f"task ids read {len(reads)} times in one forward of 2 layers"
        reads.clear()
        model(input_ids=ids, attention_mask=mask, task_ids=tasks)  # the same tensor: validated already
        assert not reads
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    pk = torch.randn(T, 2, 2, 8, generator=g)
    with pytest.raises(ValueError, match=rf"task_ids must be in \[0, {T}\), got values in \[0, {T}\]"):
        op.prefix_attention(q, k, k, pk, pk, task_ids=torch.tensor([0, T]), backend="torch")


def test_bad_task_ids_raise_before_anything_runs():
    model = _model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    ids, mask = _batch("right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor(TASKS), use_cache=True)
    cache = out.past_key_values
    length = cache.get_seq_length()
    calls.clear()
    nxt = ids[:, :1]
    m2 = torch.cat([mask, mask.new_ones((4, 1))], dim=1)
    bad = [(torch.tensor([0, 3, 0, 0]), r"task_ids must be in \[0, num_tasks=3\), got values in \[0, 3\]"),
           (torch.tensor([0, -1, 0, 0]), r"task_ids must be in \[0, num_tasks=3\), got values in \[-1, 0\]"),
           (torch.tensor([0, 1]), r"task_ids must be an integer tensor \[batch=4\], got shape \(2,\)"),
           (torch.tensor([0.0, 1.0, 0.0, 0.0]), r"task_ids must be an integer tensor \[batch=4\].*float32"),
           (None, r"task_ids is required: this model has prefixes for num_tasks=3 tasks")]
    for tasks, match in bad:
        with pytest.raises(ValueError, match=match):
            model(input_ids=nxt, attention_mask=m2, past_key_values=cache, task_ids=tasks, use_cache=True)
        with pytest.raises(ValueError, match=match):
            model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    assert not calls, "a layer ran with invalid task_ids"
    assert cache.get_seq_length() == length, "the cache changed"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not prefix_inject.prefix_state(model).pending_tasks


def test_restore_removes_the_forward_wrapper():
    base = tiny_llama()
    model = copy.deepcopy(base)
    before = set(model.__dict__)
    ids, mask = _batch("right")
    ptune_rt.apply(model, PrefixConfig(P, num_tasks=2))
    import inspect

    assert "task_ids" in inspect.signature(model.forward).parameters
    twin = copy.deepcopy(model)  # a copy carries its own wrapper, bound to the copy
    assert twin.forward.model is twin
    ptune_rt.restore(model)
    assert set(model.__dict__) == before and "task_ids" not in inspect.signature(model.forward).parameters
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           base(input_ids=ids, attention_mask=mask).logits)
        twin(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1, 0]))


def test_prefix_refuses_a_model_with_a_soft_prompt():
    model = ptune_rt.apply(tiny_llama(), ptune_rt.PromptTuningConfig(4))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already has a 'prompt_encoder' module"):
        ptune_rt.apply(model, PrefixConfig(P, num_tasks=2))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not prefix_inject.has_prefix(model) and isinstance(model.prompt_encoder, nn.ModuleDict)
