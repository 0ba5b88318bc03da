"""Which computation runs a LoRA linear module's forward, chosen in one place.

A module hands its arguments over as one :class:`LoRAArgs` and calls :func:`lora_forward` (autograd
on), :func:`run_inference` with an :class:`InferencePlan` built once by :func:`plan_inference`
(autograd off), or :func:`stacked_lora_linear` (a batch whose rows use different adapters). The
paths, all computing ``x W^T + b + scale (dropout(x) A^T) B^T``:

* plain: a float64 layer on the torch path, PEFT's formula as torch ops (a reference run);
* lean: three BLAS calls on transposed views, the low-rank term added in place, recorded by
  autograd's own nodes: training batches of at most :data:`SMALL_BATCH_ROWS` rows in one dtype
  without dropout, and inference on the torch path;
* the module's group (q/k/v siblings, see ``lora_linear_group``) when it offers one;
* the fused op :func:`~ptune_rt.ops.lora_linear.lora_linear` otherwise.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ptune_rt.ops.backend import resolve_backend
from ptune_rt.ops.lora_linear import _ZERO_SEED, OP_DTYPES, _check_inputs, _torch_forward, lora_linear, lora_linear_fwd

#: Training batches of at most this many rows (tokens) take the lean path; larger ones the op's
#: ``autograd.Function``s. Below a few dozen rows a step costs its per-op overhead, not its FLOPs,
#: and a Python ``autograd.Function`` costs more there than it saves (measurements:
#: bench/results/NOTES.md, "Small-batch path").
SMALL_BATCH_ROWS = 64


class LoRAArgs(NamedTuple):
    """One LoRA linear's operands for the active adapter."""

    weight: Tensor  # [out, in] (a transposed view for GPT-2's Conv1D)
    bias: Optional[Tensor]
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float
    dropout: float  # the rate to apply now (0 in eval)
    backend: str  # as requested: "auto", "triton" or "torch"


def _lean(x2: Tensor, w_t: Tensor, bias, a_t: Tensor, b_t: Tensor, scale: float) -> Tensor:
    y = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
    return y.addmm_(torch.mm(x2, a_t), b_t, alpha=scale)


def _rows_of(x: Tensor) -> int:
    """Rows of ``x`` seen as a matrix [rows, x.shape[-1]] (0 for a scalar or an empty last dim)."""
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _is_float64_reference(x, args: LoRAArgs) -> bool:
    return (isinstance(x, Tensor) and x.dtype == torch.float64 == args.weight.dtype
            and resolve_backend(args.backend, args.weight.device)[0] == "torch")


def _is_small_batch(x, args: LoRAArgs) -> bool:
    if not isinstance(x, Tensor) or _rows_of(x) > SMALL_BATCH_ROWS or torch.compiler.is_compiling():
        return False
    w, a, b = args.weight, args.a, args.b
    return (args.dropout == 0.0 and x.shape[-1] == w.shape[1] and x.dtype in OP_DTYPES
            and x.dtype == w.dtype == a.dtype == b.dtype and x.device == w.device
            and resolve_backend(args.backend, w.device)[0] == "torch")


def takes_plain_ops(x, args: LoRAArgs) -> bool:
    """Whether :func:`lora_forward` runs ``x`` as plain torch ops (the float64 reference or a small
    batch): then a fused variant of the layer (the SwiGLU recompute) has nothing to save."""
    return _is_float64_reference(x, args) or _is_small_batch(x, args)


def _plain(x: Tensor, args: LoRAArgs) -> Tensor:
    """PEFT's formula as torch ops under autograd, dropout included."""
    w, bias, a, b, scale, p, _ = args
    x2 = x.reshape(-1, w.shape[1])
    xd = nn.functional.dropout(x2, p) if p else x2
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    y = y.addmm_(torch.mm(xd.to(a.dtype), a.t()), b.t(), alpha=scale)
    return y.view(*x.shape[:-1], w.shape[0])


def lora_forward(x: Tensor, args: LoRAArgs, group: Optional[Callable[[], Optional[Tensor]]] = None) -> Tensor:
    """The layer's output for ``x`` on the path its arguments take (see the module docstring).
    ``group()``: the module's projection-group output for ``x``, or None when the group does not run."""
    if _is_float64_reference(x, args):
        return _plain(x, args)
    if torch.is_grad_enabled() and _is_small_batch(x, args):
        x2 = x.reshape(-1, args.weight.shape[1])
        y = _lean(x2, args.weight.t(), args.bias, args.a.t(), args.b.t(), args.scale)
        return y.view(*x.shape[:-1], args.weight.shape[0])
    if group is not None and torch.is_grad_enabled():
        y = group()
        if y is not None:
            return y
    return lora_linear(x, args.weight, args.bias, args.a, args.b, args.scale, args.dropout, backend=args.backend)


