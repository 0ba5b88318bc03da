"""Eager reference of the DoRA linear, written for clarity, not speed.

It follows HF PEFT's DoRA (``DoraLinearLayer.forward`` without dropout): the adapted weight
``W + s B A`` is materialized in the activation dtype to take its row norms, which are detached;
the base output and the low-rank output (in the adapter's dtype) are rescaled by ``m / norm``.
"""
from __future__ import annotations

import torch


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float,
                          keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``m / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + b`` (norm detached); x [..., K], weight [N, K].
    With dropout (an explicit boolean ``keep_mask`` of x's shape, rate ``dropout_p``) PEFT's
    ``x W^T + b + (m / norm - 1) x_d W^T + m / norm * s (x_d A^T) B^T``, x_d the dropped input."""
    lora_weight = (lora_b.detach() @ lora_a.detach()).to(x.dtype)
    norm = torch.linalg.norm(weight.to(x.dtype) + scale * lora_weight, dim=1).to(x.dtype).detach()
    mns = (magnitude / norm).view(1, -1)
    base = torch.nn.functional.linear(x, weight)
    xd = x if keep_mask is None else x * keep_mask.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    dropped = base if keep_mask is None else torch.nn.functional.linear(xd, weight)
    lowrank = torch.nn.functional.linear(torch.nn.functional.linear(xd.to(lora_a.dtype), lora_a), lora_b)
    result = (mns - 1) * dropped + mns * lowrank * scale + base
    if bias is not None:
        result = result + bias
    return result.to(x.dtype)
