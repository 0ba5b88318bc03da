"""Fused LoRA kernels (Triton interpreter) and op (both backends) vs the eager reference vs float64."""
import pytest
import torch

from ptune_rt.kernels import lora as K
from ptune_rt.kernels._triton_utils import dropout_mask
from ptune_rt.ops.lora_linear import lora_linear
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.lora_cases import DTYPES, SHAPES, make_case, reference_and_gold

def check_all(name, dtype, got, ref, gold, adapter_dtype=torch.float32):
    """y and dx by the activation dtype's rule; dA and dB by the adapter dtype's (their arithmetic
    is done in that dtype on the same, already rounded, inputs)."""
    for what, o, r_, g_ in zip(("y", "dx", "dA", "dB"), got, ref, gold):
        rule = dtype if what in ("y", "dx") else adapter_dtype
        assert_close_to_reference(o, r_, g_, rule, f"{name}:{what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_forward_backward(dtype, shape):
    M, K_, N, r = shape
    x, w, b, a, bb = make_case(M, K_, N, r, dtype)
    scale = 2.0
    dy = torch.randn(M, N).to(dtype)
    y, S = K.lora_forward(x, w, b, a, bb, scale)
    dx, da, db = K.lora_backward(dy, x, S, w, a, bb, scale)
    ref, gold = reference_and_gold(x, w, b, a, bb, scale, None, 0.0, dy)
    assert y.dtype == dtype and S.dtype == torch.float32 and S.shape == (M, r)
    check_all("kernel", dtype, (y, dx, da, db), ref, gold)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["dropout", "conv1d_strided_nobias", "half_adapter"])
def test_kernel_variants(dtype, variant):
    M, K_, N, r = 45, 70, 50, 8
    p = 0.3 if variant == "dropout" else 0.0
    adapter_dtype = dtype if variant == "half_adapter" else torch.float32
    nobias = variant == "conv1d_strided_nobias"
    x, w, b, a, bb = make_case(M, K_, N, r, dtype, adapter_dtype, bias=not nobias, conv1d=nobias, strided=nobias)
    if nobias:
        assert not x.is_contiguous() and not w.is_contiguous()
    dy = torch.randn(M, N).to(dtype)
    seed = 1234
    y, S = K.lora_forward(x, w, b, a, bb, 0.5, p, seed)
    dx, da, db = K.lora_backward(dy, x, S, w, a, bb, 0.5, p, seed)
    keep = dropout_mask((M, K_), p, seed, x.device) if p > 0 else None
    if keep is not None:  # the mask is a real dropout mask of about the requested rate
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    ref, gold = reference_and_gold(x, w, b, a, bb, 0.5, keep, p, dy)
    check_all(f"kernel[{variant}]", dtype, (y, dx, da.to(adapter_dtype), db.to(adapter_dtype)), ref, gold,
              adapter_dtype)


def test_dropout_mask_depends_on_seed_only():
    m1 = dropout_mask((33, 47), 0.5, 7, "cpu")
    m2 = dropout_mask((33, 47), 0.5, 7, "cpu")
    m3 = dropout_mask((33, 47), 0.5, 8, "cpu")
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_autograd_matches_reference(backend, dtype):
    """The public op (3D input, autograd, bias gradient) on both backends."""
    Bt, T, K_, N, r = 3, 11, 40, 56, 4
    x, w, b, a, bb = make_case(Bt * T, K_, N, r, dtype)
    x = x.reshape(Bt, T, K_)
    dy = torch.randn(Bt, T, N).to(dtype)
    xs, As, Bs, bs = (t.detach().clone().requires_grad_() for t in (x, a, bb, b))
    y = lora_linear(xs, w, bs, As, Bs, 1.5, 0.0, backend=backend)
    y.backward(dy)
    ref, gold = reference_and_gold(x, w, b, a, bb, 1.5, None, 0.0, dy)
    check_all(f"op[{backend}]", dtype, (y, xs.grad, As.grad, Bs.grad), ref, gold)
    gb = dy.double().sum((0, 1))
    assert_close_to_reference(bs.grad, dy.sum((0, 1)), gb, dtype, "dbias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_op_dropout_torch_path_regenerates_mask(dtype):
    """With dropout the torch path's gradients equal the reference under the very mask forward used."""
    from ptune_rt.ops.lora_linear import _torch_keep
    M, K_, N, r, p, seed = 30, 24, 20, 4, 0.25, 99
    x, w, b, a, bb = make_case(M, K_, N, r, dtype)
    dy = torch.randn(M, N).to(dtype)
    xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    y = lora_linear(xs, w, b, As, Bs, 2.0, p, backend="torch", seed=seed)
    y.backward(dy)
    keep = _torch_keep((M, K_), p, seed, "cpu").bool()
    ref, gold = reference_and_gold(x, w, b, a, bb, 2.0, keep, p, dy)
    check_all("op[torch,dropout]", dtype, (y, xs.grad, As.grad, Bs.grad), ref, gold)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_torch_path_dropout_mask_statistics(p):
    """The torch path's keep-mask (four 16-bit words per 64-bit draw): 0/1 in the compute dtype, keep
    rate within 5 sigma of 1 - p, the words of a draw independent of each other and of their
    neighbours, seeds that differ give different masks, and one seed gives the same mask (backward
    regenerates it)."""
    from ptune_rt.ops.lora_linear import _torch_keep
    shape = (257, 999)  # odd element count: the last 64-bit draw is half used
    keep = _torch_keep(shape, p, 1234, "cpu", torch.float16)
    assert keep.dtype == torch.float16 and keep.shape == shape
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    keep = keep.bool()
    assert torch.equal(keep, _torch_keep(shape, p, 1234, "cpu").bool())
    n = keep.numel()
    q = 1.0 - p
    sigma = (q * p / n) ** 0.5
    assert abs(keep.double().mean().item() - q) < 5 * sigma
    flat = keep.flatten().double()
    for lag in (1, 2, 3, 4, 9):  # lags 1-3 pair words of one 64-bit draw
        a, b = flat[:-lag] - q, flat[lag:] - q
        corr = (a * b).mean().item() / (q * p)
        assert abs(corr) < 5 / (n - lag) ** 0.5, f"lag {lag}: correlation {corr}"
    other = _torch_keep(shape, p, 1235, "cpu").bool()
    assert abs((keep != other).double().mean().item() - 2 * p * q) < 5 * (2 * p * q / n) ** 0.5


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_torch_path_equals_the_custom_op(dtype, p):
    """In eager mode the torch path runs a plain autograd.Function; the custom op (what torch.compile
    sees) must give the very same output and gradients, bit for bit, bias and dropout included."""
    from ptune_rt.ops.lora_linear import lora_linear_fwd

    x, w, b, a, bb = make_case(37, 24, 20, 4, dtype)
    dy = torch.randn(37, 20).to(dtype)
    seed = torch.full((1,), 1234, dtype=torch.int64)
    outs = []
    for via_op in (False, True):
        xs, bs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, b, a, bb))
        if via_op:
            y, _ = lora_linear_fwd(xs, w, bs, As, Bs, 1.5, p, seed, "torch")
        else:
            y = lora_linear(xs, w, bs, As, Bs, 1.5, p, backend="torch", seed=1234)
        y.backward(dy)
        outs.append((y.detach(), xs.grad, bs.grad, As.grad, Bs.grad))
    for name, e, o in zip(("y", "dx", "dbias", "dA", "dB"), *outs):
        assert torch.equal(e, o), name