class InferencePlan(NamedTuple):
    """A decode-step path checked once and kept by the module: valid while :meth:`matches`."""

    a: Tensor
    b: Tensor
    weight: Tensor  # as stored ([in, out] for Conv1D)
    bias: Optional[Tensor]
    adapter: str
    backend: str
    dtype: torch.dtype
    device: torch.device
    data_ptrs: tuple
    path: str  # "lean", "torch" or "triton"
    weight_nk: Tensor
    lean_views: Optional[tuple]  # (W^T, A^T, B^T) for the lean path

    def matches(self, x: Tensor, a, b, weight, bias, adapter: str, backend: str) -> bool:
        """Whether the plan still holds: the same parameter objects over the same storages (``.to()``,
        a new ``.data`` or a replaced Parameter do not; in-place updates do), adapter, backend, and
        the input's dtype, device and width."""
        return (self.a is a and self.b is b and self.weight is weight and self.bias is bias
                and self.adapter == adapter and self.backend == backend and x.dtype == self.dtype
                and x.device == self.device and x.shape[-1] == self.weight_nk.shape[1]
                and self.data_ptrs == (a.data_ptr(), b.data_ptr(), weight.data_ptr()))


def plan_inference(x: Tensor, weight: Tensor, fan_in_fan_out: bool, bias, a: Tensor, b: Tensor, scale: float,
                   adapter: str, backend: str) -> Optional[InferencePlan]:
    """The checked plan of a decode step, or None when ``x`` or the operands fail the op's checks (the
    checked path, :func:`lora_forward`, then raises the clear error)."""
    w_nk = weight.t() if fan_in_fan_out else weight
    try:
        _check_inputs(x, w_nk, bias, a, b, scale, 0.0)
        path, _ = resolve_backend(backend, x.device)
    except (TypeError, ValueError, RuntimeError):
        return None
    views = None
    if path == "torch" and a.dtype == x.dtype:
        path, views = "lean", (w_nk.t(), a.t(), b.t())
    return InferencePlan(a, b, weight, bias, adapter, backend, x.dtype, x.device,
                         (a.data_ptr(), b.data_ptr(), weight.data_ptr()), path, w_nk, views)


def run_inference(x: Tensor, plan: InferencePlan, scale: float) -> Tensor:
    """A decode step on its plan: no checks, no backend resolution, one dispatched op at most."""
    x2 = x.reshape(-1, plan.weight_nk.shape[1])
    if plan.path == "lean":
        w_t, a_t, b_t = plan.lean_views
        y = _lean(x2, w_t, plan.bias, a_t, b_t, scale)
    elif plan.path == "torch":
        y, _ = _torch_forward(x2, plan.weight_nk, plan.bias, plan.a, plan.b, scale, 0.0, 0)
    else:  # the Triton kernels stay behind the one custom op
        y, _ = lora_linear_fwd(x2, plan.weight_nk, plan.bias, plan.a, plan.b, float(scale), 0.0, _ZERO_SEED,
                               plan.path)
    return y.view(*x.shape[:-1], plan.weight_nk.shape[0])


def stacked_lora_linear(x: Tensor, weight_nk: Tensor, bias, a_cat: Tensor, b_cat: Tensor, col_scale: Tensor,
                        backend: str, base_out: Optional[Tensor] = None) -> Tensor:
    """A batch whose rows use different adapters, every adapter at once: ``x W^T + b + (x A_cat^T *
    col_scale) B_cat^T`` with A stacked [sum r, K], B side by side [N, sum r] and per row the scale
    of its own adapter's columns, 0 elsewhere (``col_scale`` [B, 1, sum r]). On the Triton backend
    two kernel launches (the skinny shrink, then the low-rank term added in the base GEMM's
    accumulator); elsewhere two torch ops added to ``base_out`` (the layer's own base output, which
    the caller may have computed already; it is updated in place)."""
    batch = x.shape[0]
    x2 = x.reshape(-1, weight_nk.shape[1])
    if resolve_backend(backend, x.device)[0] == "triton":
        from ptune_rt.kernels import lora as K

        S = K.skinny_matmul(x2, a_cat)  # [B * L, sum r], fp32
        S.view(batch, -1, S.shape[-1]).mul_(col_scale)
        y = K.fused_lowrank_matmul(x2, weight_nk, S, b_cat, bias=bias, scale=1.0)
        return y.view(*x.shape[:-1], weight_nk.shape[0])
    y = nn.functional.linear(x, weight_nk, bias) if base_out is None else base_out
    S = nn.functional.linear(x.to(a_cat.dtype), a_cat)
    S.view(batch, -1, a_cat.shape[0]).mul_(col_scale)
    y += nn.functional.linear(S, b_cat).to(y.dtype)
    return y
