"""Prefix-fused attention: Triton kernels (interpreter) and the op on both backends vs the eager
reference vs float64 (rule of ptune_rt/testing/tolerances.py)."""
import pytest
import torch

from ptune_rt.kernels import prefix_attention as K
from ptune_rt.ops.prefix_attention import prefix_attention
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.attention_cases import CASES, case_id, make_case, reference_and_gold

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def check(tag, dtype, got, ref, gold):
    for name, o, r, g in zip(NAMES, got, ref, gold):
        if name == "lse":  # the LSE is fp32 from rounded logits: judged like the output's dtype
            r, g = r.float(), g
        assert_close_to_reference(o, r, g, dtype, f"{tag}:{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_forward_backward(case, dtype):
    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*case, dtype)
    causal = case[7]
    pk, pv = pk.to(dtype), pv.to(dtype)
    if q.shape[2] == 1 and task_ids is None:
        out, lse = K.prefix_attention_decode(q, k, v, pk, pv, kv_mask)
    else:
        out, lse = K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, task_ids, causal)
    grads = K.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, kv_mask, task_ids, causal)
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, causal, do)
    check("kernel", dtype, (out, lse) + tuple(grads), ref, gold)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_op_autograd(case, dtype, backend):
    """The public op: autograd, fp32 prefix parameters cast inside, both backends."""
    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*case, dtype)
    causal = case[7]
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prefix_attention(*ins, kv_mask=kv_mask, task_ids=task_ids, causal=causal, backend=backend)
    out.backward(do)
    assert ins[3].grad.dtype == torch.float32  # gradient flows through the cast into fp32 params
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, causal, do)
    got = (out, None) + tuple(t.grad for t in ins)
    for name, o, r, g in zip(NAMES, got, ref, gold):
        if o is not None:
            assert_close_to_reference(o, r, g, dtype, f"op[{backend}]:{name}")


def test_decode_shares_the_prefix_across_rows():
    """The decode path reads the prefix as one [B*group, D] x [D, P] product per kv head: its result
    equals the plain forward pass (which walks the prefix per row)."""
    q, k, v, pk, pv, kv_mask, _, _ = make_case(4, 8, 2, 1, 11, 7, 64, True, "left", False, torch.float32)
    a, la = K.prefix_attention_decode(q, k, v, pk, pv, kv_mask)
    b, lb = K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, None, True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_rejects_bad_input():
    q, k, v, pk, pv, kv_mask, _, _ = make_case(2, 4, 2, 5, 5, 3, 32, True, "left", False, torch.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        prefix_attention(q[:, :3], k, v, pk, pv)
    with pytest.raises(ValueError, match="prefix_k must be"):
        prefix_attention(q, k, v, pk[:, :0], pv[:, :0])
    with pytest.raises(ValueError, match="prefix_k must be"):
        prefix_attention(q, k, v, pk[:1], pv[:1])
    with pytest.raises(ValueError, match="kv_mask"):
        prefix_attention(q, k, v, pk, pv, kv_mask=kv_mask[:, :3])
    with pytest.raises(ValueError, match="task_ids must be in"):
        prefix_attention(q, k, v, pk[None].expand(2, -1, -1, -1), pv[None].expand(2, -1, -1, -1),
                         task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="together with task_ids"):
        prefix_attention(q, k, v, pk[None], pv[None])
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        prefix_attention(q.double(), k.double(), v.double(), pk, pv)


@pytest.mark.parametrize("case", [c for c in CASES if c[3] == 1], ids=case_id)
def test_torch_decode_step_outside_autograd_matches_reference(case):
    """Without autograd, a one-token decode on the torch path takes one SDPA call over [prefix ; cache]."""
    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*case, torch.float32)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, kv_mask=kv_mask, task_ids=task_ids, causal=case[7], backend="torch")
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, case[7], do)
    assert_close_to_reference(out, ref[0], gold[0], torch.float32, "decode step")
