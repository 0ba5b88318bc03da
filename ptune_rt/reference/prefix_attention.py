"""Eager reference of prefix-fused attention: concatenate, build the mask, softmax. For clarity only."""
from __future__ import annotations

import math

import torch


def prefix_attention_mask(B: int, L: int, S: int, P: int, kv_mask=None, causal: bool = True,
                          device=None) -> torch.Tensor:
    """Boolean [B, 1, L, P + S] visibility: every query sees the P prefix keys; sequence key t is
    visible to query i iff it is not padding and, when causal, t <= (S - L) + i (bottom-right)."""
    vis = torch.ones((B, 1, L, P + S), dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(L, device=device)[:, None]
        t = torch.arange(S, device=device)[None, :]
        vis[..., P:] &= t <= (S - L) + i
    if kv_mask is not None:
        vis[..., P:] &= kv_mask.bool()[:, None, None, :]
    return vis


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, kv_mask=None, task_ids=None, causal=True,
                               sm_scale=None):
    """Attention of q [B, Hq, L, D] over [prefix ; sequence] keys, as HF's eager attention computes it:
    matmuls in the input dtype, softmax in fp32. Returns (out [B, Hq, L, D], lse [B, Hq, L] fp32).

    prefix_k/v: [Hkv, P, D] shared by all rows, or [T, Hkv, P, D] indexed by ``task_ids`` [B].
    k/v: [B, Hkv, S, D] or None. Rows that see no key (possible only without a prefix) give 0.
    """
    B, Hq, L, D = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    parts_k, parts_v = [], []
    P = 0
    if prefix_k is not None:
        pk = prefix_k[task_ids.long()] if task_ids is not None else prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        pv = prefix_v[task_ids.long()] if task_ids is not None else prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
        parts_k.append(pk.to(q.dtype))
        parts_v.append(pv.to(q.dtype))
        P = pk.shape[2]
    S = 0
    if k is not None:
        parts_k.append(k)
        parts_v.append(v)
        S = k.shape[2]
    kk = torch.cat(parts_k, dim=2)
    vv = torch.cat(parts_v, dim=2)
    group = Hq // kk.shape[1]
    kk = kk.repeat_interleave(group, dim=1)
    vv = vv.repeat_interleave(group, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    vis = prefix_attention_mask(B, L, S, P, kv_mask, causal, q.device)
    scores = scores.float().masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    return probs @ vv, lse
