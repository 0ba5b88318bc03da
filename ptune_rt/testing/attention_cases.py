"""Inputs and reference results for prefix-fused attention, shared by the tests and ``ptune-rt check``."""
from __future__ import annotations

import torch

from ptune_rt.reference import prefix_attention_reference

# (B, Hq, Hkv, L, S, P, D, causal, padding, tasks): GQA ratios 1/4/8, P in {1, 7, 64},
# L in {1, 13, 128} (L = 1 is a decode step against a cache of S - 1 keys, L < S a chunked
# prefill), causal and bidirectional, left/right padding, every head dim, per-row tasks.
CASES = [
    (2, 2, 2, 13, 13, 7, 32, True, None, False),
    (2, 8, 2, 13, 13, 1, 64, True, "left", False),
    (1, 8, 1, 128, 128, 64, 32, True, "right", False),
    (2, 4, 2, 13, 13, 64, 80, False, "right", False),
    (3, 8, 2, 1, 20, 7, 96, True, "left", False),
    (2, 4, 4, 1, 9, 64, 128, True, None, False),
    (2, 4, 2, 5, 17, 7, 32, True, "left", False),
    (3, 4, 2, 13, 13, 7, 32, True, "left", True),
]


def case_id(c) -> str:
    B, Hq, Hkv, L, S, P, D, causal, pad, tasks = c
    return (f"B{B}H{Hq}/{Hkv}L{L}S{S}P{P}D{D}" + ("" if causal else "-bidir") + (f"-{pad}" if pad else "")
            + ("-tasks" if tasks else ""))


def make_case(B, Hq, Hkv, L, S, P, D, causal, pad, tasks, dtype, device="cpu"):
    """q, k, v in ``dtype``; prefix_k/v fp32 ([Hkv, P, D], or [3, Hkv, P, D] with task_ids); kv_mask; do."""
    g = torch.Generator().manual_seed(B * 7 + Hq * 11 + L * 13 + S * 17 + P * 19 + D)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    lead = (3,) if tasks else ()
    pk = torch.randn(*lead, Hkv, P, D, generator=g)
    pv = torch.randn(*lead, Hkv, P, D, generator=g)
    task_ids = torch.tensor([(2 * i) % 3 for i in range(B)], dtype=torch.int32) if tasks else None
    kv_mask = None
    if pad:
        kv_mask = torch.ones(B, S, dtype=torch.bool)
        for row in range(B):
            n = min(S - 1, 2 + 3 * row)
            if n:
                if pad == "left":
                    kv_mask[row, :n] = False
                else:
                    kv_mask[row, S - n:] = False
    do = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    out = (q, k, v, pk, pv, kv_mask, task_ids, do)
    return tuple(t.to(device) if t is not None else None for t in out)


def reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, causal, do):
    """(out, lse, dq, dk, dv, dprefix_k, dprefix_v) of the eager reference in q's dtype and in float64.

    The prefix enters as q's dtype (the model casts its fp32 prefix parameter first)."""
    res = {}
    for tag, cast in (("ref", lambda t: t), ("gold", lambda t: t.double())):
        ins = [cast(t.detach().to(q.dtype)).requires_grad_() for t in (q, k, v, pk, pv)]
        o, lse = prefix_attention_reference(*ins, kv_mask, task_ids, causal)
        o.backward(cast(do))
        res[tag] = (o.detach(), lse.detach()) + tuple(t.grad for t in ins)
    return res["ref"], res["gold"]
