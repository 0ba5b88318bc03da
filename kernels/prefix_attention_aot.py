"""Ahead-of-time compile variants of the prefix-attention kernels, for ``ptune-rt compile-report``.

As for the LoRA kernels, the variants are recorded from the real launch wrappers: the forward,
backward and decode wrappers of :mod:`.prefix_attention` run on ``meta`` tensors with the
module's ``launch`` replaced by a recorder, so each recorded launch carries exactly the pointer
dtypes, sizes, strides and flags a model's call passes, and Triton's launch specialization is
applied to those values. Each launch is compiled with every shipped configuration of its kernel.

Covered (sm_80 and sm_90, aligned; an unaligned fallback build for the bf16 head_dim-128 training
launches): a 7B-class attention layer (32 query heads, 8 KV heads, L = S = 4096 tokens, P = 128
prefix tokens, batch 2), activations fp16 with head dims 64 and 128, bf16 with 128 (head dims 80
and 96 use the same BLOCK_D = 128 tile as 128), fp32 with head dim 64 (with its own config lists);
the launches
* training forward / dQ / dK-dV of the sequence keys / dK-dV of the shared prefix, causal without
  padding, causal with a key padding mask, and bidirectional with padding and per-row tasks;
* decode: the shared-prefix pass (all rows of a kv head stacked) and the per-row cache pass.
"""
from __future__ import annotations

import torch

from ptune_rt.compile_report import AotVariant, launch_variant, recorded_launches

from . import prefix_attention as PA

B, HQ, HKV, L, P, TASKS = 2, 32, 8, 4096, 128, 3
CASES = [  # (activation dtype, head dim)
    (torch.float16, 64), (torch.float16, 128), (torch.bfloat16, 128), (torch.float32, 64)]
FLAGS = [  # (name, causal, padding mask, tasks)
    ("causal", True, False, False), ("causal+pad", True, True, False), ("bidir+pad+tasks", False, True, True)]
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PTX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _record(dtype, D):
    """(name, kernel, args, flags) of every launch of a training step and a decode step."""
    meta = dict(device="meta", dtype=dtype)
    out = []
    for tag, causal, pad, tasks in FLAGS:
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
        out += [(f"{n} {tag}", *r) for n, r in zip(names, rec)]
    q1 = torch.empty(B * 8, HQ, 1, D, **meta)  # decode: one new token per row, 8x the batch
    cache = torch.empty(B * 8, HKV, L, D, **meta)
    with recorded_launches(PA, "_check_device") as rec:
        PA.prefix_attention_decode(q1, cache, cache, torch.empty(HKV, P, D, **meta), torch.empty(HKV, P, D, **meta),
                                   torch.empty(B * 8, L, device="meta", dtype=torch.bool))
    out += [(n, *r) for n, r in zip(("decode prefix", "decode cache+pad"), rec)]
    return out


def aot_variants(full: bool = False) -> list[AotVariant]:
    """Every (launch, shipped config) variant of the prefix-attention kernels (see the docstring)."""
    names = {PA._attn_fwd_kernel: "fwd", PA._attn_bwd_dq_kernel: "dq", PA._attn_bwd_dkdv_kernel: "dkdv"}
    variants = []
    for dtype, D in CASES:
        for name, kernel, args, flags in _record(dtype, D):
            by_name = dict(zip(kernel.arg_names, args))
            fallback = full or (dtype == torch.bfloat16 and D == 128 and not name.startswith("decode")
                                and name.endswith(" causal"))
            for cfg in PA.shipped_configs(names[kernel], dtype):
                label = f"{_SHORT[dtype]} D{D} {name}"
                mma = (_PTX[dtype],) if dtype in _PTX else ()
                variants.append(launch_variant(
                    kernel.fn.__name__, kernel, by_name, {**flags, **cfg.meta}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, label=label, config=str(cfg), mma_dtypes=mma,
                    wgmma_on_sm90=False, fallback=fallback))
    return variants
