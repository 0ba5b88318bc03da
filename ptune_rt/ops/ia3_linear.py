"""The fused IA3 linear op: a frozen linear layer whose output or input channels a trainable
vector ``l`` scales (Liu et al. 2022, "(IA)^3"), with PEFT's formulas:

* output scale (keys, values): ``y = (x W^T + b) * l``, l [N];
* input scale (``feedforward``: the FFN's down projection): ``y = (x * l) W^T + b``, l [K].

Registered as the torch custom ops ``ptune_rt::ia3_linear_fwd`` / ``ptune_rt::ia3_linear_bwd``
with fake implementations and an autograd formula, so ``torch.compile`` sees one op per layer. Two
backends:

* ``triton``: the fused GEMM of ``ptune_rt.kernels.lora`` at rank 0. Output scale: forward is one
  launch with ``col_scale=l`` and the bias pre-scaled (``b * l``, an N-vector), its ``z_out``
  keeping ``x W^T`` for ``dl``; backward ``dX`` is one launch on ``W^T`` (a view) with
  ``in_scale=l`` scaling dY's columns as its tiles load. Input scale: forward is one launch with
  ``in_scale=l`` (each x tile scaled as it loads, never an M x K scaled copy); backward one launch
  ``dX = (dY W) * l`` (``col_scale=l``) whose ``z_out`` keeps ``dY W`` for ``dl``.
  ``dl`` is a column sum of a product of two saved / computed tensors (torch);
* ``torch``: the same math as torch ops, rounded as PEFT rounds (a half-precision activation is
  scaled in the vector's dtype and cast back); in eager mode through a plain
  ``autograd.Function`` (the custom op's dispatch costs more than a small layer's matmuls on CPU).

Saved for backward: output scale ``x W^T`` (``+ b`` on the torch path) [M, N], as PEFT's
``result * l`` saves its ``result``; input scale ``x`` [M, K], as PEFT's ``x * l`` does. ``y / l``
is never used to recover ``x W^T``: it is wrong where an entry of ``l`` is 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend

#: Activation dtypes of the fused op; float64 runs on the torch path only (a reference run).
OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_DTYPES = OP_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------


def scale_channels(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` broadcast over rows, computed in the vector's dtype where it is wider (fp32
    vectors beside half activations, as PEFT does) and returned in ``t``'s dtype."""
    if t.dtype == scale.dtype:
        return t * scale
    return (t.to(scale.dtype) * scale).to(t.dtype)


