"""Prefix-fused attention: Triton kernels and launch wrappers.

Attention of queries over [prefix K/V ; sequence K/V] without building the concatenation, the mask
or ``repeat_kv``:

    q [B, Hq, L, D], k/v [B, Hkv, S, D] (S = cached + new keys), prefix_k/prefix_v [Hkv, P, D]
    shared by every row (or [T, Hkv, P, D] with a per-row task index), an optional key padding
    mask [B, S], bottom-right causal or bidirectional, softmax scale ``sm_scale``.

Every query sees all P prefix keys; sequence key t is visible to query i iff the key is not
padding and, when causal, t <= (S - L) + i. One online softmax (FlashAttention-2 style) runs over
the prefix blocks, then the sequence blocks; the output and the natural-log LSE are written.

Backward recomputes the probabilities from the LSE:
* ``_attn_bwd_dq_kernel``: one program per (row, q head, query block) walks prefix and sequence keys.
* ``_attn_bwd_dkdv_kernel``: one program per key block accumulates dK/dV over the query heads of
  its GQA group (no repeat_kv, no atomics). For sequence keys that is one program per
  (row, kv head, key block). For the shared prefix, programs are split over (row, query chunk) so
  the GPU stays busy; each writes an fp32 partial and a small sum reduces them deterministically
  (per task when rows use different prefixes).

Launch grids put the unbounded axis (rows x heads) on grid axis 0 and the query or key blocks on
axis 1 (CUDA caps axes 1 and 2 at 65,535). On CUDA each launch takes one of its kernel's shipped
configs (``shipped_configs``: per activation dtype and head tile), picked per tuning key (kernel,
power-of-two buckets of L, S and P, dtype and every flag) by benchmarking each config once per key;
decode-sized launches (one query block) take a fixed config untuned. The interpreter runs
``INTERPRET_CONFIG``. Head dims above 128 are refused.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import (ConfigTuner, KernelConfig, fp32_input_precision, interpreting, launch, mma,
                            pow2_bucket)

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, PK, PV, KVMASK, TASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pt, stride_ph, stride_pn, stride_pd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn, stride_task,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, L, S, P, GROUP, seq_offset, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KVMASK: tl.constexpr, HAS_TASKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: a BLOCK_M block of queries of one (row, q head) against all visible keys.

    Grid: (rows x q heads, query blocks). Row, head and task indices and the block's first query
    are 64-bit where they multiply a stride (a batch easily spans more than 2**31 elements);
    offsets inside a tile stay 32-bit.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query indices (masks, causal limit)
    tile_m = tl.arange(0, BLOCK_M)  # query index within the block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < L
    d_in = offs_d < HEAD_DIM

    q_tile = Q + (b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qm)
    q = tl.load(q_tile + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # work in base 2: exp(x) = exp2(x * log2(e))
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # 1) the prefix: every query sees every prefix key.
    if HAS_TASKS:
        task = tl.load(TASK + b * stride_task).to(tl.int64)
    else:
        task = 0
    pk_base = PK + (task * stride_pt + hk * stride_ph)
    pv_base = PV + (task * stride_pvt + hk * stride_pvh)
    for n0 in range(0, P, BLOCK_N):
        n = n0 + offs_n
        n_in = n < P
        kt = tl.load(pk_base + n[None, :] * stride_pn + offs_d[:, None] * stride_pd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0)
        v = tl.load(pv_base + n[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                    mask=n_in[:, None] & d_in[None, :], other=0.0)
        s = mma(q, kt.to(q.dtype), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * qk_scale
        s = tl.where(n_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], INPUT_PRECISION)
        m_i = m_new

    # 2) the sequence keys, up to the causal limit of this query block.
    k_base = K + (b * stride_kb + hk * stride_kh)
    v_base = V + (b * stride_vb + hk * stride_vh)
    mask_base = KVMASK + b * stride_mb
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, seq_offset + start_m + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + offs_n
        visible = (n < S)[None, :] & m_in[:, None]
        if IS_CAUSAL:
            visible = visible & (n[None, :] <= seq_offset + offs_m[:, None])
        if HAS_KVMASK:
            keep = tl.load(mask_base + n * stride_mn, mask=n < S, other=0)
            visible = visible & (keep != 0)[None, :]
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(n < S)[None, :] & d_in[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(n < S)[:, None] & d_in[None, :], other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], INPUT_PRECISION)
        m_i = m_new

    # Rows that saw no key at all (only possible without a prefix) get 0 and LSE = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    o_tile = O + (b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_om)
    tl.store(o_tile + tile_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
    tl.store(LSE + (pid_bh.to(tl.int64) * L + start_m) + tile_m, lse, mask=m_in)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, PK, PV, KVMASK, TASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pt, stride_ph, stride_pn, stride_pd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn, stride_task,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, L, S, P, GROUP, seq_offset, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KVMASK: tl.constexpr, HAS_TASKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for a BLOCK_M block of queries: dQ = scale * sum_keys P * (dP - delta) K.

    Grid and 64-bit indexing as in the forward kernel.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tile_m = tl.arange(0, BLOCK_M)  # query index within the block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < L
    d_in = offs_d < HEAD_DIM
    md = m_in[:, None] & d_in[None, :]
    start_m64 = start_m.to(tl.int64)
    q_tile = Q + (b * stride_qb + h * stride_qh + start_m64 * stride_qm)
    do_tile = DO + (b * stride_dob + h * stride_doh + start_m64 * stride_dom)
    q = tl.load(q_tile + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md, other=0.0)
    do = tl.load(do_tile + tile_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md, other=0.0)
    row_off = pid_bh.to(tl.int64) * L + start_m  # into the [B, Hq, L] LSE and delta
    lse = tl.load(LSE + row_off + tile_m, mask=m_in, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows with no key: P = 0
    delta = tl.load(DELTA + row_off + tile_m, mask=m_in, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if HAS_TASKS:
        task = tl.load(TASK + b * stride_task).to(tl.int64)
    else:
        task = 0
    pk_base = PK + (task * stride_pt + hk * stride_ph)
    pv_base = PV + (task * stride_pvt + hk * stride_pvh)
    for n0 in range(0, P, BLOCK_N):
        n = n0 + offs_n
        n_in = n < P
        kt = tl.load(pk_base + n[None, :] * stride_pn + offs_d[:, None] * stride_pd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0).to(q.dtype)
        vt = tl.load(pv_base + n[None, :] * stride_pvn + offs_d[:, None] * stride_pvd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0).to(q.dtype)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * qk_scale
        p = tl.where(n_in[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, vt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(q.dtype), tl.trans(kt), dq, INPUT_PRECISION)

    k_base = K + (b * stride_kb + hk * stride_kh)
    v_base = V + (b * stride_vb + hk * stride_vh)
    mask_base = KVMASK + b * stride_mb
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, seq_offset + start_m + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + offs_n
        visible = (n < S)[None, :] & m_in[:, None]
        if IS_CAUSAL:
            visible = visible & (n[None, :] <= seq_offset + offs_m[:, None])
        if HAS_KVMASK:
            keep = tl.load(mask_base + n * stride_mn, mask=n < S, other=0)
            visible = visible & (keep != 0)[None, :]
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(n < S)[None, :] & d_in[:, None], other=0.0)
        vt = tl.load(v_base + n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=(n < S)[None, :] & d_in[:, None], other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, vt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(q.dtype), tl.trans(kt), dq, INPUT_PRECISION)

    dq = dq * sm_scale
    dq_tile = DQ + (b * stride_dqb + h * stride_dqh + start_m64 * stride_dqm)
    tl.store(dq_tile + tile_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=md)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, KEY, VAL, KVMASK, TASK, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kt, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vt, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn, stride_task,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    B, Hq, Hkv, L, NKEYS, GROUP, seq_offset, sm_scale, m_per_split,
    HEAD_DIM: tl.constexpr, IS_PREFIX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KVMASK: tl.constexpr,
    HAS_TASKS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one BLOCK_N block of keys, summed over the query heads of its GQA group.

    Sequence keys (IS_PREFIX False): KEY/VAL are [B, Hkv, S, D]; the program owns (row, kv head,
    key block) and walks every query block that can see it; results go to DK/DV [B, Hkv, S, D].
    Prefix keys (IS_PREFIX True): KEY/VAL are the shared [T, Hkv, P, D] prefix; the program owns
    (query chunk, row, kv head, key block) and writes fp32 partials to DK/DV [splits, B, Hkv, P, D].
    Grid: (query chunks x rows x kv heads, key blocks); indices that multiply a stride are 64-bit.
    """
    pid_z = tl.program_id(0)
    pid_n = tl.program_id(1)
    hk = (pid_z % Hkv).to(tl.int64)
    b = ((pid_z // Hkv) % B).to(tl.int64)
    split = pid_z // (Hkv * B)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # key indices (masks, causal limit)
    tile_n = tl.arange(0, BLOCK_N)  # key index within the block
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < NKEYS
    d_in = offs_d < HEAD_DIM
    nd = n_in[:, None] & d_in[None, :]
    start_n64 = start_n.to(tl.int64)

    if IS_PREFIX:
        if HAS_TASKS:
            task = tl.load(TASK + b * stride_task).to(tl.int64)
        else:
            task = 0
        k_tile = KEY + (task * stride_kt + hk * stride_kh + start_n64 * stride_kn)
        v_tile = VAL + (task * stride_vt + hk * stride_vh + start_n64 * stride_vn)
        lo = split * m_per_split
        hi = tl.minimum(L, lo + m_per_split)
        key_ok = n_in
    else:
        k_tile = KEY + (b * stride_kb + hk * stride_kh + start_n64 * stride_kn)
        v_tile = VAL + (b * stride_vb + hk * stride_vh + start_n64 * stride_vn)
        lo = 0
        if IS_CAUSAL:  # query i sees key t iff t <= seq_offset + i
            lo = tl.maximum(start_n - seq_offset, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        hi = L
        key_ok = n_in
        if HAS_KVMASK:
            keep = tl.load(KVMASK + (b * stride_mb + start_n64 * stride_mn) + tile_n * stride_mn, mask=n_in,
                           other=0)
            key_ok = key_ok & (keep != 0)
    k = tl.load(k_tile + tile_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd, other=0.0)
    v = tl.load(v_tile + tile_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + (b * stride_qb + h * stride_qh)
        do_base = DO + (b * stride_dob + h * stride_doh)
        for m0 in range(lo, hi, BLOCK_M):
            m = m0 + offs_m
            m_in = m < hi
            md = m_in[:, None] & d_in[None, :]
            q = tl.load(q_base + m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md, other=0.0)
            do = tl.load(do_base + m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md, other=0.0)
            lse = tl.load(LSE + bh * L + m, mask=m_in, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + bh * L + m, mask=m_in, other=0.0)
            kk = k.to(q.dtype)
            st = mma(kk, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), INPUT_PRECISION) * qk_scale
            visible = key_ok[:, None] & m_in[None, :]
            if not IS_PREFIX:
                if IS_CAUSAL:
                    visible = visible & (offs_n[:, None] <= seq_offset + m[None, :])
            pt = tl.where(visible, tl.exp2(st - lse[None, :]), 0.0)
            dv = mma(pt.to(q.dtype), do, dv, INPUT_PRECISION)
            dpt = mma(v.to(q.dtype), tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), INPUT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = mma(dst.to(q.dtype), q, dk, INPUT_PRECISION)

    dk = dk * sm_scale
    out_tile = split.to(tl.int64) * stride_dks + b * stride_dkb + hk * stride_dkh + start_n64 * stride_dkn
    out_off = tile_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out_tile + out_off, dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + out_tile + out_off, dv.to(DV.dtype.element_ty), mask=nd)


# --------------------------------------------------------------------------------------
# Shipped configurations (CUDA picks among these per tuning key; compile-report compiles them
# all; the interpreter uses INTERPRET_CONFIG).
# --------------------------------------------------------------------------------------

# Only configs that compile without register spills for sm_80 and sm_90 (ptune-rt compile-report).
# Half precision, fp32 (whose FMA dots hold twice the registers) and fp32 with the 128-wide head
# tile (head dims 80, 96, 128) have separate lists.
FWD_CONFIGS = [
    KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
    KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),
    KernelConfig({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 2),  # decode-sized query blocks
]
FWD_CONFIGS_FP32 = [KernelConfig({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 2)]
FWD_CONFIGS_FP32_D128 = [KernelConfig({"BLOCK_M": 16, "BLOCK_N": 32}, 8, 1)]
BWD_DQ_CONFIGS = [KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2)]
BWD_DQ_CONFIGS_FP32 = [KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1)]
BWD_DQ_CONFIGS_FP32_D128 = [KernelConfig({"BLOCK_M": 16, "BLOCK_N": 32}, 8, 2)]
BWD_DKDV_CONFIGS = [
    KernelConfig({"BLOCK_M": 32, "BLOCK_N": 64}, 8, 2),
    KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, 8, 2),
    KernelConfig({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 2),
]
BWD_DKDV_CONFIGS_FP32 = [KernelConfig({"BLOCK_M": 16, "BLOCK_N": 64}, 8, 1)]
BWD_DKDV_CONFIGS_FP32_D128 = [KernelConfig({"BLOCK_M": 16, "BLOCK_N": 32}, 8, 1)]
#: Head dims the kernels are built and checked for (compile-report covers each of them).
HEAD_DIMS = (16, 32, 64, 80, 96, 128)
MAX_HEAD_DIM = max(HEAD_DIMS)
INTERPRET_CONFIG = KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1)
#: Target number of programs for the prefix dK/dV reduction (about two waves on a 132-SM GPU).
PREFIX_BWD_TARGET_PROGRAMS = 264
#: Key-block width the prefix dK/dV pass sizes its query chunks with (whatever config then runs it,
#: so the partial buffers are allocated before a config is picked).
PREFIX_BWD_SPLIT_BLOCK_N = 64


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dim(head_dim: int) -> None:
    """Head dims above 128 are refused: their tiles are neither built nor checked by compile-report."""
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"head_dim={head_dim} is not supported by the prefix attention kernels: they take head "
                         f"dims up to {MAX_HEAD_DIM} (built and checked for {', '.join(map(str, HEAD_DIMS))})")


