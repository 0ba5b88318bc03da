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

**Dropout** (rate p > 0, training): PEFT's formula is then ``x W^T + b + (mns - 1) x_d W^T + mns s
(x_d A^T) B^T`` with ``x_d`` the dropped input: a second product over W. The Triton path computes both
products from one pass over W (``kernels.lora.dora_twin_matmul``, the mask regenerated from a seed in
every kernel), and dX likewise (``dY W + keep / (1 - p) * (dY (mns - 1) W + s G A)``); x_d is never
stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend
from ptune_rt.ops.lora_linear import _seed_tensor, _torch_keep

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


def _forward(x, weight, bias, a, b, scale, mns, keep_z: bool, backend: str, p: float = 0.0, seed=0):
    """(y, S, z or None) for 2D x. Without dropout y = mns * z + b, z = x W^T + s S B^T, S = x A^T;
    with dropout (rate ``p``, mask from ``seed``) PEFT's ``y = x W^T + b + (mns - 1) x_d W^T + mns s S B^T``
    with ``S = x_d A^T`` and ``z = x_d W^T + s S B^T``. S is fp32, z in x's dtype."""
    if backend == "triton":
        return _triton_forward(x, weight, bias, a, b, scale, mns, keep_z, p, seed)
    xa = x if x.dtype == a.dtype else x.to(a.dtype)
    keep = _torch_keep(x.shape, p, seed, x.device, x.dtype) if p > 0 else None
    if keep is not None:
        xa = xa * keep.to(xa.dtype)
    S = xa @ a.t()
    base = x @ weight.t()
    if keep is None:
        z = base.to(b.dtype).addmm_(S, b.t(), alpha=scale)  # in the adapter dtype, like PEFT
        y = z * mns.to(z.dtype)
    else:
        S.mul_(1.0 / (1.0 - p))
        dropped = ((x * keep) @ weight.t()).mul_(1.0 / (1.0 - p))  # x_d W^T, never a saved x_d
        z = torch.addmm(dropped.to(b.dtype), S, b.t(), alpha=scale)  # out of place: dropped is used below
        y = base.to(z.dtype) - dropped.to(z.dtype) + z * mns.to(z.dtype)
    if bias is not None:
        y += bias
    return y.to(x.dtype), S.float(), (z.to(x.dtype) if keep_z else None)


def _triton_forward(x, weight, bias, a, b, scale, mns, keep_z, p, seed):
    from ptune_rt.kernels import lora as K
    z = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) if (keep_z or p > 0) else None
    if p == 0:
        S = K.skinny_matmul(x, a)
        y = K.fused_lowrank_matmul(x, weight, S, b, bias=bias, scale=scale, col_scale=mns, z_out=z)
        return y, S, z
    S = K.skinny_matmul(x, a, scale=1.0 / (1.0 - p), dropout_p=p, seed=seed)
    y = K.dora_twin_matmul(x, weight, S, b, mns, forward=True, dropout_p=p, seed=seed, scale=scale, bias=bias,
                           z_out=z)
    return y, S, (z if keep_z else None)


def _backward(dy, x, S, z, weight, a, b, scale, mns, norm, backend, need_dx: bool, p: float = 0.0, seed=0):
    """(dx or None, dA, dB, dm or None) of :func:`_forward` (see the module docstring; with dropout
    ``dX = dY W + keep / (1 - p) * (dY (mns - 1) W + s G A)`` and ``dA = s G^T x_d``)."""
    b_scaled = b * mns.to(b.dtype)[:, None]  # [N, r]
    if backend == "triton":
        dx, da, db = _triton_backward(dy, x, S, weight, a, b_scaled, scale, mns, need_dx, p, seed)
    else:
        dya = dy if dy.dtype == b.dtype else dy.to(b.dtype)
        G = dya @ b_scaled
        db = (S.to(b.dtype).t() @ dya).mul_(scale).t()
        xa = x if x.dtype == a.dtype else x.to(a.dtype)
        keep = _torch_keep(x.shape, p, seed, x.device, xa.dtype) if p > 0 else None
        if keep is not None:
            xa = xa * keep
        da = (G.t() @ xa).mul_(scale / (1.0 - p))
        dx = _torch_dx(dy, weight, a, G, scale, mns, keep, p) if need_dx else None
    db = db.mul_(mns.to(db.dtype)[:, None])
    dm = None
    if z is not None:
        dm = torch.sum(dy * z, 0, dtype=torch.float32).div_(norm)
    return dx, da.to(a.dtype), db.to(b.dtype).contiguous(), dm


