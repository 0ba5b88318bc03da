"""LoRA on an embedding table: one fused gather kernel for the forward, skinny GEMMs for the backward.

PEFT's LoRA ``Embedding`` keeps ``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [D, r] beside
the frozen table E [V, D] and computes, for token ids [M],

Forward  y  = E[ids] + s * A^T[ids] B^T          A^T[ids]: column ids[m] of A, a row of r values
Backward G  = s * dY B                            (M x r, fp32)
         dB = s * dY^T A^T[ids]                   (D x r, fp32)
         dA^T[v] = sum of G[m] over the tokens m with ids[m] = v   (a scatter, done by the op layer)

``_lora_embedding_fwd_kernel`` does the forward in one pass, with no one-hot matmul: a program takes
a tile of tokens, gathers their r adapter values from A (in place, any strides) and, for each column
tile of its chunk of D, gathers the table rows, adds ``s * A^T[ids] @ B^T`` on top in fp32 registers
and writes the output once. No M x r intermediate goes to memory and there is no separate add pass.

The backward runs the LoRA linear's skinny kernel (``lora.skinny_matmul``) twice: G = s * dY B, and
dB = s * dY^T A^T[ids] with A^T[ids] gathered in torch (M x r values, no larger than G). The scatter
of G into dA is left to the caller (``ptune_rt.ops.lora_embedding`` uses PyTorch's embedding
backward, deterministic on CUDA, on both backends).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (ConfigTuner, KernelConfig, check_in_tile_offsets, interpreting, launch, mma,
                            pow2_bucket)
from .lora import _fp32_dot_precision, skinny_matmul

# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _lora_embedding_fwd_kernel(
    ids_ptr, emb_ptr, a_ptr, b_ptr, out_ptr,
    M, D, R, d_per_program,
    stride_ids, stride_ev, stride_ed, stride_ar, stride_av, stride_bd, stride_br, stride_om, stride_od,
    scale,
    LR_PRECISION: tl.constexpr, ONE_RANK_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program writes out[tokens of tile pid_m, columns of chunk pid_d] = E[ids] + scale * A^T[ids] B^T.

    Chunk pid_d covers columns [pid_d * d_per_program, (pid_d + 1) * d_per_program), walked in
    BLOCK_D tiles. ONE_RANK_TILE (R <= BLOCK_R): the tile's adapter rows are gathered once, before
    the column loop; otherwise each column tile walks the rank in BLOCK_R chunks, re-gathering them
    (from cache). Table rows and token ids index with int64 (a 32000 x 4096 table passes 2**31
    elements); offsets inside a tile stay 32-bit.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    m_in = rm < M - pid_m * BLOCK_M
    ids = tl.load(ids_ptr + row0 * stride_ids + rm * stride_ids, mask=m_in, other=0).to(tl.int64)
    d_lo = pid_d * d_per_program
    d_hi = tl.minimum(D, d_lo + d_per_program)
    col0 = d_lo.to(tl.int64)

    e_ptrs = emb_ptr + ids[:, None] * stride_ev + col0 * stride_ed + rd[None, :] * stride_ed
    o_ptrs = out_ptr + row0 * stride_om + col0 * stride_od + rm[:, None] * stride_om + rd[None, :] * stride_od
    # A^T[ids] [BM, BR]: element (m, j) is A[j, ids[m]]; B^T [BR, BD]: element (j, d) is B[d, j].
    a_ptrs = a_ptr + ids[:, None] * stride_av + rr[None, :] * stride_ar
    b_ptrs = b_ptr + col0 * stride_bd + rd[None, :] * stride_bd + rr[:, None] * stride_br
    if ONE_RANK_TILE:
        # The scale goes on the small gathered tile, once, not on each output tile.
        a_tile = tl.load(a_ptrs, mask=m_in[:, None] & (rr < R)[None, :], other=0.0).to(tl.float32) * scale
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d_in = rd < d_hi - d0
        # The table rows are the accumulator's starting value: the sum is formed once, in fp32.
        acc = tl.load(e_ptrs, mask=m_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        if ONE_RANK_TILE:
            bt = tl.load(b_ptrs, mask=(rr < R)[:, None] & d_in[None, :], other=0.0).to(tl.float32)
            acc = mma(a_tile, bt, acc, LR_PRECISION)
        else:
            for r0 in range(0, R, BLOCK_R):
                r_in = rr < R - r0
                a_chunk = tl.load(a_ptrs + r0 * stride_ar, mask=m_in[:, None] & r_in[None, :],
                                  other=0.0).to(tl.float32) * scale
                bt = tl.load(b_ptrs + r0 * stride_br, mask=r_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)
                acc = mma(a_chunk, bt, acc, LR_PRECISION)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
        e_ptrs += BLOCK_D * stride_ed
        o_ptrs += BLOCK_D * stride_od
        b_ptrs += BLOCK_D * stride_bd


# --------------------------------------------------------------------------------------
# Shipped configurations: on CUDA a ConfigTuner picks one per bucketed key; compile-report builds
# every entry for sm_80 and sm_90; CPU/interpreter launches use INTERPRET_CONFIG.
# --------------------------------------------------------------------------------------

FWD_CONFIGS = [
    KernelConfig({"BLOCK_M": 16, "BLOCK_D": 128}, 4, 2),
    KernelConfig({"BLOCK_M": 32, "BLOCK_D": 64}, 4, 2),
    KernelConfig({"BLOCK_M": 64, "BLOCK_D": 64}, 8, 2),
]
INTERPRET_CONFIG = KernelConfig({"BLOCK_M": 16, "BLOCK_D": 32}, 4, 1)
#: BLOCK_R follows the rank (see ``rank_block``): these are the values it takes. Ranks above the
#: largest walk the rank in chunks of it (a 64-wide rank tile spills on sm_80 and sm_90: its B^T
#: tile, split for 3xTF32, does not fit beside the accumulator).
BLOCK_RS = (16, 32)
#: The largest block dimension of any shipped config (in-tile offsets are 32-bit up to it).
MAX_BLOCK = 128
#: Aim for this many programs (about 8 per SM of a 132-SM GPU: a gather needs many loads in flight)
#: by splitting D into chunks, never into chunks narrower than one column tile.
TARGET_PROGRAMS = 1056

FWD_TUNER = ConfigTuner("lora_embedding_fwd", FWD_CONFIGS)


def rank_block(r: int) -> int:
    """BLOCK_R for rank ``r``: the whole rank in one tile up to the largest of ``BLOCK_RS``."""
    return max(BLOCK_RS[0], min(BLOCK_RS[-1], triton.next_power_of_2(r)))


def column_split(M: int, D: int, block_m: int, block_d: int) -> tuple[int, int]:
    """``(chunks, columns per chunk)`` of D: enough programs for ``TARGET_PROGRAMS`` when the token
    tiles alone are fewer. Each chunk is a whole number of BLOCK_D tiles."""
    tiles_d = triton.cdiv(D, block_d)
    chunks = max(1, min(tiles_d, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(M, block_m))))
    per_chunk = triton.cdiv(tiles_d, chunks) * block_d
    return triton.cdiv(D, per_chunk), per_chunk


def _check_backend(*tensors):
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton LoRA embedding kernel needs CUDA tensors (got {dev}); on CPU it runs only under "
            "TRITON_INTERPRET=1. Use backend='torch' for CPU tensors.")
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on {dev}, got one on {t.device}")


# --------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------


def lora_embedding_forward(ids: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                           scale: float, *, out: torch.Tensor | None = None,
                           config: KernelConfig | None = None) -> torch.Tensor:
    """``weight[ids] + scale * lora_a.T[ids] @ lora_b.T`` as [M, D] in weight's dtype, for ids [M]
    (int32 or int64, any stride), weight [V, D], lora_a [r, V], lora_b [D, r] (any strides).

    The low-rank term is computed and added in fp32 and the sum rounded once. Ids are not
    range-checked here (the op layer validates them before launching).
    """
    _check_backend(ids, weight, lora_a, lora_b, out)
    check_in_tile_offsets(MAX_BLOCK, weight=weight, lora_a=lora_a, lora_b=lora_b, out=out)
    (M,), (V, D), R = ids.shape, weight.shape, lora_a.shape[0]
    assert tuple(lora_a.shape) == (R, V) and tuple(lora_b.shape) == (D, R), (weight.shape, lora_a.shape, lora_b.shape)
    if out is None:
        out = torch.empty((M, D), device=weight.device, dtype=weight.dtype)
    if M == 0 or D == 0:
        return out
    block_r = rank_block(R)
    flags = dict(LR_PRECISION=_fp32_dot_precision(weight.dtype, lora_a.dtype), ONE_RANK_TILE=R <= block_r,
                 BLOCK_R=block_r)

    def run(cfg: KernelConfig):
        chunks, d_per_program = column_split(M, D, cfg.meta["BLOCK_M"], cfg.meta["BLOCK_D"])
        launch(_lora_embedding_fwd_kernel, (triton.cdiv(M, cfg.meta["BLOCK_M"]), chunks), cfg,
               ids, weight, lora_a, lora_b, out, M, D, R, d_per_program,
               ids.stride(0), *weight.stride(), *lora_a.stride(), *lora_b.stride(), *out.stride(),
               float(scale), **flags)

    if config is None:
        if weight.device.type == "cuda":
            key = (pow2_bucket(M), D, weight.dtype, lora_a.dtype, lora_b.dtype, tuple(sorted(flags.items())))
            config = FWD_TUNER.pick(key, run)
        else:
            config = INTERPRET_CONFIG
    run(config)
    return out


def lora_embedding_backward(dy: torch.Tensor, ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            scale: float, *, need_g: bool = True, need_db: bool = True):
    """``(G, dB)`` of :func:`lora_embedding_forward` for dy [M, D] (any strides): G = scale * dy @ lora_b
    [M, r] and dB = scale * dy^T @ lora_a.T[ids] [D, r], both fp32, or None when not needed.

    dA is the scatter of G by ``ids`` (rows of A^T), left to the caller.
    """
    _check_backend(dy, ids, lora_a, lora_b)
    if ids.numel() == 0:  # nothing to reduce (the skinny kernel's split needs rows)
        r, D = lora_a.shape[0], lora_b.shape[0]
        return (dy.new_zeros((0, r), dtype=torch.float32) if need_g else None,
                dy.new_zeros((D, r), dtype=torch.float32) if need_db else None)
    G = skinny_matmul(dy, lora_b.t(), scale=scale) if need_g else None
    db = None
    if need_db:
        gathered = lora_a.t().index_select(0, ids).float()  # A^T[ids] [M, r]
        db = skinny_matmul(dy.t(), gathered.t(), scale=scale)
    return G, db
