"""Projections that read one input (q/k/v, gate/up) train as one group
(``LoRAConfig.group_projections``, on by default): one shrink GEMM, one dA GEMM and one dX buffer.

The op is checked against the eager reference and float64 by the project's tolerance rule; on
models, the grouped step is checked against the same model with the groups off, and every path
that must not group (dropout, hooks, projections on different inputs, no grad) is checked to run
its own way."""
import copy
import pickle
import sys

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.methods.lora import LoRALinear
from ptune_rt.methods.lora.groups import disable_projection_groups, enable_projection_groups
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.lora_cases import reference_and_gold
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import input_ids, randomize_lora_b, tiny_bert, tiny_llama, tiny_qwen2

LL = sys.modules["ptune_rt.ops.lora_linear"]  # the module (ptune_rt.ops.lora_linear is the function)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _functions(lora_functions):
    """What these tests check runs in the op's autograd.Functions, which batches above
    SMALL_BATCH_ROWS rows take (the tiny test batches would take the small-batch path)."""


def group_nodes(t: torch.Tensor) -> int:
    """How many grouped LoRA nodes the autograd graph behind ``t`` holds."""
    seen, stack, n = set(), [t.grad_fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == "_TorchLoRAGroupBackward"
        stack.extend(g for g, _ in f.next_functions)
    return n


# -- the op -----------------------------------------------------------------------------------


def _members(K, Ns, ranks, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (N, r) in enumerate(zip(Ns, ranks)):
        w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        a = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_()
        bb = (torch.randn(N, r, generator=g) / r**0.5).to(dtype).requires_grad_()
        out.append((w, b, a, bb, 0.5 + i))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_group_op_matches_reference(dtype, bias):
    """Three members with different widths and ranks (q/k/v-like): every output and gradient
    (x, each A, each B) against the eager reference and float64."""
    K, Ns, ranks = 45, (53, 21, 21), (5, 3, 8)
    members = _members(K, Ns, ranks, dtype, bias)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 19, K, generator=g).to(dtype).requires_grad_()
    dys = [torch.randn(2, 19, N, generator=g).to(dtype) for N in Ns]
    outs = LL.lora_linear_group(x, members)
    assert group_nodes(outs[0]) == 1
    torch.autograd.backward(outs, dys)
    dx = x.grad
    ref_dx = gold_dx = 0
    for i, ((w, b, a, bb, s), y, dy) in enumerate(zip(members, outs, dys)):
        ref, gold = reference_and_gold(x.detach().reshape(-1, K), w, b, a, bb, s, None, 0.0, dy.reshape(-1, dy.shape[-1]))
        assert_close_to_reference(y.detach().reshape(-1, y.shape[-1]), ref[0], gold[0], dtype, f"y[{i}]")
        assert_close_to_reference(a.grad, ref[2], gold[2], dtype, f"dA[{i}]")
        assert_close_to_reference(bb.grad, ref[3], gold[3], dtype, f"dB[{i}]")
        ref_dx, gold_dx = ref_dx + ref[1].double(), gold_dx + gold[1]
    # the eager sum of per-member dX in the working dtype, rounded as autograd would add them
    assert_close_to_reference(dx.reshape(-1, K), ref_dx.to(dtype), gold_dx, dtype, "dX")


def test_group_op_respects_needs_input_grad():
    members = _members(16, (8, 8), (2, 2), torch.float32, bias=True)
    members[1][2].requires_grad_(False)  # a frozen A
    members[0][1].requires_grad_()  # a trainable bias
    x = torch.randn(5, 16)  # no grad for x
    y0, y1 = LL.lora_linear_group(x, members)
    (y0.sum() + y1.sum()).backward()
    assert members[1][2].grad is None and members[0][2].grad is not None
    assert torch.allclose(members[0][1].grad, torch.full((8,), 5.0))


def test_group_op_bad_input_is_named():
    members = _members(16, (8, 8), (2, 2), torch.float32, bias=False)
    with pytest.raises(ValueError, match="last dimension in_features=16"):
        LL.lora_linear_group(torch.randn(3, 15), members)
    with pytest.raises(ValueError, match=r"members\[1\] must be"):
        LL.lora_linear_group(torch.randn(3, 16), [members[0], members[1][:4]])
    half = [(w.half(), None, a.detach(), bb.detach(), s) for w, _, a, bb, s in members]
    with pytest.raises(TypeError, match=r"members\[0\]: lora_A / lora_B are torch.float32"):
        LL.lora_linear_group(torch.randn(3, 16).half(), half)
    with pytest.raises(ValueError, match="at least one"):
        LL.lora_linear_group(torch.randn(3, 16), [])


# -- on models --------------------------------------------------------------------------------


def pair(factory, **kw):
    kw.setdefault("target_modules", ALL)
    base = factory()
    grouped = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0, **kw))
    randomize_lora_b(grouped)
    separate = copy.deepcopy(grouped)
    disable_projection_groups(separate)
    return grouped, separate


def step(model, ids, seed=7):
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    nodes = group_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, nodes


def assert_close_steps(a, b):
    assert_fp32_end_to_end_close(a[0], b[0], "loss")
    assert set(a[1]) == set(b[1])
    for n in a[1]:
        assert_fp32_end_to_end_close(a[1][n], b[1][n], n)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_grouped_training_matches_separate_layers(factory):
    grouped, separate = pair(factory)
    ids = input_ids()
    g, s = step(grouped, ids), step(separate, ids)
    layers = grouped.config.num_hidden_layers
    assert g[2] == 2 * layers and s[2] == 0  # q/k/v and gate/up of every layer, one node each
    assert_close_steps(g, s)
    # no sibling is left holding an output after the step
    assert all(m._stash is None for m in grouped.modules() if isinstance(m, LoRALinear))
    rows = {r["module"]: r["input_group"] for r in ptune_rt.report(grouped)}
    assert rows["model.layers.0.self_attn.k_proj"] == "q_proj+k_proj+v_proj"
    assert rows["model.layers.0.mlp.up_proj"] == "gate_proj+up_proj"
    assert rows["model.layers.0.self_attn.o_proj"] is None and rows["model.layers.0.mlp.down_proj"] is None


