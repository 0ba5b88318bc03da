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

import torch
import triton
import triton.language as tl

from ._triton_utils import (ConfigTuner, KernelConfig, check_in_tile_offsets, dropout_keep, fp32_input_precision,
                            interpreting, launch, mma, pow2_bucket, seed_tensor)

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _skinny_matmul_kernel(
    x_ptr, w_ptr, out_ptr, seed_ptr,
    M, R, K, k_per_split,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_os, stride_om, stride_or,
    scale, p, mask_stride_m, mask_stride_k,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes a BLOCK_M x BLOCK_R tile of scale * dropout(X) @ Wt^T over one K split.

    Split s (grid axis z) covers K rows [s * k_per_split, (s + 1) * k_per_split) and writes its own
    slice ``out + s * stride_os``: with several splits the caller sums the fp32 partials.
    SPLIT_W (half X, fp32 W): X is exact in TF32, so W = W_hi + W_lo (its TF32 head and the rest)
    gives an fp32-accurate product in two TF32 MMAs instead of 3xTF32's three.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    # The tile's origin in int64 (offsets pass 2**31 elements on large inputs); in-tile offsets 32-bit.
    x_ptrs = (x_ptr + pid_m.to(tl.int64) * BLOCK_M * stride_xm + k_lo.to(tl.int64) * stride_xk
              + rm[:, None] * stride_xm + rk[None, :] * stride_xk)
    w_ptrs = (w_ptr + pid_r.to(tl.int64) * BLOCK_R * stride_wr + k_lo.to(tl.int64) * stride_wk
              + rk[:, None] * stride_wk + rr[None, :] * stride_wr)
    m_in = rm[:, None] < M - pid_m * BLOCK_M
    r_in = rr[None, :] < R - pid_r * BLOCK_R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_in = rk < k_hi - k0
        a = tl.load(x_ptrs, mask=m_in & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, pid_m * BLOCK_M + rm, k0 + rk, mask_stride_m, mask_stride_k, p)
            a = tl.where(keep, a, 0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None] & r_in, other=0.0)
        if SPLIT_W:
            a = a.to(tl.float32)
            b_hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            acc = mma(a, b_hi, acc, INPUT_PRECISION)
            acc = mma(a, b - b_hi, acc, INPUT_PRECISION)
        else:
            if a.dtype != b.dtype:  # fp32 X with a half operand: both in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = mma(a, b, acc, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    acc = acc * scale
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + pid_m.to(tl.int64) * BLOCK_M * stride_om
                + pid_r.to(tl.int64) * BLOCK_R * stride_or + rm[:, None] * stride_om + rr[None, :] * stride_or)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in & r_in)


