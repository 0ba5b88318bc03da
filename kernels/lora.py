"""Fused LoRA linear: Triton kernels and launch wrappers.

Forward  y  = x W^T + b + s * (dropout(x) A^T) B^T
            = x W^T + b + s * S B^T,             S = dropout(x) A^T   (M x r, fp32, saved)
Backward G  = dY B                                (M x r)
         dX = dY W + s * keep/(1-p) * (G A)       one GEMM kernel, the low-rank term in its epilogue
         dB = s * dY^T S                          (N x r)
         dA = s * G^T dropout(x)                  (r x K)

Two kernels cover all of it:

* ``_skinny_matmul_kernel``: out[M, R] = scale * dropout(X)[M, K] @ Wt[R, K]^T for a narrow R
  (the LoRA rank). With strides it computes the shrink S, the gradient projection G, and
  (on transposed views) dB and dA. Dropout is regenerated from a seed, never stored.
* ``_fused_lowrank_matmul_kernel``: out[M, N] = X @ W^T + bias + scale * keep * (S @ Bt^T).
  The main loop is a plain tiled GEMM; after it, the tile's low-rank term (a BM x r tile of S
  times an r x BN tile of B) is added to the same fp32 accumulator, so neither x W^T nor the
  low-rank product ever goes to memory. With W and B passed transposed it computes dX.

``W`` may have any strides, so nn.Linear ([N, K]) and GPT-2's Conv1D ([K, N]) weights are both
read in place, and ``x`` may be a strided view.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import (INTERPRET, KernelConfig, dropout_keep, fp32_input_precision,
                            launch, mma)

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _skinny_matmul_kernel(
    x_ptr, w_ptr, out_ptr,
    M, R, K,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om, stride_or,
    scale, seed, p, mask_stride_m, mask_stride_k,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes a BLOCK_M x BLOCK_R tile of scale * dropout(X) @ Wt^T, looping over K."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr
    m_in = offs_m[:, None] < M
    r_in = offs_r[None, :] < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_in & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, k0 + offs_k, mask_stride_m, mask_stride_k, p)
            a = tl.where(keep, a, 0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None] & r_in, other=0.0)
        if a.dtype != b.dtype:  # half activations with fp32 adapter weights: an fp32-accurate dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = mma(a, b, acc, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    acc = acc * scale
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in & r_in)


@triton.jit
def _fused_lowrank_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_sm, stride_sr, stride_bn, stride_br, stride_om, stride_on,
    scale, seed, p, mask_stride_m, mask_stride_n,
    HAS_BIAS: tl.constexpr, LR_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LR_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program computes a BLOCK_M x BLOCK_N tile of X W^T + bias + scale * [keep] * S Bt^T."""
    # Grouped ordering: GROUP_M row-tiles share the same column-tiles of W while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_in = offs_m[:, None] < M
    n_in = offs_n[None, :] < N

    # Main loop: the frozen GEMM, X tile [BM, BK] times W^T tile [BK, BN].
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_in & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & n_in, other=0.0)
        acc = mma(a, w.to(a.dtype), acc, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the low-rank term S [BM, r] @ Bt^T [r, BN] in chunks of BLOCK_R, added to the
    # same accumulator. S is fp32 and so are PEFT-style adapters: the dot keeps them in fp32 with
    # LR_PRECISION (3xTF32 on tensor cores beside half activations, like PEFT's fp32 low-rank path;
    # it costs r/K of the main loop's tensor-core work).
    # Without dropout the scale is folded into the S tile and the dots accumulate straight into
    # `acc` (no second BM x BN accumulator: that is what keeps large tiles free of spills). With
    # dropout (dX only) the keep-mask applies to the low-rank term alone, so it gets its own.
    offs_r = tl.arange(0, BLOCK_R)
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    if LR_DROPOUT:
        lowrank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_in = offs_r < R - r0
        s = tl.load(s_ptrs, mask=m_in & r_in[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptrs, mask=r_in[:, None] & n_in, other=0.0).to(tl.float32)
        if LR_DROPOUT:
            lowrank = mma(s, bt, lowrank, LR_PRECISION)
        else:
            acc = mma(s * scale, bt, acc, LR_PRECISION)
        s_ptrs += BLOCK_R * stride_sr
        b_ptrs += BLOCK_R * stride_br
    if LR_DROPOUT:
        keep = dropout_keep(seed, offs_m, offs_n, mask_stride_m, mask_stride_n, p)
        acc += tl.where(keep, lowrank * scale, 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in & n_in)


# --------------------------------------------------------------------------------------
# Shipped configurations. The CUDA launch autotunes over these lists; compile-report
# compiles every entry for sm_80 and sm_90; CPU/interpreter launches use INTERPRET_*.
# --------------------------------------------------------------------------------------

# Only configs that compile without register spills on sm_80 and sm_90 for fp16, bf16 and fp32
# (ptune-rt compile-report). Folding the low-rank term into the main accumulator (no second
# BM x BN fp32 tile without dropout) brought a 128-row tile back; 128x128 tiles still spill
# 450-600 bytes because of the 3xTF32 epilogue operands, and the fp32 (FMA) path spills with
# BLOCK_K 64. 16-row decode tiles (16x64x128, 16x64x64, 16x128x64) spill 8-12 bytes on sm_90 at
# rank chunk 16 (at ~80-130 registers: ptxas's register allocation, not pressure), so decode-sized
# M runs on the 64-row tile for now. The skinny kernel's 3xTF32 dot at BLOCK_R 128 needs 8 warps
# and BLOCK_K 16.
FUSED_CONFIGS = [
    KernelConfig({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
    KernelConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
]
SKINNY_CONFIGS = [
    KernelConfig({"BLOCK_M": 64, "BLOCK_K": 16}, 8, 3),
    KernelConfig({"BLOCK_M": 64, "BLOCK_K": 16}, 8, 4),
    KernelConfig({"BLOCK_M": 32, "BLOCK_K": 16}, 8, 3),
]
#: BLOCK_R is not tuned: it follows the rank (see ``block_r``); these are the values it takes.
SKINNY_BLOCK_R = (16, 32, 64, 128)
FUSED_BLOCK_R = (16, 32)

INTERPRET_FUSED_CONFIG = KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, 4, 1)
INTERPRET_SKINNY_CONFIG = KernelConfig({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1)

MAX_RANK = 256


def skinny_block_r(r: int) -> int:
    return max(16, min(128, triton.next_power_of_2(r)))


def fused_block_r(r: int) -> int:
    return 16 if r <= 16 else 32


@functools.lru_cache(maxsize=None)
def _autotuned(kernel_name: str):
    kernel = globals()[kernel_name]
    configs = FUSED_CONFIGS if kernel is _fused_lowrank_matmul_kernel else SKINNY_CONFIGS
    keys = ["M", "N", "K"] if kernel is _fused_lowrank_matmul_kernel else ["M", "R", "K"]
    return triton.autotune(configs=[c.to_triton() for c in configs], key=keys)(kernel)


def _fp32_dot_precision(act_dtype: torch.dtype, other_dtype: torch.dtype) -> str:
    """Precision of a dot whose operands are (upcast to) fp32.

    All-fp32 problems follow torch's own matmul setting (IEEE fp32 unless TF32 is allowed). Beside
    half-precision activations the fp32 operands are adapter-side values (S, G, fp32 LoRA weights):
    3xTF32 keeps them about as exact as PEFT's fp32 low-rank path while staying on tensor cores.
    """
    if act_dtype == torch.float32 and other_dtype == torch.float32:
        return fp32_input_precision()
    return "tf32x3"


def _check_backend(*tensors):
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton LoRA kernels need CUDA tensors (got {dev}); on CPU they run only under "
            "TRITON_INTERPRET=1. Use backend='torch' for CPU tensors.")
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on {dev}, got one on {t.device}")


# --------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------


def skinny_matmul(x: torch.Tensor, wt: torch.Tensor, *, scale: float = 1.0, dropout_p: float = 0.0,
                  seed: int = 0, mask_strides: tuple[int, int] | None = None,
                  out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """``scale * dropout(x) @ wt^T`` for x [M, K] and a narrow wt [R, K]; fp32 accumulation.

    ``mask_strides`` gives the dropout counter of element (i, j) of ``x`` as
    ``i*mask_strides[0] + j*mask_strides[1]`` (default: row-major over x's own shape), so a
    transposed view of an activation reuses the activation's mask.
    """
    _check_backend(x, wt)
    M, K = x.shape
    R, K2 = wt.shape
    assert K == K2, (x.shape, wt.shape)
    if out is None:
        out = torch.empty((M, R), device=x.device, dtype=out_dtype)
    ms = mask_strides if mask_strides is not None else (K, 1)
    BLOCK_R = skinny_block_r(R)
    args = (x, wt, out, M, R, K, x.stride(0), x.stride(1), wt.stride(0), wt.stride(1),
            out.stride(0), out.stride(1), float(scale), int(seed), float(dropout_p), ms[0], ms[1])
    flags = dict(HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=_fp32_dot_precision(x.dtype, wt.dtype),
                 BLOCK_R=BLOCK_R)
    if config is None and x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R))
        _autotuned("_skinny_matmul_kernel")[grid](*args, **flags)
    else:
        config = config or INTERPRET_SKINNY_CONFIG
        grid = (triton.cdiv(M, config.meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R))
        launch(_skinny_matmul_kernel, grid, config, *args, **flags)
    return out


def fused_lowrank_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                         seed: int = 0, out: torch.Tensor | None = None,
                         config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ w^T + bias + scale * keep * (s @ bt^T)`` for x [M, K], w [N, K], s [M, R], bt [N, R].

    ``keep`` (only when ``dropout_p > 0``) is the row-major dropout mask of the [M, N] output.
    The output has x's dtype.
    """
    _check_backend(x, w, s, bt, bias)
    M, K = x.shape
    N, K2 = w.shape
    R = s.shape[1]
    assert K == K2 and s.shape[0] == M and tuple(bt.shape) == (N, R), (x.shape, w.shape, s.shape, bt.shape)
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    BLOCK_R = fused_block_r(R)
    args = (x, w, bias if bias is not None else out, s, bt, out, M, N, K, R,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
            bt.stride(0), bt.stride(1), out.stride(0), out.stride(1),
            float(scale), int(seed), float(dropout_p), N, 1)
    flags = dict(HAS_BIAS=bias is not None, LR_DROPOUT=dropout_p > 0,
                 INPUT_PRECISION=fp32_input_precision(), LR_PRECISION=_fp32_dot_precision(x.dtype, s.dtype),
                 BLOCK_R=BLOCK_R)
    if config is None and x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned("_fused_lowrank_matmul_kernel")[grid](*args, **flags)
    else:
        config = config or INTERPRET_FUSED_CONFIG
        grid = (triton.cdiv(M, config.meta["BLOCK_M"]) * triton.cdiv(N, config.meta["BLOCK_N"]),)
        launch(_fused_lowrank_matmul_kernel, grid, config, *args, **flags)
    return out


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """Fused LoRA forward on 2D x [M, K]: returns (y [M, N] in x's dtype, S [M, r] fp32).

    ``S = dropout(x) @ A^T`` (the inverted-dropout factor 1/(1-p) included) is what backward needs.
    """
    S = skinny_matmul(x, lora_a, scale=1.0 / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed)
    y = fused_lowrank_matmul(x, weight, S, lora_b, bias=bias, scale=scale)
    return y, S


def lora_backward(dy: torch.Tensor, x: torch.Tensor, S: torch.Tensor, weight: torch.Tensor,
                  lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0,
                  seed: int = 0, need_dx: bool = True, need_da: bool = True, need_db: bool = True):
    """Gradients of :func:`lora_forward` w.r.t. x, A and B (W is frozen): (dx, dA, dB), each fp32 for
    A/B and x's dtype for dx, or None when not needed."""
    M, K = x.shape
    G = skinny_matmul(dy, lora_b.t()) if (need_dx or need_da) else None  # [M, r] = dY B
    dx = da = db = None
    if need_dx:
        # dX = dY W + s/(1-p) * keep * (G A): W and A passed transposed, mask of x's [M, K] layout.
        dx = fused_lowrank_matmul(dy, weight.t(), G, lora_a.t(), scale=scale / (1.0 - dropout_p),
                                  dropout_p=dropout_p, seed=seed)
    if need_db:
        # dB [N, r] = s * dY^T S
        db = skinny_matmul(dy.t(), S.t(), scale=scale)
    if need_da:
        # dA^T [K, r] = s/(1-p) * (keep * x)^T G ; the counter of x^T[k, m] is m*K + k.
        da = torch.empty_like(lora_a, dtype=torch.float32)
        skinny_matmul(x.t(), G.t(), scale=scale / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed,
                      mask_strides=(1, K), out=da.t())
    return dx, da, db