def shipped_configs(name: str, dtype: torch.dtype, head_dim: int) -> list:
    """The configurations shipped for kernel ``name`` ("fwd", "dq", "dkdv") at activation ``dtype`` and
    ``head_dim``: fp32 tiles carry twice the registers of half ones, so they get their own
    (spill-free) lists, smaller again for the 128-wide head tile."""
    if dtype != torch.float32:
        return {"fwd": FWD_CONFIGS, "dq": BWD_DQ_CONFIGS, "dkdv": BWD_DKDV_CONFIGS}[name]
    if block_d(head_dim) >= 128:
        return {"fwd": FWD_CONFIGS_FP32_D128, "dq": BWD_DQ_CONFIGS_FP32_D128,
                "dkdv": BWD_DKDV_CONFIGS_FP32_D128}[name]
    return {"fwd": FWD_CONFIGS_FP32, "dq": BWD_DQ_CONFIGS_FP32, "dkdv": BWD_DKDV_CONFIGS_FP32}[name]


def decode_config(name: str, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """The fixed config of decode-sized launches (one query block): the shipped one with the
    smallest query block, no tuning."""
    configs = shipped_configs(name, dtype, head_dim)
    return min(configs, key=lambda c: c.meta["BLOCK_M"])


# --------------------------------------------------------------------------------------
# Config choice and launch
# --------------------------------------------------------------------------------------

_KERNELS = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
#: One tuner per (kernel, activation dtype, head tile width): each holds that combination's shipped configs.
_TUNERS: dict = {}


def tunes_configs(x: torch.Tensor) -> bool:
    """Whether launches on ``x``'s device pick their config by benchmarking the shipped ones (CUDA);
    elsewhere (the interpreter) INTERPRET_CONFIG runs."""
    return x.device.type == "cuda"


def _tuner(name: str, dtype: torch.dtype, head_dim: int) -> ConfigTuner:
    key = (name, dtype, block_d(head_dim))
    if key not in _TUNERS:
        _TUNERS[key] = ConfigTuner(f"{_KERNELS[name]} {str(dtype).replace('torch.', '')} BLOCK_D={key[2]}",
                                   shipped_configs(name, dtype, head_dim))
    return _TUNERS[key]


def tuning_key(name: str, dtype: torch.dtype, L: int, S: int, P: int, flags: dict) -> tuple:
    """What a config choice depends on: the kernel, bucketed sizes (a decode loop or a dynamically
    padded epoch tunes once per power-of-two bucket), the dtype and every flag of the launch."""
    return (name, str(dtype), pow2_bucket(L), pow2_bucket(S), pow2_bucket(P),
            *(f"{k}={v}" for k, v in sorted(flags.items())))


def _launch(name: str, kernel, grid_fn, config, args, flags, sizes):
    """Launch ``kernel`` with ``config``, or the one chosen for this launch: decode-sized launches
    (a single query block) take a fixed config, others the tuned choice for their key (CUDA)."""
    q = args[0]
    L, S, P = sizes
    if config is None:
        fixed = decode_config(name, q.dtype, flags["HEAD_DIM"])
        if not tunes_configs(q):
            config = INTERPRET_CONFIG
        elif L <= fixed.meta["BLOCK_M"]:  # one query block: nothing worth tuning
            config = fixed
        else:
            config = _tuner(name, q.dtype, flags["HEAD_DIM"]).pick(
                tuning_key(name, q.dtype, L, S, P, flags),
                lambda c: launch(kernel, grid_fn(c.meta), c, *args, **flags))
    launch(kernel, grid_fn(config.meta), config, *args, **flags)


def _check_device(*tensors):
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton attention kernels need CUDA tensors (got {dev}); on CPU they run "
                           "only under TRITON_INTERPRET=1")
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on {dev}, got one on {t.device}")


