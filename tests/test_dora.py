"""DoRA: the op (both backends, Triton under the interpreter) vs PEFT's formula in eager and float64,
the weight norm by expansion vs the materialized norm."""
import pytest
import torch

from ptune_rt.ops.dora_linear import dora_linear, materialized_weight_norm, weight_norm
from ptune_rt.reference import dora_linear_reference
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.lora_cases import DTYPES, make_case

SHAPES = [(37, 45, 53, 5), (19, 130, 33, 32), (1, 40, 72, 1)]


def _magnitude(w, a, bb, scale):
    """A magnitude near the adapted norm, not equal to it (so m / norm is not 1)."""
    g = torch.Generator().manual_seed(7)
    return (materialized_weight_norm(w, a, bb, scale).float() * (0.5 + torch.rand(w.shape[0], generator=g)))


def _reference_and_gold(x, w, b, a, bb, m, scale, dy):
    outs = {}
    for tag, cast in (("ref", lambda t: t), ("gold", lambda t: t.double())):
        xs, As, Bs, ms = (cast(t.detach()).requires_grad_() for t in (x, a, bb, m))
        y = dora_linear_reference(xs, cast(w), None if b is None else cast(b), As, Bs, ms, scale)
        y.backward(cast(dy))
        outs[tag] = (y.detach(), xs.grad, As.grad, Bs.grad, ms.grad)
    return outs["ref"], outs["gold"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_peft_formula(backend, dtype, shape):
    M, K_, N, r = shape
    x, w, b, a, bb = make_case(M, K_, N, r, dtype)
    scale = 1.5
    m = _magnitude(w, a, bb, scale)
    dy = torch.randn(M, N).to(dtype)
    xs, As, Bs, ms = (t.detach().clone().requires_grad_() for t in (x, a, bb, m))
    y = dora_linear(xs, w, b, As, Bs, ms, scale, backend=backend)
    y.backward(dy)
    ref, gold = _reference_and_gold(x, w, b, a, bb, m, scale, dy)
    for what, got, r_, g_ in zip(("y", "dx", "dA", "dB", "dm"), (y, xs.grad, As.grad, Bs.grad, ms.grad), ref, gold):
        rule = dtype if what in ("y", "dx") else torch.float32
        # dm sums dY * z over the batch with z rounded to the activation dtype, as PEFT's base output is
        rule = dtype if what == "dm" else rule
        assert_close_to_reference(got, r_, g_, rule, f"dora[{backend}]:{what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_norm_expansion_vs_materialized(dtype):
    """||W + s B A|| by the expansion (fp32, no N x K temporary) against float64 materialized, next to
    what materializing in fp32 gives: the expansion's error stays within the fp32 rule."""
    N, K_, r = 96, 200, 16
    _, w, _, a, bb = make_case(3, K_, N, r, dtype)
    for s in (1e-3, 1.0, 8.0):  # small to large adapter updates against W
        got = weight_norm(w, a, bb, s)
        assert got.dtype == torch.float32 and got.shape == (N,)
        gold = materialized_weight_norm(w, a, bb, s)
        ref = materialized_weight_norm(w, a, bb, s, torch.float32)
        assert_close_to_reference(got, ref, gold, torch.float32, f"norm s={s}")


def test_bad_magnitude_is_refused():
    x, w, b, a, bb = make_case(4, 16, 12, 4, torch.float32)
    with pytest.raises(ValueError, match="magnitude must be a floating \\[out_features=12\\]"):
        dora_linear(x, w, b, a, bb, torch.ones(11), 1.0)


def _dropout_reference(x, w, b, a, bb, m, scale, keep, p, dy):
    """PEFT's DoRA formula with dropout (x_d = keep * x / (1 - p)), in x's dtype and in float64."""
    outs = {}
    for tag, cast in (("ref", lambda t: t), ("gold", lambda t: t.double())):
        xs, As, Bs, ms = (cast(t.detach()).requires_grad_() for t in (x, a, bb, m))
        ws, bs = cast(w), cast(b)
        norm = materialized_weight_norm(ws, As.detach(), Bs.detach(), scale,
                                        ws.dtype if tag == "gold" else xs.dtype).to(ms.dtype)
        mns = ms / norm
        xd = xs * keep.to(xs.dtype) / (1 - p)
        lowrank = (xd.to(As.dtype) @ As.t()) @ Bs.t()
        y = (xs @ ws.t() + bs).to(mns.dtype) + (mns - 1) * (xd @ ws.t()).to(mns.dtype) + mns * lowrank * scale
        y = y.to(xs.dtype)
        y.backward(cast(dy))
        outs[tag] = (y.detach(), xs.grad, As.grad, Bs.grad, ms.grad)
    return outs["ref"], outs["gold"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_with_dropout_matches_peft_formula(backend, dtype):
    """With dropout, both products over W from one pass (Triton) or the regenerated mask (torch): against
    PEFT's formula with the same keep-mask."""
    from ptune_rt.kernels._triton_utils import dropout_mask
    from ptune_rt.ops.lora_linear import _torch_keep

    M, K_, N, r, p, seed = 37, 45, 53, 5, 0.3, 1234
    x, w, b, a, bb = make_case(M, K_, N, r, dtype)
    scale = 1.5
    m = _magnitude(w, a, bb, scale)
    dy = torch.randn(M, N).to(dtype)
    xs, As, Bs, ms = (t.detach().clone().requires_grad_() for t in (x, a, bb, m))
    y = dora_linear(xs, w, b, As, Bs, ms, scale, dropout_p=p, backend=backend, seed=seed)
    y.backward(dy)
    keep = dropout_mask((M, K_), p, seed, "cpu") if backend == "triton" else _torch_keep((M, K_), p, seed, "cpu") > 0
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    ref, gold = _dropout_reference(x, w, b, a, bb, m, scale, keep, p, dy)
    for what, got, r_, g_ in zip(("y", "dx", "dA", "dB", "dm"), (y, xs.grad, As.grad, Bs.grad, ms.grad), ref, gold):
        rule = dtype if what in ("y", "dx", "dm") else torch.float32
        assert_close_to_reference(got, r_, g_, rule, f"dora dropout[{backend}]:{what}")
