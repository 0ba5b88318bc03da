"""The DoRA linear (Liu et al., 2024): ``y = m / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + b``.

``m`` [N] is a trainable magnitude per output row; the row norm of the adapted weight is treated as
a constant in backward (detached), as in the paper (section 4.3) and PEFT.

**The norm without the N x K temporary.** PEFT materializes ``W + s B A`` on every forward to take
its row norms. Here, per output row n (W_n, B_n rows of W and B)::

    ||W_n + s B_n A||^2 = ||W_n||^2 + 2 s B_n . (W_n A^T) + s^2 B_n (A A^T) B_n^T

``||W_n||^2`` is cached while W is unchanged (it is frozen); ``W A^T`` is one [N, r] skinny product
(a LoRA shrink with W in the role of x) and ``A A^T`` an r x r Gram matrix: no N x K tensor at all.
All of it is computed in fp32. The expansion loses accuracy only where ``W_n + s B_n A`` nearly
cancels (its norm far below ``||W_n||``), which training does not produce; the tests measure it
against the float64 materialized norm.

**Forward** is the fused LoRA GEMM with the row scale ``mns = m / norm`` in its epilogue (before the
bias); while ``m`` trains it also stores ``z = x W^T + s S B^T`` (pre-scale, in x's dtype), which
the gradient of ``m`` needs. **Backward** (``dY' = dY mns``, never materialized on the Triton path)::

    G  = dY (mns * B)                  [M, r]   (B's rows scaled: an N x r tensor)
    dX = dY' W + s G A                 the fused GEMM with mns as the input-channel scale of dY
    dB = mns * (s dY^T S)              [N, r]
    dA = s G^T x                       [r, K]
    dm = colsum(dY * z) / norm         [N]

Dropout (rate p > 0, training): PEFT's formula is then ``x W^T + b + (mns - 1) x_d W^T + mns s
(x_d A^T) B^T`` with ``x_d`` the dropped input, a second GEMM over W; it runs as these torch ops under
autograd (the norm still by the expansion).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend

#: Rows of W upcast to fp32 at a time when its squared row norms or W A^T run on the torch path:
#: bounds the temporary to ROW_CHUNK x K.
ROW_CHUNK = 1024


def row_norms_sq(w_nk: Tensor) -> Tensor:
    """``||W_n||^2`` per row of ``w_nk`` [N, K], in fp32 (fp64 for an fp64 weight)."""
    cdt = torch.promote_types(w_nk.dtype, torch.float32)
    out = torch.empty(w_nk.shape[0], dtype=cdt, device=w_nk.device)
    for i in range(0, w_nk.shape[0], ROW_CHUNK):
        chunk = w_nk[i:i + ROW_CHUNK].to(cdt)
        torch.linalg.vecdot(chunk, chunk, out=out[i:i + ROW_CHUNK])
    return out


def _w_a_t(w_nk: Tensor, a: Tensor, cdt: torch.dtype) -> Tensor:
    """``W A^T`` [N, r] in ``cdt``: the Triton skinny kernel on the Triton backend, else row chunks."""
    if cdt == torch.float32 and resolve_backend("auto", w_nk.device)[0] == "triton":
        from ptune_rt.kernels import lora as K
        return K.skinny_matmul(w_nk, a)
    out = torch.empty(w_nk.shape[0], a.shape[0], dtype=cdt, device=w_nk.device)
    a_t = a.to(cdt).t()
    for i in range(0, w_nk.shape[0], ROW_CHUNK):
        torch.mm(w_nk[i:i + ROW_CHUNK].to(cdt), a_t, out=out[i:i + ROW_CHUNK])
    return out


@torch.no_grad()
def weight_norm(w_nk: Tensor, a: Tensor, b: Tensor, scale: float, w_sq: Optional[Tensor] = None) -> Tensor:
    """``||W_n + scale B_n A||`` per output row, by the expansion in the module docstring (no N x K
    temporary), in fp32 (fp64 when an operand is fp64). ``w_sq``: the cached ``row_norms_sq(w_nk)``."""
    cdt = torch.promote_types(torch.promote_types(w_nk.dtype, a.dtype), torch.float32)
    if w_sq is None:
        w_sq = row_norms_sq(w_nk)
    a32, b32 = a.to(cdt), b.to(cdt)
    wa = _w_a_t(w_nk, a32, cdt)  # [N, r]
    gram = a32 @ a32.t()  # [r, r]
    cross = torch.linalg.vecdot(b32, wa)  # B_n . (W_n A^T)
    quad = torch.linalg.vecdot(b32 @ gram, b32)  # B_n A A^T B_n^T
    n2 = w_sq.to(cdt) + (2.0 * scale) * cross + (scale * scale) * quad
    return n2.clamp_min_(0.0).sqrt_()


def materialized_weight_norm(w_nk: Tensor, a: Tensor, b: Tensor, scale: float,
                             dtype: torch.dtype = torch.float64) -> Tensor:
    """The reference: the row norms of ``W + scale B A`` built in ``dtype`` (an N x K temporary)."""
    return torch.linalg.vector_norm(w_nk.to(dtype) + scale * (b.to(dtype) @ a.to(dtype)), dim=1)


# ----------------------------------------------------------------------------------------
# forward / backward, no dropout
# ----------------------------------------------------------------------------------------


def _forward(x, weight, bias, a, b, scale, mns, keep_z: bool, backend: str):
    """(y, S, z or None) for 2D x: y = mns * (x W^T + s S B^T) + b, S = x A^T (fp32)."""
    if backend == "triton":
        from ptune_rt.kernels import lora as K
        S = K.skinny_matmul(x, a)
        z = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) if keep_z else None
        y = K.fused_lowrank_matmul(x, weight, S, b, bias=bias, scale=scale, col_scale=mns, z_out=z)
        return y, S, z
    xa = x if x.dtype == a.dtype else x.to(a.dtype)
    S = xa @ a.t()
    z = (x @ weight.t()).to(b.dtype).addmm_(S, b.t(), alpha=scale)  # in the adapter dtype, like PEFT
    y = z * mns.to(z.dtype)
    if bias is not None:
        y += bias
    return y.to(x.dtype), S.float(), (z.to(x.dtype) if keep_z else None)


def _backward(dy, x, S, z, weight, a, b, scale, mns, norm, backend, need_dx: bool):
    """(dx or None, dA, dB, dm or None) of :func:`_forward` (see the module docstring)."""
    b_scaled = b * mns.to(b.dtype)[:, None]  # [N, r]
    if backend == "triton":
        from ptune_rt.kernels import lora as K
        G = K.skinny_matmul(dy, b_scaled.t())  # [M, r] fp32
        dx = K.fused_lowrank_matmul(dy, weight.t(), G, a.t(), scale=scale, in_scale=mns) if need_dx else None
        db = K.skinny_matmul(dy.t(), S.t(), scale=scale)
        da = torch.empty_like(a, dtype=torch.float32)
        K.skinny_matmul(x.t(), G.t(), scale=scale, out=da.t())
    else:
        dya = dy if dy.dtype == b.dtype else dy.to(b.dtype)
        G = dya @ b_scaled
        db = (S.to(b.dtype).t() @ dya).mul_(scale).t()
        xa = x if x.dtype == a.dtype else x.to(a.dtype)
        da = (G.t() @ xa).mul_(scale)
        dx = None
        if need_dx:  # dY' W in the weight's dtype (no upcast copy of W), the low-rank term in A's
            dx = (dy * mns.to(dy.dtype)) @ weight
            if dx.dtype == a.dtype:
                dx.addmm_(G, a, alpha=scale)
            else:
                dx = dx.to(a.dtype).addmm_(G, a, alpha=scale).to(dy.dtype)
    db = db.mul_(mns.to(db.dtype)[:, None])
    dm = None
    if z is not None:
        dm = torch.sum(dy * z, 0, dtype=torch.float32).div_(norm)
    return dx, da.to(a.dtype), db.to(b.dtype).contiguous(), dm


class _DoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, magnitude, scale, norm, backend):
        mns = magnitude.detach().to(norm.dtype) / norm  # fp32 (fp64 for an fp64 layer), contiguous
        y, S, z = _forward(x, weight, bias, a, b, scale, mns, ctx.needs_input_grad[5], backend)
        ctx.save_for_backward(x, S, z, weight, a, b, mns, norm)
        ctx.args = (scale, backend, bias is not None, magnitude.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, S, z, weight, a, b, mns, norm = ctx.saved_tensors
        scale, backend, has_bias, m_dtype = ctx.args
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        dx, da, db, dm = _backward(dy, x, S, z, weight, a, b, scale, mns, norm, backend, need_x)
        dbias = dy.sum(0) if (has_bias and need_bias) else None
        return (dx, None, dbias, da if need_a else None, db if need_b else None,
                dm.to(m_dtype) if (need_m and dm is not None) else None, None, None, None)


def _peft_formula(x, weight, bias, a, b, magnitude, scale, norm, p):
    """PEFT's DoRA formula as torch ops under autograd: with dropout (see the module docstring), and
    for float64 layers (a reference run)."""
    mns = magnitude / norm.to(magnitude.dtype)
    xd = torch.nn.functional.dropout(x, p) if p else x
    base = torch.nn.functional.linear(x, weight, bias)
    lora = (xd.to(a.dtype) @ a.t()) @ b.t()
    extra = (mns - 1) * torch.nn.functional.linear(xd, weight).to(mns.dtype) + mns * lora * scale
    return (base.to(extra.dtype) + extra).to(x.dtype)


def check_inputs(x, weight, bias, a, b, magnitude, scale, dropout_p) -> None:
    """The DoRA op's argument checks (the LoRA op's, plus the magnitude's)."""
    from ptune_rt.ops.lora_linear import _check_inputs
    _check_inputs(x, weight, bias, a, b, scale, dropout_p)
    N = weight.shape[0]
    if not isinstance(magnitude, Tensor) or tuple(magnitude.shape) != (N,) or not magnitude.is_floating_point():
        shape = tuple(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__
        raise ValueError(f"magnitude must be a floating [out_features={N}] tensor, got {shape}")
    if magnitude.device != x.device:
        raise ValueError(f"x is on {x.device} but the DoRA magnitude is on {magnitude.device}")


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                magnitude: Tensor, scale: float, dropout_p: float = 0.0, backend: str = "auto",
                norm: Optional[Tensor] = None, w_sq: Optional[Tensor] = None) -> Tensor:
    """DoRA linear on x [..., K] with a frozen weight [N, K] (any strides). ``norm``: the rows'
    ``||W + s B A||`` if the caller has it (e.g. cached in eval), else computed by the expansion
    (``w_sq``: cached ``||W_n||^2``). Dropout (``dropout_p``, pass 0 in eval) as in PEFT."""
    reference = isinstance(x, Tensor) and x.dtype == torch.float64 == weight.dtype
    check_inputs(x.float() if reference else x, weight.float() if reference else weight, bias, lora_a, lora_b,
                 magnitude, scale, dropout_p)
    chosen, _ = resolve_backend(backend, x.device)
    if norm is None:
        norm = weight_norm(weight, lora_a, lora_b, scale, w_sq)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if dropout_p > 0 or reference:
        y = _peft_formula(x2, weight, bias, lora_a, lora_b, magnitude, scale, norm, dropout_p)
    else:
        y = _DoRA.apply(x2, weight, bias, lora_a, lora_b, magnitude, float(scale), norm, chosen)
    return y.reshape(*lead, weight.shape[0])