def _prefix4(prefix: torch.Tensor | None, like: torch.Tensor):
    """[Hkv, P, D] -> a [1, Hkv, P, D] view; [T, Hkv, P, D] stays; None -> an empty prefix."""
    if prefix is None:
        return like.new_empty((1, like.shape[1], 0, like.shape[3]))
    return prefix.unsqueeze(0) if prefix.dim() == 3 else prefix


def _task_index(task_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The per-row task index as the kernels read it: any integer dtype, any stride (the stride is
    passed); None -> a placeholder never read."""
    if task_ids is None:
        return like.new_zeros((1,), dtype=torch.int32)
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    if task_ids.dtype not in (torch.int32, torch.int64):
        task_ids = task_ids.to(torch.int32)  # the kernels load int32 or int64
    return task_ids


def _common(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal, sm_scale):
    B, Hq, L, D = q.shape
    check_head_dim(D)
    if k is None:  # prefix only (e.g. the shared-prefix half of a decode step)
        k = v = q.new_empty((B, prefix_k.shape[-3], 0, D))
    Hkv, S = k.shape[1], k.shape[2]
    pk, pv = _prefix4(prefix_k, k), _prefix4(prefix_v, k)
    P = pk.shape[2]
    mask = kv_mask if kv_mask is not None else q.new_empty((1, 1), dtype=torch.int8)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.int8)
    tasks = _task_index(task_ids, q)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    return k, v, pk, pv, mask, tasks, (B, Hq, Hkv, L, S, P, D, Hq // Hkv, S - L, scale)


def sum_rows_per_task(rows: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[T, ...] sums of the [B, ...] ``rows`` per task, deterministically: a float64 one-hot
    product over rows (no atomics, unlike ``index_add_`` on CUDA; float64 so no TF32 setting
    rounds it), returned in fp32."""
    onehot = task_ids.long()[None, :] == torch.arange(num_tasks, device=rows.device)[:, None]
    sums = onehot.to(torch.float64) @ rows.reshape(rows.shape[0], -1).to(torch.float64)
    return sums.to(torch.float32).reshape((num_tasks,) + tuple(rows.shape[1:]))


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, kv_mask=None, task_ids=None, causal=True,
                             sm_scale=None, config: KernelConfig | None = None):
    """Attention over [prefix ; sequence] keys: returns (out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] fp32).

    ``k``/``v`` may be None (prefix only) and ``prefix_k``/``prefix_v`` may be None (no prefix).
    ``kv_mask`` [B, S] marks real (1) and padding (0) sequence keys; ``task_ids`` [B] (any integer
    dtype and stride) picks each row's prefix from a [T, Hkv, P, D] stack. Head dims up to 128.
    """
    _check_device(q, k, v, prefix_k, prefix_v, kv_mask, task_ids)
    k, v, pk, pv, mask, tasks, dims = _common(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal, sm_scale)
    B, Hq, Hkv, L, S, P, D, G, offset, scale = dims
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, L), device=q.device, dtype=torch.float32)
    args = (q, k, v, pk, pv, mask, tasks, o, lse, *q.stride(), *k.stride(), *v.stride(), *pk.stride(),
            *pv.stride(), *mask.stride(), tasks.stride(0), *o.stride(), Hq, L, S, P, G, offset, scale)
    flags = dict(HEAD_DIM=D, IS_CAUSAL=bool(causal), HAS_KVMASK=kv_mask is not None,
                 HAS_TASKS=task_ids is not None, INPUT_PRECISION=fp32_input_precision(), BLOCK_D=block_d(D))
    # rows x heads on grid axis 0 (up to 2**31 - 1), query blocks on axis 1 (up to 65,535)
    _launch("fwd", _attn_fwd_kernel, lambda meta: (B * Hq, triton.cdiv(L, meta["BLOCK_M"])), config, args, flags,
            (L, S, P))
    return o, lse