def _colsum_product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_rows(a * b)`` in ``dtype`` (the vector's: fp32 beside half activations)."""
    if a.dtype != dtype:
        a, b = a.to(dtype), b.to(dtype)
    return torch.linalg.vecdot(a.t(), b.t())  # one reduction per column, no [M, C] product kept


def _torch_forward(x, weight, bias, scale, feedforward):
    """(y, saved): saved is x W^T + b (output scale) or None (input scale: backward reads x)."""
    if feedforward:
        xs = scale_channels(x, scale)
        return (torch.addmm(bias, xs, weight.t()) if bias is not None else xs @ weight.t()), None
    z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return scale_channels(z, scale), z


def _torch_backward(dy, saved, x, weight, bias, scale, feedforward, need_dx):
    """(dx or None, dscale in the vector's dtype); ``saved`` as :func:`_torch_forward` returns it."""
    if feedforward:
        g = dy @ weight  # the gradient reaching the base layer's input
        return (scale_channels(g, scale) if need_dx else None), _colsum_product(x, g, scale.dtype)
    dscale = _colsum_product(dy, saved, scale.dtype)
    return ((scale_channels(dy, scale) @ weight) if need_dx else None), dscale


# ----------------------------------------------------------------------------------------
# Triton path (the fused GEMM at rank 0)
# ----------------------------------------------------------------------------------------


def _no_rank(t: Tensor, rows: int) -> Tensor:
    return t.new_empty((rows, 0), dtype=torch.float32)


def _triton_forward(x, weight, bias, scale, feedforward):
    from ptune_rt.kernels import lora as K

    M, N = x.shape[0], weight.shape[0]
    s, bt = _no_rank(x, M), _no_rank(x, N)
    if feedforward:
        return K.fused_lowrank_matmul(x, weight, s, bt, bias=bias, in_scale=scale.contiguous()), None
    z = torch.empty((M, N), device=x.device, dtype=x.dtype)
    col = scale.contiguous()
    bias_scaled = bias.float() * col if bias is not None else None  # the bias after the scale, an N-vector
    y = K.fused_lowrank_matmul(x, weight, s, bt, bias=bias_scaled, col_scale=col, z_out=z)
    return y, z


def _triton_backward(dy, saved, x, weight, bias, scale, feedforward, need_dx):
    from ptune_rt.kernels import lora as K

    M, K_ = dy.shape[0], weight.shape[1]
    s, bt = _no_rank(dy, M), _no_rank(dy, K_)
    col = scale.contiguous()
    wt = weight.t()  # [K, N] view: dY W as a GEMM against W^T
    if feedforward:
        g = torch.empty((M, K_), device=dy.device, dtype=dy.dtype)
        dx = K.fused_lowrank_matmul(dy, wt, s, bt, col_scale=col, z_out=g)
        return (dx if need_dx else None), _colsum_product(x, g, scale.dtype)
    # dl = colsum(dY * (x W^T + b)) = colsum(dY * z) + b * colsum(dY): z was saved without the bias
    dscale = _colsum_product(dy, saved, scale.dtype)
    if bias is not None:
        dscale = dscale + bias.to(scale.dtype) * dy.sum(0, dtype=scale.dtype)
    dx = K.fused_lowrank_matmul(dy, wt, s, bt, in_scale=col) if need_dx else None
    return dx, dscale


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@torch.library.custom_op("ptune_rt::ia3_linear_fwd", mutates_args=())
def ia3_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, feedforward: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """2D forward: (y [M, N], saved: the base output [M, N] for an output scale, empty otherwise)."""
    run = _triton_forward if backend == "triton" else _torch_forward
    y, saved = run(x, weight, bias, scale, feedforward)
    return y, (saved if saved is not None else _empty(x))


@ia3_linear_fwd.register_fake
def _(x, weight, bias, scale, feedforward, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (_empty(x) if feedforward else x.new_empty((x.shape[0], weight.shape[0])))


@torch.library.custom_op("ptune_rt::ia3_linear_bwd", mutates_args=())
def ia3_linear_bwd(dy: Tensor, saved: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor,
                   feedforward: bool, backend: str, need_dx: bool) -> tuple[Tensor, Tensor]:
    """(dx [M, K] or an empty tensor when not needed, dscale shaped and typed as ``scale``)."""
    run = _triton_backward if backend == "triton" else _torch_backward
    dx, dscale = run(dy, saved, x, weight, bias, scale, feedforward, need_dx)
    return (dx if dx is not None else _empty(x)), dscale.to(scale.dtype)


@ia3_linear_bwd.register_fake
def _(dy, saved, x, weight, bias, scale, feedforward, backend, need_dx):
    return (dy.new_empty((dy.shape[0], weight.shape[1])) if need_dx else _empty(dy)), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, feedforward, backend = inputs
    ctx.save_for_backward(output[1], x if feedforward else None, weight, bias, scale)
    ctx.args = (feedforward, backend)


def _backward(ctx, dy, _dsaved):
    saved, x, weight, bias, scale = ctx.saved_tensors
    feedforward, backend = ctx.args
    need_x, _, need_bias, need_scale = ctx.needs_input_grad[:4]
    dx, dscale = ia3_linear_bwd(dy.contiguous(), saved, x if x is not None else _empty(saved), weight, bias, scale,
                                feedforward, backend, need_x)
    return (dx if need_x else None, None, _bias_grad(dy, scale, feedforward) if need_bias else None,
            dscale if need_scale else None, None, None)


ia3_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _bias_grad(dy: Tensor, scale: Tensor, feedforward: bool) -> Tensor:
    """The bias's gradient (a bias another method trains, e.g. BitFit): colsum(dY), times l after an
    output scale."""
    db = dy.sum(0)
    return db if feedforward else scale_channels(db, scale)


class _TorchIA3(torch.autograd.Function):
    """The torch path of ``ia3_linear_fwd`` / ``_bwd`` for eager mode (identical math and saved tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward):
        y, saved = _torch_forward(x, weight, bias, scale, feedforward)
        ctx.save_for_backward(saved, x if feedforward else None, weight, bias, scale)
        ctx.feedforward = feedforward
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, x, weight, bias, scale = ctx.saved_tensors
        need_x, _, need_bias, need_scale = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        dx, dscale = _torch_backward(dy, saved, x, weight, bias, scale, ctx.feedforward, need_x)
        return (dx, None, _bias_grad(dy, scale, ctx.feedforward) if need_bias else None,
                dscale.to(scale.dtype) if need_scale else None, None)


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------


def check_inputs(x, weight, bias, scale, feedforward, chosen: str) -> None:
    """Raise TypeError / ValueError naming the argument for input the op cannot run."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2D tensor [out_features, in_features], got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dimension in_features={K}, got shape {tuple(x.shape)}")
    allowed = OP_DTYPES if chosen == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"x must be {names} on the {chosen} path, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the frozen weight has {weight.dtype}: cast the input to the "
                        "model's dtype")
    if not isinstance(scale, Tensor):
        raise TypeError(f"scale must be a torch.Tensor (the IA3 vector), got {type(scale).__name__}")
    want = K if feedforward else N
    what = "in_features" if feedforward else "out_features"
    if scale.dim() != 1 or scale.shape[0] != want:
        raise ValueError(f"scale must be a vector [{what}={want}] ({'input' if feedforward else 'output'} scale), "
                         f"got shape {tuple(scale.shape)}")
    if not scale.is_floating_point() or (chosen == "triton" and scale.dtype not in OP_DTYPES):
        raise TypeError(f"scale must be a float32, float16 or bfloat16 vector, got {scale.dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be None or a vector [out_features={N}], got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}: move the input to the model's device")


def ia3_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, feedforward: bool = False,
               backend: str = "auto") -> Tensor:
    """IA3 linear on x [..., K] with a frozen weight [N, K] (any strides: pass ``conv1d.weight.t()``
    for GPT-2's Conv1D): ``(x W^T + b) * scale`` with scale [N], or with ``feedforward``
    ``(x * scale) W^T + b`` with scale [K]. Gradients reach x, scale and bias."""
    if not isinstance(feedforward, bool):
        raise TypeError(f"feedforward must be True or False, got {feedforward!r}")
    chosen, _ = resolve_backend(backend, x.device if isinstance(x, Tensor) else "cpu")
    check_inputs(x, weight, bias, scale, feedforward, chosen)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    records = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, scale))
    if chosen == "torch" and not torch.compiler.is_compiling():
        if records:
            y = _TorchIA3.apply(x2, weight, bias, scale, feedforward)
        else:  # inference: no autograd record, no saved tensors
            y, _ = _torch_forward(x2, weight, bias, scale, feedforward)
    else:
        y, _ = ia3_linear_fwd(x2, weight, bias, scale, feedforward, chosen)
    return y.reshape(*lead, weight.shape[0])