@triton.jit
def _fused_lowrank_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, out_ptr, seed_ptr, in_scale_ptr, col_scale_ptr, z_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_sm, stride_sr, stride_bn, stride_br, stride_om, stride_on,
    scale, p, mask_stride_m, mask_stride_n,
    HAS_BIAS: tl.constexpr, LR_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LR_PRECISION: tl.constexpr, IN_SCALE: tl.constexpr, COL_SCALE: tl.constexpr, Z_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program computes a BLOCK_M x BLOCK_N tile of
    col_scale * ((X diag(in_scale)) W^T + scale * [keep] * S Bt^T) + bias.

    IN_SCALE multiplies each X tile by its K-slice of ``in_scale`` (contiguous) as it is loaded (an
    input-channel scale, never an M x K scaled copy); COL_SCALE multiplies the accumulator by the
    output column's ``col_scale`` (contiguous) before the bias; Z_OUT also stores the accumulator
    before that scale (what a trainable column scale's gradient needs) to ``z_ptr``, laid out as
    the output."""
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

    # The tile's origin in int64 (offsets pass 2**31 elements on large layers); in-tile offsets 32-bit.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_in = rm[:, None] < M - pid_m * BLOCK_M
    n_in = rn[None, :] < N - pid_n * BLOCK_N

    # Main loop: the frozen GEMM, X tile [BM, BK] times W^T tile [BK, BN].
    x_ptrs = x_ptr + row0 * stride_xm + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + col0 * stride_wn + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = rk < K - k0
        a = tl.load(x_ptrs, mask=m_in & k_in[None, :], other=0.0)
        if IN_SCALE:
            in_scale = tl.load(in_scale_ptr + k0 + rk, mask=k_in, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * in_scale[None, :]).to(a.dtype)
        w = tl.load(w_ptrs, mask=k_in[:, None] & n_in, other=0.0)
        acc = mma(a, w.to(a.dtype), acc, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the low-rank term S [BM, r] @ Bt^T [r, BN] in chunks of BLOCK_R, added to the
    # same accumulator. S is fp32 and so are PEFT-style adapters: beside half activations the dot
    # runs as 3xTF32 (LR_PRECISION), three TF32 MMAs at half the half-precision MMA rate, so it
    # costs about 6r/K of the main loop's tensor-core time (r/K at fp32 activations).
    # Without dropout the scale is folded into the S tile and the dots accumulate straight into
    # `acc` (no second BM x BN accumulator: that is what keeps large tiles free of spills). With
    # dropout (dX only) the keep-mask applies to the low-rank term alone, so it gets its own.
    rr = tl.arange(0, BLOCK_R)
    s_ptrs = s_ptr + row0 * stride_sm + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    b_ptrs = b_ptr + col0 * stride_bn + rr[:, None] * stride_br + rn[None, :] * stride_bn
    if LR_DROPOUT:
        lowrank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_in = rr < R - r0
        s = tl.load(s_ptrs, mask=m_in & r_in[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptrs, mask=r_in[:, None] & n_in, other=0.0).to(tl.float32)
        if LR_DROPOUT:
            lowrank = mma(s, bt, lowrank, LR_PRECISION)
        else:
            acc = mma(s * scale, bt, acc, LR_PRECISION)
        s_ptrs += BLOCK_R * stride_sr
        b_ptrs += BLOCK_R * stride_br
    if LR_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), pid_m * BLOCK_M + rm, pid_n * BLOCK_N + rn, mask_stride_m,
                            mask_stride_n, p)
        acc += tl.where(keep, lowrank * scale, 0.0)
    out_offsets = row0 * stride_om + col0 * stride_on + rm[:, None] * stride_om + rn[None, :] * stride_on
    if Z_OUT:
        tl.store(z_ptr + out_offsets, acc.to(z_ptr.dtype.element_ty), mask=m_in & n_in)
    if COL_SCALE:
        col_scale = tl.load(col_scale_ptr + col0 + rn, mask=rn < N - pid_n * BLOCK_N, other=0.0)
        acc = acc * col_scale.to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 * stride_bias + rn * stride_bias, mask=rn < N - pid_n * BLOCK_N,
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=m_in & n_in)


# --------------------------------------------------------------------------------------
# Shipped configurations. On CUDA a ConfigTuner picks among these lists per bucketed key;
# compile-report compiles every entry for sm_80 and sm_90; CPU/interpreter launches use INTERPRET_*.
# --------------------------------------------------------------------------------------

# Only configs that compile without register spills on sm_80 and sm_90 (ptune-rt compile-report).
# 128x128 tiles spill because of the 3xTF32 epilogue operands; fp32 activations (FMA dots, and a
# second accumulator with dropout) spill at 128x64 on sm_90, so they get their own list.
FUSED_CONFIGS = [
    KernelConfig({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
    KernelConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
]
FUSED_CONFIGS_FP32 = [KernelConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4)]
#: Decode-sized M (at most DECODE_ROWS rows) takes this config without tuning: narrow column tiles
#: so that a 4096-wide output still spreads over more programs than an H100 has SMs.
FUSED_DECODE_CONFIG = KernelConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1}, 4, 3)
DECODE_ROWS = 16
SKINNY_CONFIGS = [
    KernelConfig({"BLOCK_M": 64, "BLOCK_K": 16}, 8, 3),
    KernelConfig({"BLOCK_M": 64, "BLOCK_K": 16}, 8, 4),
    KernelConfig({"BLOCK_M": 32, "BLOCK_K": 32}, 8, 3),
]
SKINNY_DECODE_CONFIG = KernelConfig({"BLOCK_M": 16, "BLOCK_K": 32}, 4, 3)
#: BLOCK_R is not tuned: it follows the rank (see ``block_r``); these are the values it takes.
SKINNY_BLOCK_R = (16, 32, 64, 128)
FUSED_BLOCK_R = (16, 32)

INTERPRET_FUSED_CONFIG = KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, 4, 1)
INTERPRET_SKINNY_CONFIG = KernelConfig({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1)

MAX_RANK = 256
#: Split-K of the skinny kernel: aim for this many programs (two waves of a 132-SM GPU), never
#: giving a split fewer than SPLIT_K_MIN_CHUNK of the reduced dimension.
SPLIT_K_TARGET_PROGRAMS = 264
SPLIT_K_MIN_CHUNK = 256

FUSED_TUNERS = {dtype: ConfigTuner(f"fused_lowrank_matmul {dtype}", fused_configs)
                for dtype, fused_configs in ((torch.float16, FUSED_CONFIGS), (torch.bfloat16, FUSED_CONFIGS),
                                             (torch.float32, FUSED_CONFIGS_FP32))}
SKINNY_TUNER = ConfigTuner("skinny_matmul", SKINNY_CONFIGS)


def fused_configs(dtype: torch.dtype) -> list:
    """The fused kernel's shipped (tuned) configs for activations of ``dtype``."""
    return FUSED_TUNERS[dtype].configs


def skinny_block_r(r: int) -> int:
    return max(16, min(128, triton.next_power_of_2(r)))


def fused_block_r(r: int) -> int:
    return 16 if r <= 16 else 32


def skinny_split_k(M: int, R: int, K: int, block_m: int, block_r: int, block_k: int,
                   splits: int | None = None) -> tuple[int, int]:
    """``(splits, k_per_split)`` for a skinny product: enough programs to fill the GPU when M x R
    alone gives few (a decode shrink, dA / dB reducing over many tokens). ``splits`` forces a count."""
    if splits is None:
        programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
        splits = min(triton.cdiv(SPLIT_K_TARGET_PROGRAMS, programs), K // SPLIT_K_MIN_CHUNK)
    k_per_split = triton.cdiv(triton.cdiv(K, max(1, splits)), block_k) * block_k
    k_per_split = max(block_k, k_per_split)
    return max(1, triton.cdiv(K, k_per_split)), k_per_split


def tune_on_device(device: torch.device) -> bool:
    """Whether launches on ``device`` pick their config with the tuner (CUDA) or take the
    interpreter's fixed config (the interpreter cannot time kernels)."""
    return device.type == "cuda"


def _choose(device, M: int, interpret: KernelConfig, decode: KernelConfig, tuner: ConfigTuner, key, run) -> KernelConfig:
    """The launch config: the interpreter's off CUDA, the fixed decode one at M <= DECODE_ROWS, else the
    tuner's for ``key`` (bucketed sizes, layout, dtypes, flags)."""
    if not tune_on_device(device):
        return interpret
    if M <= DECODE_ROWS:
        return decode
    return tuner.pick(key, run)


def _fp32_dot_precision(act_dtype: torch.dtype, other_dtype: torch.dtype) -> str:
    """Precision of a dot whose operands are (upcast to) fp32.

    All-fp32 problems follow torch's own matmul setting (IEEE fp32 unless TF32 is allowed). Beside
    half-precision activations the fp32 operands are adapter-side values (S, G, fp32 LoRA weights):
    3xTF32 keeps them about as exact as PEFT's fp32 low-rank path while staying on tensor cores.
    """
    if act_dtype == torch.float32 and other_dtype == torch.float32:
        return fp32_input_precision()
    return "tf32x3"


#: The largest block dimension of any shipped config (in-tile offsets are 32-bit up to it).
MAX_BLOCK = 128


def _check_backend(*tensors):
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
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
                  seed=0, mask_strides: tuple[int, int] | None = None,
                  out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  config: KernelConfig | None = None, split_k: int | None = None) -> torch.Tensor:
    """``scale * dropout(x) @ wt^T`` for x [M, K] and a narrow wt [R, K]; fp32 accumulation.

    ``mask_strides`` gives the dropout counter of element (i, j) of ``x`` as
    ``i*mask_strides[0] + j*mask_strides[1]`` (default: row-major over x's own shape), so a
    transposed view of an activation reuses the activation's mask. ``seed``: an int or a
    one-element int64 tensor. ``split_k`` forces the number of K splits (default: see
    :func:`skinny_split_k`); several splits sum fp32 partials in a fixed order (deterministic).
    """
    _check_backend(x, wt)
    check_in_tile_offsets(MAX_BLOCK, x=x, wt=wt, out=out)
    M, K = x.shape
    R, K2 = wt.shape
    assert K == K2, (x.shape, wt.shape)
    if out is None:
        out = torch.empty((M, R), device=x.device, dtype=out_dtype)
    ms = mask_strides if mask_strides is not None else (K, 1)
    BLOCK_R = skinny_block_r(R)
    split_w = x.dtype != torch.float32 and wt.dtype == torch.float32
    flags = dict(HAS_DROPOUT=dropout_p > 0, SPLIT_W=split_w,
                 INPUT_PRECISION="tf32" if split_w else _fp32_dot_precision(x.dtype, wt.dtype), BLOCK_R=BLOCK_R)
    seed_t = seed_tensor(seed, x.device) if dropout_p > 0 else x  # unread without dropout

    def run(cfg: KernelConfig):
        bm = cfg.meta["BLOCK_M"]
        splits, k_per_split = skinny_split_k(M, R, K, bm, BLOCK_R, cfg.meta["BLOCK_K"], split_k)
        dest = out if splits == 1 else torch.empty((splits, M, R), device=x.device, dtype=torch.float32)
        stride_os = 0 if splits == 1 else dest.stride(0)
        launch(_skinny_matmul_kernel, (triton.cdiv(M, bm), triton.cdiv(R, BLOCK_R), splits), cfg,
               x, wt, dest, seed_t, M, R, K, k_per_split, x.stride(0), x.stride(1), wt.stride(0),
               wt.stride(1), stride_os, dest.stride(-2), dest.stride(-1), float(scale), float(dropout_p),
               ms[0], ms[1], **flags)
        if splits > 1:
            out.copy_(dest.sum(0))

    key = (pow2_bucket(M), R, pow2_bucket(K), x.stride(1) == 1, x.dtype, wt.dtype, out.dtype,
           tuple(sorted(flags.items())))
    run(config or _choose(x.device, M, INTERPRET_SKINNY_CONFIG, SKINNY_DECODE_CONFIG, SKINNY_TUNER, key, run))
    return out


def fused_lowrank_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, dropout_p: float = 0.0,
                         seed=0, out: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
                         col_scale: torch.Tensor | None = None, z_out: torch.Tensor | None = None,
                         config: KernelConfig | None = None) -> torch.Tensor:
    """``col_scale * ((x * in_scale) @ w^T + scale * keep * (s @ bt^T)) + bias`` for x [M, K],
    w [N, K], s [M, R], bt [N, R] (R may be 0: a plain, optionally scaled, GEMM).

    ``keep`` (only when ``dropout_p > 0``) is the row-major dropout mask of the [M, N] output;
    ``seed`` an int or a one-element int64 tensor. The output has x's dtype. ``bias`` may be strided.
    ``in_scale`` [K] scales x's columns as its tiles load; ``col_scale`` [N] the output columns
    before the bias (both contiguous, any float dtype, applied in fp32); ``z_out`` [M, N], laid out
    as ``out``, receives the result before ``col_scale`` and the bias.
    """
    _check_backend(x, w, s, bt, bias, in_scale, col_scale, z_out)
    check_in_tile_offsets(MAX_BLOCK, x=x, w=w, s=s, bt=bt, bias=bias, out=out, z_out=z_out)
    M, K = x.shape
    N, K2 = w.shape
    R = s.shape[1]
    assert K == K2 and s.shape[0] == M and tuple(bt.shape) == (N, R), (x.shape, w.shape, s.shape, bt.shape)
    for name, v, n in (("in_scale", in_scale, K), ("col_scale", col_scale, N)):
        assert v is None or (tuple(v.shape) == (n,) and v.is_contiguous()), (name, v.shape, n)
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    assert z_out is None or (z_out.shape == out.shape and z_out.stride() == out.stride()), (z_out.shape, out.shape)
    BLOCK_R = fused_block_r(R)
    seed_t = seed_tensor(seed, x.device) if dropout_p > 0 else out  # unread without dropout
    if R == 0:  # no low-rank term: pointers that are never read, as for the absent ones below
        s, bt = out, out
    args = (x, w, bias if bias is not None else out, s, bt, out, seed_t,
            in_scale if in_scale is not None else out, col_scale if col_scale is not None else out,
            z_out if z_out is not None else out, M, N, K, R,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
            s.stride(0), s.stride(1), bt.stride(0), bt.stride(1), out.stride(0), out.stride(1),
            float(scale), float(dropout_p), N, 1)
    flags = dict(HAS_BIAS=bias is not None, LR_DROPOUT=dropout_p > 0,
                 INPUT_PRECISION=fp32_input_precision(), LR_PRECISION=_fp32_dot_precision(x.dtype, s.dtype),
                 IN_SCALE=in_scale is not None, COL_SCALE=col_scale is not None, Z_OUT=z_out is not None,
                 BLOCK_R=BLOCK_R)

    def run(cfg: KernelConfig):
        grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * triton.cdiv(N, cfg.meta["BLOCK_N"]),)
        launch(_fused_lowrank_matmul_kernel, grid, cfg, *args, **flags)

    key = (pow2_bucket(M), N, K, w.stride(0) == 1, x.dtype, w.dtype, s.dtype, bt.dtype, tuple(sorted(flags.items())))
    run(config or _choose(x.device, M, INTERPRET_FUSED_CONFIG, FUSED_DECODE_CONFIG, FUSED_TUNERS[x.dtype], key, run))
    return out


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0, seed=0):
    """Fused LoRA forward on 2D x [M, K]: returns (y [M, N] in x's dtype, S [M, r] fp32).

    ``S = dropout(x) @ A^T`` (the inverted-dropout factor 1/(1-p) included) is what backward needs.
    ``seed``: an int or a one-element int64 tensor on x's device (CUDA-graph safe).
    """
    seed = seed_tensor(seed, x.device) if dropout_p > 0 else 0
    S = skinny_matmul(x, lora_a, scale=1.0 / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed)
    y = fused_lowrank_matmul(x, weight, S, lora_b, bias=bias, scale=scale)
    return y, S