def _torch_dx(dy, weight, a, G, scale, mns, keep, p):
    """dX on the torch path: dY' W in the weight's dtype (no upcast copy of W), the rest in A's dtype."""
    if keep is None:
        dx = (dy * mns.to(dy.dtype)) @ weight
        if dx.dtype == a.dtype:
            return dx.addmm_(G, a, alpha=scale)
        return dx.to(a.dtype).addmm_(G, a, alpha=scale).to(dy.dtype)
    inner = ((dy * (mns - 1).to(dy.dtype)) @ weight).to(a.dtype).addmm_(G, a, alpha=scale)
    return ((dy @ weight).to(a.dtype) + inner.mul_(keep.to(a.dtype)).mul_(1.0 / (1.0 - p))).to(dy.dtype)


def _triton_backward(dy, x, S, weight, a, b_scaled, scale, mns, need_dx, p, seed):
    from ptune_rt.kernels import lora as K
    G = K.skinny_matmul(dy, b_scaled.t())  # [M, r] fp32
    dx = None
    if need_dx and p == 0:
        dx = K.fused_lowrank_matmul(dy, weight.t(), G, a.t(), scale=scale, in_scale=mns)
    elif need_dx:
        dx = K.dora_twin_matmul(dy, weight.t(), G, a.t(), (mns - 1).contiguous(), forward=False, dropout_p=p,
                                seed=seed, scale=scale)
    db = K.skinny_matmul(dy.t(), S.t(), scale=scale)
    da = torch.empty_like(a, dtype=torch.float32)
    K.skinny_matmul(x.t(), G.t(), scale=scale / (1.0 - p), dropout_p=p, seed=seed, mask_strides=(1, x.shape[1]),
                    out=da.t())
    return dx, da, db


class _DoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, magnitude, scale, norm, backend, p, seed_t):
        mns = magnitude.detach().to(norm.dtype) / norm  # fp32 (fp64 for an fp64 layer), contiguous
        seed = (seed_t if backend == "triton" else int(seed_t.item())) if p > 0 else 0
        y, S, z = _forward(x, weight, bias, a, b, scale, mns, ctx.needs_input_grad[5], backend, p, seed)
        ctx.save_for_backward(x, S, z, weight, a, b, mns, norm, seed_t)
        ctx.args = (scale, backend, bias is not None, magnitude.dtype, p, seed if backend != "triton" else 0)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, S, z, weight, a, b, mns, norm, seed_t = ctx.saved_tensors
        scale, backend, has_bias, m_dtype, p, seed = ctx.args
        if backend == "triton" and p > 0:
            seed = seed_t
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        dx, da, db, dm = _backward(dy, x, S, z, weight, a, b, scale, mns, norm, backend, need_x, p, seed)
        dbias = dy.sum(0) if (has_bias and need_bias) else None
        return (dx, None, dbias, da if need_a else None, db if need_b else None,
                dm.to(m_dtype) if (need_m and dm is not None) else None, None, None, None, None, None)


def _peft_formula(x, weight, bias, a, b, magnitude, scale, norm, p):
    """PEFT's DoRA formula as torch ops under autograd: the float64 reference run."""
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
                norm: Optional[Tensor] = None, w_sq: Optional[Tensor] = None, seed: Optional[int] = None) -> Tensor:
    """DoRA linear on x [..., K] with a frozen weight [N, K] (any strides). ``norm``: the rows'
    ``||W + s B A||`` if the caller has it (e.g. cached in eval), else computed by the expansion
    (``w_sq``: cached ``||W_n||^2``). Dropout (``dropout_p``, pass 0 in eval) as in PEFT's formula, its
    mask drawn from ``seed`` (torch's RNG when None) as the LoRA op's: regenerated in backward, never stored."""
    reference = isinstance(x, Tensor) and x.dtype == torch.float64 == weight.dtype
    check_inputs(x.float() if reference else x, weight.float() if reference else weight, bias, lora_a, lora_b,
                 magnitude, scale, dropout_p)
    chosen, _ = resolve_backend(backend, x.device)
    if norm is None:
        norm = weight_norm(weight, lora_a, lora_b, scale, w_sq)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if reference:
        y = _peft_formula(x2, weight, bias, lora_a, lora_b, magnitude, scale, norm, dropout_p)
    else:
        seed_t = _seed_tensor(dropout_p, seed, x.device if chosen == "triton" else None)
        y = _DoRA.apply(x2, weight, bias, lora_a, lora_b, magnitude, float(scale), norm, chosen, float(dropout_p),
                        seed_t)
    return y.reshape(*lead, weight.shape[0])
