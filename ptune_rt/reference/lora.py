"""Eager reference of the fused LoRA linear, written for clarity, not speed.

It follows HF PEFT's LoRA ``Linear.forward`` exactly: the frozen layer runs in the base
dtype, the low-rank path runs in the adapter's dtype (input cast to it), the two are added
and the sum is cast back to the base output dtype.
"""
from __future__ import annotations

import torch


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``x W^T + b + scale * (dropout(x) A^T) B^T``.

    x [..., K], weight [N, K] (any strides), lora_a [r, K], lora_b [N, r]. Dropout is given as an
    explicit boolean ``keep_mask`` of x's shape with rate ``dropout_p`` (inverted dropout).
    """
    result = torch.nn.functional.linear(x, weight, bias)
    xa = x.to(lora_a.dtype)
    if keep_mask is not None:
        xa = xa * keep_mask.reshape(x.shape).to(xa.dtype) / (1.0 - dropout_p)
    lowrank = torch.nn.functional.linear(torch.nn.functional.linear(xa, lora_a), lora_b) * scale
    return (result + lowrank).to(result.dtype)
