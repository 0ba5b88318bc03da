"""Eager reference of the soft-prompt input builder: per row, gather and concatenate."""
from __future__ import annotations

import torch


def build_inputs_embeds_reference(src, embedding, prompts, task_ids=None, out_dtype=None):
    """out[b, j] = embedding[src[b, j]] if src[b, j] >= 0 else prompts[task(b), -src[b, j] - 1]."""
    p3 = prompts.unsqueeze(0) if prompts.dim() == 2 else prompts
    rows = []
    for b in range(src.shape[0]):
        task = int(task_ids[b]) if task_ids is not None else 0
        pieces = [embedding[int(s)] if s >= 0 else p3[task, -int(s) - 1] for s in src[b]]
        rows.append(torch.stack([p.to(out_dtype or embedding.dtype) for p in pieces]))
    return torch.stack(rows)