def test_op_rejects_bad_input():
    x, w, b, a, bb = make_case(4, 8, 6, 2, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        lora_linear(x.half(), w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="in_features=8"):
        lora_linear(x[:, :5], w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, w, b, a, bb, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="meta"):
        lora_linear(x, w.to("meta"), None, a, bb, 1.0)


def test_dropout_compiles_without_graph_breaks():
    """The dropout seed is drawn as a tensor, so torch.compile(fullgraph=True) traces it, and each call
    draws a fresh mask."""
    x, w, b, a, bb = make_case(6, 8, 10, 2, torch.float32)
    a.requires_grad_()
    f = torch.compile(lambda t: lora_linear(t, w, b, a, bb, 1.0, 0.3, backend="torch"), fullgraph=True)
    y1, y2 = f(x), f(x)
    assert not torch.equal(y1, y2)
    y1.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_inference_fast_path_equals_the_custom_op():
    """Without autograd the torch path skips the custom-op dispatch; the result is bit-identical."""
    x, w, b, a, bb = make_case(5, 24, 20, 4, torch.float32)
    with torch.no_grad():
        fast = lora_linear(x, w, b, a, bb, 1.5, backend="torch")
    slow = lora_linear(x, w, b, a.clone().requires_grad_(), bb, 1.5, backend="torch")
    assert slow.requires_grad and not fast.requires_grad
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 5])
def test_fused_kernel_channel_scales_and_z_out(dtype, rank):
    """The fused GEMM's input-channel scale (applied to each X tile as it loads), output-column
    scale (before the bias) and pre-scale output z, with and without a low-rank term: against the
    same formula in eager ``dtype`` and in float64."""
    M, K_, N = 37, 70, 45
    x, w, b, a, bb = make_case(M, K_, N, max(rank, 1), dtype)
    s = (x.float() @ a.float().t())[:, :rank].contiguous()
    bt = bb.float()[:, :rank].contiguous()
    in_scale = torch.rand(K_) + 0.5
    col_scale = torch.rand(N) + 0.5
    z = torch.empty(M, N, dtype=dtype)
    y = K.fused_lowrank_matmul(x, w, s, bt, bias=b, scale=0.7, in_scale=in_scale, col_scale=col_scale, z_out=z)

    def formula(cast):
        xs = (x.to(cast) * in_scale.to(cast)) if cast == torch.float64 else (x.float() * in_scale).to(dtype)
        zz = xs.to(cast) @ w.to(cast).t() + 0.7 * (s.to(cast) @ bt.to(cast).t())
        return zz, zz * col_scale.to(cast) + b.to(cast)

    z_ref, y_ref = (t.to(dtype) for t in formula(torch.float32))
    z_gold, y_gold = formula(torch.float64)
    assert_close_to_reference(y, y_ref, y_gold, dtype, "y")
    assert_close_to_reference(z, z_ref, z_gold, dtype, "z")
