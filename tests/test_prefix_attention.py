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


# ----------------------------------------------------------------------------------------
# task ids: any stride, any integer dtype; per-task prefix gradients summed deterministically
# ----------------------------------------------------------------------------------------

TASK_CASE = (3, 4, 2, 13, 13, 7, 32, True, "left", True)  # three rows, tasks [0, 2, 1]


def _strided(task_ids, dtype):
    """The same ids as a view with stride 2 (every other element of a longer tensor)."""
    wide = torch.stack([task_ids, torch.full_like(task_ids, 7)], dim=1).reshape(-1).to(dtype)
    view = wide[::2]
    assert view.stride(0) == 2 and torch.equal(view.long(), task_ids.long())
    return view


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8], ids=str)
def test_kernels_read_strided_task_ids(dtype):
    """task_ids as a stride-2 view: the kernels use its stride (reading it as contiguous picks the
    wrong prefix for every row after the first)."""
    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*TASK_CASE, torch.float32)
    tids = _strided(task_ids, dtype)
    out, lse = K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, tids, True)
    grads = K.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, kv_mask, tids, True, num_tasks=3)
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, True, do)
    check("strided task ids", torch.float32, (out, lse) + tuple(grads), ref, gold)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_takes_task_ids_of_any_integer_dtype_and_stride(backend):
    """int32 / int64 / int16 / uint8 task ids, contiguous or strided, give one result; float or bool
    ids are refused."""
    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*TASK_CASE, torch.float32)
    results = []
    for dtype in (torch.int32, torch.int64, torch.int16, torch.uint8):
        for tids in (task_ids.to(dtype), _strided(task_ids, dtype)):
            ins = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
            out = prefix_attention(*ins, kv_mask=kv_mask, task_ids=tids, backend=backend)
            out.backward(do)
            results.append((out,) + tuple(t.grad for t in ins))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, True, do)
    for name, o, r, g in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), results[0],
                             (ref[0],) + ref[2:], (gold[0],) + gold[2:]):
        assert_close_to_reference(o, r, g, torch.float32, f"op[{backend}]:{name}")
    for bad in (task_ids.float(), task_ids.bool()):
        with pytest.raises(ValueError, match="integer tensor"):
            prefix_attention(q, k, v, pk, pv, kv_mask=kv_mask, task_ids=bad, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_task_prefix_gradients_are_deterministic_without_index_add(backend, monkeypatch):
    """The per-task prefix gradient sums never call index_add_ (atomics on CUDA, so run-to-run
    differences there): two runs are bit-identical and match the reference."""
    def no_index_add(*args, **kwargs):
        raise AssertionError("index_add_ is not deterministic on CUDA")

    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(3, 8, 2, 13, 13, 7, 32, True, "right", True,
                                                        torch.float16)
    task_ids = torch.tensor([1, 0, 1], dtype=torch.int32)  # task 1 sums two rows, task 2 has none
    runs = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "index_add_", no_index_add)
            out = prefix_attention(*ins, kv_mask=kv_mask, task_ids=task_ids, backend=backend)
            out.backward(do)
        runs.append((out,) + tuple(t.grad for t in ins))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.count_nonzero(runs[0][4][2]) == 0 and torch.count_nonzero(runs[0][5][2]) == 0
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, True, do)
    for name, o, r, g in (("dprefix_k", runs[0][4], ref[5], gold[5]), ("dprefix_v", runs[0][5], ref[6], gold[6])):
        assert_close_to_reference(o, r, g, torch.float16, f"op[{backend}]:{name}")


# ----------------------------------------------------------------------------------------
# head dims
# ----------------------------------------------------------------------------------------


def test_head_dims_above_128_are_refused_on_the_triton_path():
    """The kernels are built and checked for head dims up to 128: a larger one is a clear error in
    the kernel wrapper and in the op's backend choice; the torch path still runs it."""
    q, k, v, pk, pv, kv_mask, _, do = make_case(2, 4, 2, 5, 5, 3, 160, True, "left", False, torch.float32)
    with pytest.raises(ValueError, match=r"head_dim=160.*32, 64, 80, 96, 128"):
        K.prefix_attention_forward(q, k, v, pk, pv, kv_mask)
    with pytest.raises(ValueError, match=r"backend='triton'.*head_dim=160.*32, 64, 80, 96, 128"):
        prefix_attention(q, k, v, pk, pv, kv_mask=kv_mask, backend="triton")
    out = prefix_attention(q, k, v, pk, pv, kv_mask=kv_mask, backend="torch")
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, None, True, do)
    assert_close_to_reference(out, ref[0], gold[0], torch.float32, "torch path, head_dim 160")


def test_shipped_configs_depend_on_dtype_and_head_tile():
    """fp32 with the 128-wide head tile (head dims 80, 96, 128) has its own spill-free lists."""
    for name in ("fwd", "dq", "dkdv"):
        for D in K.HEAD_DIMS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                configs = K.shipped_configs(name, dtype, D)
                assert configs and K.decode_config(name, dtype, D) in configs
        assert K.shipped_configs(name, torch.float32, 96) is K.shipped_configs(name, torch.float32, 128)
        assert K.shipped_configs(name, torch.float32, 128) != K.shipped_configs(name, torch.float32, 64)