def lora_backward(dy: torch.Tensor, x: torch.Tensor, S: torch.Tensor, weight: torch.Tensor,
                  lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0,
                  seed=0, need_dx: bool = True, need_da: bool = True, need_db: bool = True):
    """Gradients of :func:`lora_forward` w.r.t. x, A and B (W is frozen): (dx, dA, dB), each fp32 for
    A/B and x's dtype for dx, or None when not needed."""
    M, K = x.shape
    seed = seed_tensor(seed, x.device) if dropout_p > 0 else 0
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


# --------------------------------------------------------------------------------------
# DoRA with dropout: two products over the frozen weight in one pass
# --------------------------------------------------------------------------------------


@triton.jit
def _dora_twin_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, out_ptr, z_ptr, seed_ptr, vec_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_sm, stride_sr, stride_bn, stride_br, stride_om, stride_on,
    scale, p, mask_stride_m, mask_stride_n,
    FORWARD: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LR_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of DoRA's training products with dropout, both from one pass over W.

    The main loop accumulates ``acc = X W^T`` and ``acc2 = X' W^T`` from each loaded X tile, where
    X' is the dropped input ``keep * X / (1 - p)`` (FORWARD; the keep-mask of X's [M, K] counters, as
    the shrink uses) or ``X diag(vec)`` (the dX pass: X = dY, vec = m / norm - 1). Epilogue:

    * FORWARD (vec = m / norm per output column): ``z = acc2 + scale * S Bt^T`` is stored to
      ``z_ptr`` and ``out = acc - acc2 + vec * z + bias``, i.e. PEFT's
      ``x W^T + b + (vec - 1) x_d W^T + vec * s (x_d A^T) B^T``;
    * dX: ``out = acc + keep * (acc2 + scale * S Bt^T) / (1 - p)`` with the keep-mask of the output's
      [M, N] counters (the forward input's), S = G = dY (vec + 1) B.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_in = rm[:, None] < M - pid_m * BLOCK_M
    n_in = rn[None, :] < N - pid_n * BLOCK_N
    seed = tl.load(seed_ptr)
    keep_scale = 1.0 / (1.0 - p)

    x_ptrs = x_ptr + row0 * stride_xm + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + col0 * stride_wn + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = rk < K - k0
        a = tl.load(x_ptrs, mask=m_in & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & n_in, other=0.0).to(a.dtype)
        if FORWARD:
            keep = dropout_keep(seed, pid_m * BLOCK_M + rm, k0 + rk, mask_stride_m, 1, p)
            a2 = tl.where(keep, a.to(tl.float32) * keep_scale, 0.0).to(a.dtype)
        else:
            v = tl.load(vec_ptr + k0 + rk, mask=k_in, other=0.0).to(tl.float32)
            a2 = (a.to(tl.float32) * v[None, :]).to(a.dtype)
        acc = mma(a, w, acc, INPUT_PRECISION)
        acc2 = mma(a2, w, acc2, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if FORWARD:
        acc -= acc2
    rr = tl.arange(0, BLOCK_R)
    s_ptrs = s_ptr + row0 * stride_sm + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    b_ptrs = b_ptr + col0 * stride_bn + rr[:, None] * stride_br + rn[None, :] * stride_bn
    for r0 in range(0, R, BLOCK_R):
        r_in = rr < R - r0
        s = tl.load(s_ptrs, mask=m_in & r_in[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptrs, mask=r_in[:, None] & n_in, other=0.0).to(tl.float32)
        acc2 = mma(s * scale, bt, acc2, LR_PRECISION)
        s_ptrs += BLOCK_R * stride_sr
        b_ptrs += BLOCK_R * stride_br
    out_offsets = row0 * stride_om + col0 * stride_on + rm[:, None] * stride_om + rn[None, :] * stride_on
    if FORWARD:
        tl.store(z_ptr + out_offsets, acc2.to(z_ptr.dtype.element_ty), mask=m_in & n_in)
        v = tl.load(vec_ptr + col0 + rn, mask=rn < N - pid_n * BLOCK_N, other=0.0).to(tl.float32)
        acc += v[None, :] * acc2
    else:
        keep = dropout_keep(seed, pid_m * BLOCK_M + rm, pid_n * BLOCK_N + rn, mask_stride_m, mask_stride_n, p)
        acc += tl.where(keep, acc2 * keep_scale, 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 * stride_bias + rn * stride_bias, mask=rn < N - pid_n * BLOCK_N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=m_in & n_in)


#: The twin kernel keeps two BM x BN accumulators: tiles half the fused kernel's (compile-report: no spills).
TWIN_CONFIGS = [KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 3)]
TWIN_TUNER = ConfigTuner("dora_twin", TWIN_CONFIGS)


def dora_twin_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, vec: torch.Tensor, *,
                     forward: bool, dropout_p: float, seed, scale: float, bias: torch.Tensor | None = None,
                     z_out: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """DoRA's products with dropout (see ``_dora_twin_kernel``): x [M, K], w [N, K] (any strides), s [M, R],
    bt [N, R], vec contiguous ([N] forward: m / norm; [K] dX: m / norm - 1); ``z_out`` [M, N] (forward)."""
    _check_backend(x, w, s, bt, vec, bias, z_out)
    check_in_tile_offsets(MAX_BLOCK, x=x, w=w, s=s, bt=bt, bias=bias, z_out=z_out)
    M, K = x.shape
    N = w.shape[0]
    R = s.shape[1]
    assert w.shape[1] == K and tuple(bt.shape) == (N, R) and s.shape[0] == M and vec.is_contiguous()
    assert vec.shape == ((N,) if forward else (K,)) and (z_out is not None) == forward
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    seed_t = seed_tensor(seed, x.device)
    args = (x, w, bias if bias is not None else out, s, bt, out, z_out if z_out is not None else out, seed_t, vec,
            M, N, K, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
            s.stride(0), s.stride(1), bt.stride(0), bt.stride(1), out.stride(0), out.stride(1),
            float(scale), float(dropout_p), K if forward else N, 1)
    flags = dict(FORWARD=forward, HAS_BIAS=bias is not None, INPUT_PRECISION=fp32_input_precision(),
                 LR_PRECISION=_fp32_dot_precision(x.dtype, s.dtype), BLOCK_R=fused_block_r(R))

    def run(cfg: KernelConfig):
        grid = (triton.cdiv(M, cfg.meta["BLOCK_M"]) * triton.cdiv(N, cfg.meta["BLOCK_N"]),)
        launch(_dora_twin_kernel, grid, cfg, *args, **flags)

    key = (pow2_bucket(M), N, K, w.stride(0) == 1, x.dtype, w.dtype, s.dtype, tuple(sorted(flags.items())))
    run(config or _choose(x.device, M, INTERPRET_FUSED_CONFIG, TWIN_CONFIGS[0], TWIN_TUNER, key, run))
    return out