def test_bert_query_key_value_group():
    base = tiny_bert()
    model = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, target_modules=["query", "key", "value"]))
    randomize_lora_b(model)
    separate = copy.deepcopy(model)
    disable_projection_groups(separate)
    ids = input_ids()
    outs = []
    for m in (model, separate):
        m.train()
        y = m(input_ids=ids).logits
        outs.append((y, group_nodes(y)))
        y.pow(2).mean().backward()
    assert outs[0][1] == base.config.num_hidden_layers and outs[1][1] == 0
    assert_fp32_end_to_end_close(outs[0][0].detach(), outs[1][0].detach(), "logits")
    gs = {n: p.grad for n, p in separate.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_fp32_end_to_end_close(p.grad, gs[n], n)


def test_gradient_checkpointing_groups_in_the_recomputation():
    grouped, separate = pair(tiny_llama)
    for m in (grouped, separate):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = input_ids()
    assert_close_steps(step(grouped, ids), step(separate, ids))


def test_paths_that_do_not_group():
    grouped, _ = pair(tiny_llama, dropout=0.1)
    ids = input_ids()
    assert step(grouped, ids)[2] == 0  # dropout: each layer draws its own mask
    grouped.eval()
    assert step_eval_nodes(grouped, ids) == 2 * grouped.config.num_hidden_layers  # eval with grad: no dropout

    off = ptune_rt.apply(tiny_llama(), LoRAConfig(r=4, target_modules=ALL, group_projections=False))
    assert step(off, ids)[2] == 0
    assert all(r["input_group"] is None for r in ptune_rt.report(off))
    with torch.no_grad():  # inference takes the per-layer decode path
        off(input_ids=ids)


def step_eval_nodes(model, ids):
    y = model(input_ids=ids, labels=ids).loss
    n = group_nodes(y)
    y.backward()
    model.zero_grad(set_to_none=True)
    return n


def test_a_hooked_member_runs_the_group_off_and_sees_its_own_output():
    grouped, separate = pair(tiny_llama)
    seen = {}
    k = grouped.model.layers[0].self_attn.k_proj

    def hook(mod, args, out):
        seen.setdefault("k", out.detach().clone())  # returns None: the output stays the layer's

    h = k.register_forward_hook(hook)
    ids = input_ids()
    g = step(grouped, ids)
    assert g[2] == 2 * grouped.config.num_hidden_layers - 1  # layer 0's q/k/v run as separate layers
    want = separate.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        x = separate.model.layers[0].input_layernorm(separate.model.embed_tokens(ids))
        assert_fp32_end_to_end_close(seen["k"], want(x), "hooked k_proj output")
    assert_close_steps(g, step(separate, ids))
    h.remove()
    assert step(grouped, ids)[2] == 2 * grouped.config.num_hidden_layers


class TwoInputs(nn.Module):
    """q and k projections called on different tensors (cross-attention style)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 12)
        self.k_proj = nn.Linear(12, 12)

    def forward(self, x, y):
        return self.q_proj(x) * self.k_proj(y)


def test_projections_on_different_inputs_stay_correct_and_ungroup():
    torch.manual_seed(0)
    model = ptune_rt.apply(TwoInputs(), LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]))
    ref = copy.deepcopy(model)
    disable_projection_groups(ref)
    randomize_lora_b(model)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(3, 12), torch.randn(3, 12)
    # first call: q_proj computes the group, k_proj finds an output computed for another tensor,
    # switches the group off and computes its own; from then on both run alone
    assert_fp32_end_to_end_close(model(x, y).detach(), ref(x, y).detach(), "first call")
    assert model.q_proj._group is None and model.k_proj._group is None and model.k_proj._stash is None
    assert torch.equal(model(x, y), ref(x, y))
    assert model.k_proj._stash is None


def test_restore_pickle_and_deepcopy_drop_the_links():
    grouped, _ = pair(tiny_llama)
    ids = input_ids()
    grouped.train()
    grouped(input_ids=ids)  # a full forward: every stash consumed
    grouped.model.layers[0].self_attn.k_proj._stash = (ids, torch.zeros(1))  # as mid-forward
    clone = pickle.loads(pickle.dumps(grouped))
    assert clone.model.layers[0].self_attn.k_proj._stash is None
    g = clone.model.layers[0].self_attn.k_proj._group
    assert g is not None and g[0] is clone.model.layers[0].self_attn.q_proj  # links point inside the copy
    ptune_rt.restore(grouped)
    assert not any(isinstance(m, LoRALinear) for m in grouped.modules())


def test_config_flag_round_trips():
    cfg = LoRAConfig(r=4, group_projections=False)
    assert LoRAConfig.from_json(cfg.to_json()).group_projections is False
    old = cfg.to_dict()
    old.pop("group_projections")  # a config written before the field existed
    assert LoRAConfig.from_dict(old).group_projections is True
    with pytest.raises(ValueError, match="group_projections must be True or False"):
        LoRAConfig(r=4, group_projections=1)


def test_enable_after_disable_links_the_same_groups():
    grouped, separate = pair(tiny_llama)
    names = enable_projection_groups(separate)
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in names
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in names
    assert len(names) == 2 * grouped.config.num_hidden_layers
