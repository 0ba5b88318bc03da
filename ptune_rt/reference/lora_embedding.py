"""Eager reference of the fused LoRA embedding, written for clarity, not speed.

It follows HF PEFT's LoRA ``Embedding.forward`` exactly (no dropout: PEFT builds a dropout module
for embeddings but never applies it): the frozen table is gathered with the base embedding's
options, the adapter's A^T is gathered with the same options (PEFT's ``_embed`` passes the base
layer's ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and ``sparse``), the
low-rank term is ``(A^T[ids] @ B^T) * scale`` in the adapter's dtype, the sum is formed in the
promoted dtype and cast back to the table's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_embedding_reference(ids: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                             scale: float, padding_idx: int | None = None, max_norm: float | None = None,
                             norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                             sparse: bool = False) -> torch.Tensor:
    """``weight[ids] + scale * lora_a.T[ids] @ lora_b.T``: ids [...], weight [V, D], lora_a [r, V],
    lora_b [D, r]; returns [..., D] in weight's dtype."""
    options = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
    result = F.embedding(ids, weight, **options)
    after_a = F.embedding(ids, lora_a.T, **options)
    adapter_output = (after_a @ lora_b.T) * scale
    return (result + adapter_output).to(result.dtype)