def prefix_attention_backward(do, q, k, v, prefix_k, prefix_v, o, lse, kv_mask=None, task_ids=None,
                              causal=True, sm_scale=None, num_tasks: int | None = None,
                              configs: tuple | None = None):
    """Gradients of :func:`prefix_attention_forward`: (dq, dk, dv, dprefix_k, dprefix_v).

    The prefix gradients are reduced over rows and the GQA group inside the kernels (fp32 partials
    per (query chunk, row), then a sum over chunks and rows), shaped like ``prefix_k``; with tasks the
    rows are summed per task by :func:`sum_rows_per_task` (deterministic, no atomics).
    """
    _check_device(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, do)
    k_, v_, pk, pv, mask, tasks, dims = _common(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal,
                                                 sm_scale)
    B, Hq, Hkv, L, S, P, D, G, offset, scale = dims
    dq_cfg, dkdv_cfg = configs if configs is not None else (None, None)
    delta = (o.float() * do.float()).sum(-1).contiguous()  # rowsum(dO * O), [B, Hq, L]
    lse = lse.contiguous()
    prec = fp32_input_precision()
    common_flags = dict(HEAD_DIM=D, IS_CAUSAL=bool(causal), HAS_KVMASK=kv_mask is not None,
                        HAS_TASKS=task_ids is not None, INPUT_PRECISION=prec, BLOCK_D=block_d(D))

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    args = (q, k_, v_, pk, pv, mask, tasks, do, lse, delta, dq, *q.stride(), *k_.stride(), *v_.stride(),
            *pk.stride(), *pv.stride(), *mask.stride(), tasks.stride(0), *do.stride(), *dq.stride(),
            Hq, L, S, P, G, offset, scale)
    _launch("dq", _attn_bwd_dq_kernel, lambda meta: (B * Hq, triton.cdiv(L, meta["BLOCK_M"])), dq_cfg, args,
            common_flags, (L, S, P))

    def dkdv(key, val, dk, dv, nkeys, is_prefix, splits, m_per_split):
        kt = key if key.dim() == 5 else key.unsqueeze(0)  # sequence keys get a unit leading dim
        vt = val if val.dim() == 5 else val.unsqueeze(0)
        if is_prefix:
            kt, vt = key.unsqueeze(1), val.unsqueeze(1)  # [T, 1, Hkv, P, D]: no per-row stride
        dk5 = dk if dk.dim() == 5 else dk.unsqueeze(0)
        dv5 = dv if dv.dim() == 5 else dv.unsqueeze(0)
        assert dk5.stride() == dv5.stride()
        a = (q, kt, vt, mask, tasks, do, lse, delta, dk5, dv5, *q.stride(),
             kt.stride(0), kt.stride(1), kt.stride(2), kt.stride(3), kt.stride(4),
             vt.stride(0), vt.stride(1), vt.stride(2), vt.stride(3), vt.stride(4),
             *mask.stride(), tasks.stride(0), *do.stride(), *dk5.stride(), B, Hq, Hkv, L, nkeys, G, offset, scale,
             m_per_split)
        flags = dict(common_flags, IS_PREFIX=is_prefix)
        if is_prefix:
            flags["IS_CAUSAL"] = False
            flags["HAS_KVMASK"] = False
        # (query chunks x rows x kv heads) on grid axis 0, key blocks on axis 1
        _launch("dkdv", _attn_bwd_dkdv_kernel,
                lambda meta: (splits * B * Hkv, triton.cdiv(nkeys, meta["BLOCK_N"])), dkdv_cfg, a, flags,
                (L, S, P))

    dk = dv = None
    if S > 0:
        dk = torch.empty_like(k_, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v_, memory_format=torch.contiguous_format)
        dkdv(k_, v_, dk, dv, S, False, 1, L)
    dpk = dpv = None
    if P > 0:
        # Split the queries into chunks so that (chunks x rows x kv heads x key blocks) programs
        # fill the GPU; each chunk writes an fp32 partial.
        base_programs = triton.cdiv(P, PREFIX_BWD_SPLIT_BLOCK_N) * B * Hkv
        splits = max(1, min(triton.cdiv(L, 64), triton.cdiv(PREFIX_BWD_TARGET_PROGRAMS, base_programs)))
        m_per_split = triton.cdiv(L, splits)
        splits = triton.cdiv(L, m_per_split)
        part_k = torch.empty((splits, B, Hkv, P, D), device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
        dkdv(pk, pv, part_k, part_v, P, True, splits, m_per_split)
        per_row_k, per_row_v = part_k.sum(0), part_v.sum(0)  # [B, Hkv, P, D]
        if task_ids is None:
            dpk, dpv = per_row_k.sum(0), per_row_v.sum(0)
        else:
            T = num_tasks if num_tasks is not None else pk.shape[0]
            dpk = sum_rows_per_task(per_row_k, task_ids, T)
            dpv = sum_rows_per_task(per_row_v, task_ids, T)
        dpk = dpk.to(prefix_k.dtype).reshape(prefix_k.shape)
        dpv = dpv.to(prefix_v.dtype).reshape(prefix_v.shape)
    return dq, dk, dv, dpk, dpv


def prefix_attention_decode(q, k, v, prefix_k, prefix_v, kv_mask=None, sm_scale=None,
                            config: KernelConfig | None = None):
    """Single-token decode with a shared prefix (the cascade / shared-prefix decomposition).

    The prefix part is one matrix-matrix product for the whole batch: every (row, head) query of a
    kv head is stacked into one [B * group, D] block against that head's [P, D] prefix, so the
    prefix is read once per kv head instead of once per row. Each row's own cache part is a regular
    pass without prefix; the two are merged by their log-sum-exps. Returns (out, lse) like
    :func:`prefix_attention_forward`.
    """
    B, Hq, L, D = q.shape
    Hkv = prefix_k.shape[0]
    G = Hq // Hkv
    # [B, Hkv, G, L, D] -> [1, Hkv, B*G*L, D]: all queries of a kv head as one block of rows.
    qs = q.reshape(B, Hkv, G * L, D).transpose(0, 1).reshape(1, Hkv, B * G * L, D)
    o_p, lse_p = prefix_attention_forward(qs, None, None, prefix_k, prefix_v, causal=False, sm_scale=sm_scale,
                                          config=config)
    o_p = o_p.reshape(Hkv, B, G * L, D).transpose(0, 1).reshape(B, Hq, L, D)
    lse_p = lse_p.reshape(Hkv, B, G * L).transpose(0, 1).reshape(B, Hq, L)
    if k is None or k.shape[2] == 0:
        return o_p, lse_p
    o_c, lse_c = prefix_attention_forward(q, k, v, None, None, kv_mask, None, True, sm_scale, config=config)
    lse = torch.logaddexp(lse_p, lse_c)
    w_p = torch.exp(lse_p - lse)[..., None]
    w_c = torch.exp(lse_c - lse)[..., None]
    out = (o_p.float() * w_p + o_c.float() * w_c).to(q.dtype)
    return out, lse
