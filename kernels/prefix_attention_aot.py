"""Ahead-of-time compile variants of the prefix-attention kernels, for ``ptune-rt compile-report``.

As for the LoRA kernels, the variants are recorded from the real launch wrappers: the forward,
backward and decode wrappers of :mod:`.prefix_attention` run on ``meta`` tensors with the
module's ``launch`` replaced by a recorder, so each recorded launch carries exactly the pointer
dtypes, sizes, strides and flags a model's call passes, and Triton's launch specialization is
applied to those values. Each launch is compiled with every shipped configuration of its kernel
for its dtype and head dim.

Covered, for a 7B-class attention layer (32 query heads, 8 KV heads, L = S = 4096 tokens, P = 128
prefix tokens, batch 2), sm_80 and sm_90, aligned:
* every activation dtype (fp16, bf16, fp32) x every head dim of ``HEAD_DIMS`` (16, 32, 64, 80, 96, 128,
  one per BLOCK_D class and the common ones; other head dims differ from these only in a mask bound):
  the forward, dQ and sequence-key dK/dV launches with every runtime flag on (causal, key padding
  mask, per-row tasks), so each shipped config of each kernel is built for each dtype and head dim;
* at head dim 128 (the widest tile, the one that runs out of registers first) the whole training
  step (also the shared-prefix dK/dV pass) with everything on, causal without padding, and
  bidirectional with padding and tasks, plus the decode launches (the shared-prefix pass with all
  rows of a kv head stacked, and the per-row cache pass);
* fp32 also with TF32 dots (what runs once ``torch.backends.cuda.matmul.fp32_precision`` is "tf32",
  as HF Trainer's ``tf32=True`` sets), at every head dim, like the first item.
An unaligned fallback build is added for the bf16 head-dim-128 causal training launches.
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import prefix_attention as PA

B, HQ, HKV, L, P, TASKS = 2, 32, 8, 4096, 128, 3
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Head dim whose launches get the whole flag matrix and the decode launches.
WIDE_HEAD_DIM = 128
FLAGS = [  # (name, causal, padding mask, tasks)
    ("causal+pad+tasks", True, True, True), ("causal", True, False, False),
    ("bidir+pad+tasks", False, True, True)]
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PTX = {torch.float16: "f16", torch.bfloat16: "bf16"}
_NAMES = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dq_kernel": "dq", "_attn_bwd_dkdv_kernel": "dkdv"}


def _record(dtype, D, flag_sets, decode):
    """(name, kernel, args, flags) of every launch of a training step per flag set, and of a decode step
    if ``decode``; without it the shared-prefix dK/dV pass (the same kernel and configs as the
    sequence-key pass, with fewer flags) is left out."""
    meta = dict(device="meta", dtype=dtype)
    out = []
    for tag, causal, pad, tasks in flag_sets:
        q = torch.empty(B, HQ, L, D, **meta)
        k = torch.empty(B, HKV, L, D, **meta)
        pk = torch.empty(*((TASKS,) if tasks else ()), HKV, P, D, **meta)
        mask = torch.empty(B, L, device="meta", dtype=torch.bool) if pad else None
        tid = torch.empty(B, device="meta", dtype=torch.int32) if tasks else None
        with recorded_launches(PA, "_check_device") as rec:
            o, lse = PA.prefix_attention_forward(q, k, k, pk, pk, mask, tid, causal)
            PA.prefix_attention_backward(o, q, k, k, pk, pk, o, lse, mask, tid, causal, num_tasks=TASKS)
        names = ("fwd", "bwd dq", "bwd dkdv seq", "bwd dkdv prefix")
        assert len(rec) == len(names), f"prefix attention made {len(rec)} launches, expected {names}"
        out += [(f"{n} {tag}", *r) for n, r in zip(names, rec) if decode or n != "bwd dkdv prefix"]
    if decode:
        q1 = torch.empty(B * 8, HQ, 1, D, **meta)  # decode: one new token per row, 8x the batch
        cache = torch.empty(B * 8, HKV, L, D, **meta)
        with recorded_launches(PA, "_check_device") as rec:
            PA.prefix_attention_decode(q1, cache, cache, torch.empty(HKV, P, D, **meta),
                                       torch.empty(HKV, P, D, **meta),
                                       torch.empty(B * 8, L, device="meta", dtype=torch.bool))
        out += [(n, *r) for n, r in zip(("decode prefix", "decode cache+pad"), rec)]
    return out


def cases():
    """(dtype, head dim, flag sets, with decode launches, INPUT_PRECISION override) of every covered case."""
    out = []
    for dtype in DTYPES:
        for D in PA.HEAD_DIMS:
            wide = D == WIDE_HEAD_DIM
            out.append((dtype, D, FLAGS if wide else FLAGS[:1], wide, None))
    out += [(torch.float32, D, FLAGS[:1], False, "tf32") for D in PA.HEAD_DIMS]
    return out


def aot_variants(full: bool = False) -> list[AotVariant]:
    """Every (launch, shipped config) variant of the prefix-attention kernels (see the docstring)."""
    variants = []
    for dtype, D, flag_sets, decode, precision in cases():
        for name, kernel, args, flags in _record(dtype, D, flag_sets, decode):
            by_name = dict(zip(kernel.arg_names, args))
            if precision is not None:
                flags = {**flags, "INPUT_PRECISION": precision}
            fallback = full or (dtype == torch.bfloat16 and D == WIDE_HEAD_DIM and name.endswith(" causal")
                                and not name.startswith("decode"))
            short = _SHORT[dtype] + (f" {precision}" if precision else "")
            mma = (_PTX[dtype],) if dtype in _PTX else ("tf32",) if precision == "tf32" else ()
            for cfg in PA.shipped_configs(_NAMES[kernel.fn.__name__], dtype, D):
                variants.append(launch_variant(
                    kernel.fn.__name__, kernel, by_name, {**flags, **cfg.meta}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, label=f"{short} D{D} {name}", config=str(cfg), mma_dtypes=mma,
                    wgmma_on_sm90=False, fallback=fallback))
    return variants
