"""The small-batch training path: at most SMALL_BATCH_ROWS rows per LoRA linear run as plain torch
ops under autograd (no Python autograd.Function), with the same results and the same saved tensors
as the op's path, and only where it applies."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.ops import lora_dispatch
from ptune_rt.testing import assert_close_to_reference

from helpers_models import input_ids, peft_lora_model, randomize_lora_b, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: the op's autograd.Functions (one linear, a projection group, the SwiGLU recompute)
FUNCTION_NODES = {"_TorchLoRABackward", "_TorchLoRAGroupBackward", "_SwiGLULoRABackward"}


def node_names(t: torch.Tensor) -> set:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


def model(dropout=0.0, dtype=torch.float32, **kw):
    m = ptune_rt.apply(tiny_llama(dtype=dtype), LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=ALL, **kw))
    randomize_lora_b(m)
    return m


def loss_of(m, ids):
    return m(input_ids=ids, labels=ids).loss


def test_threshold_picks_the_path():
    m = model()
    rows = lora_dispatch.SMALL_BATCH_ROWS
    assert rows >= 1
    small = node_names(loss_of(m, input_ids(batch=1, seq=rows)))
    assert not small & FUNCTION_NODES and "AddmmBackward0" in small
    large = node_names(loss_of(m, input_ids(batch=1, seq=rows + 1)))
    assert large >= FUNCTION_NODES  # groups for q/k/v and gate/up, the recompute MLP, o_proj alone


def test_same_loss_and_gradients_as_the_functions(monkeypatch):
    base = tiny_llama()
    m = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=ALL))
    randomize_lora_b(m)
    ids = input_ids(batch=2, seq=8)
    # the float64 reference: PEFT on the same weights (ptune-rt's op takes fp32 / fp16 / bf16 only)
    gold_model = peft_lora_model(copy.deepcopy(base).double(), ALL, r=4, alpha=8)
    gold_model.load_state_dict({"base_model.model." + n: p.double() for n, p in m.state_dict().items()})

    def run(mm):
        mm.zero_grad(set_to_none=True)
        loss = loss_of(mm, ids)
        loss.backward()
        return loss.detach(), {n.removeprefix("base_model.model."): p.grad for n, p in mm.named_parameters()
                               if p.requires_grad}

    small_loss, small = run(m)
    monkeypatch.setattr(lora_dispatch, "SMALL_BATCH_ROWS", 0)
    fn_loss, fns = run(m)
    gold_loss, gold = run(gold_model)
    assert len(small) == 2 * 7 * 2 and set(small) == set(fns)
    assert_close_to_reference(small_loss, fn_loss, gold_loss, torch.float32, "loss")
    for n in small:
        assert small[n].abs().max() > 0, n
        assert_close_to_reference(small[n], fns[n], gold[n], torch.float32, f"grad {n}")


def test_saves_x_and_the_shrink_only():
    layer = ptune_rt.apply(nn.Sequential(nn.Linear(48, 40)), LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    randomize_lora_b(layer)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(6, 48, requires_grad=True)
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert "AddmmBackward0" in node_names(y) and not node_names(y) & FUNCTION_NODES
    assert sorted(saved.values()) == [(6, 4), (6, 48)]  # S [M, r] and x [M, K]; nothing M x N


@pytest.mark.parametrize("case", ["dropout", "half base, fp32 adapters", "triton backend"])
def test_not_taken_where_it_does_not_apply(case, monkeypatch):
    if case == "dropout":  # the op regenerates the mask in backward instead of saving it
        m = model(dropout=0.1)
        m.train()
    elif case == "half base, fp32 adapters":  # the op's casts, as PEFT does them
        m = model(dtype=torch.bfloat16)
    else:
        m = model(backend="triton")
    taken = []
    orig = lora_dispatch._is_small_batch
    monkeypatch.setattr(lora_dispatch, "_is_small_batch", lambda x, args: (lambda t: (taken.append(t), t)[1])(orig(x, args)))
    loss = loss_of(m, input_ids(batch=1, seq=8))
    assert taken and not any(taken)
    if case != "triton backend":  # (the Triton path is the custom op's autograd)
        assert node_names(loss) & FUNCTION_NODES
    if case == "dropout":  # nor does the MLP skip its recompute for it
        assert "_SwiGLULoRABackward" in node_names(loss)


def test_bad_input_keeps_its_error():
    layer = ptune_rt.apply(nn.Sequential(nn.Linear(48, 40)), LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the frozen weight has torch.float32"):
        layer(torch.randn(3, 48, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        layer([[0.0] * 48])
    layer.double()  # float64 on the torch path runs as plain torch ops (a reference run), small batch or large
    m = layer[0]
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
    for rows in (3, 100):
        x = torch.randn(rows, 48, dtype=torch.float64, requires_grad=True)
        low = (x @ m.lora_A["default"].weight.t()) @ m.lora_B["default"].weight.t()
        torch.testing.assert_close(layer(x), torch.addmm(m.bias, x, m.weight.t()) + m.scaling["default"] * low)
