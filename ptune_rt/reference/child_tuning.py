"""Eager reference of Child-tuning's masked AdamW step (``ptune_rt.kernels.child_adamw``).

The step is torch's ``AdamW`` (single-tensor form: decoupled weight decay ``p *= 1 - lr * wd``,
``m = lerp(m, g, 1 - beta1)``, ``v = beta2 v + (1 - beta2) g^2``, ``p -= lr / bc1 * m / (sqrt(v) /
sqrt(bc2) + eps)``) computed in the moments' dtype (fp32, or fp64 for a float64 gold run) on a
gradient restricted to the child network:

* mode F: ``g = keep * g / reserve_p`` with ``keep`` a Bernoulli(reserve_p) mask; every entry steps.
* mode D: ``keep`` is the child; entries outside it keep their parameter and moments bit for bit.

:func:`keep_mask` materializes mode F's mask. On CUDA and under ``TRITON_INTERPRET=1`` it runs a
Triton kernel that writes exactly the keep decisions the fused step draws in-kernel (same Philox key
and counters); elsewhere (CPU without Triton) it draws from torch's generator: a different random
stream, the same Bernoulli(reserve_p) distribution.
"""
from __future__ import annotations

import math

import torch

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The Philox key of optimizer step ``step`` of a run seeded ``seed``: splitmix64 of the pair, in
    [0, 2**63) so that a one-element int64 tensor holds it. Every tensor of the step shares the key
    and gets its own counter range (its stream)."""
    return _splitmix64(_splitmix64(int(seed) & MASK64) ^ int(step)) >> 1


def _triton_masks(device: torch.device) -> bool:
    from ptune_rt.kernels._triton_utils import interpreting

    return device.type == "cuda" or interpreting()


def keep_mask(shape, reserve_p: float, seed: int, stream: int, device) -> torch.Tensor:
    """Mode F's bool keep mask of tensor ``stream`` under the step key ``seed`` (see :func:`step_seed`).

    CUDA / interpreter: the fused kernel's own Philox decisions. Otherwise torch's generator seeded
    from (seed, stream): a different stream with the same distribution."""
    device = torch.device(device)
    shape = tuple(shape)
    numel = math.prod(shape)
    if _triton_masks(device):
        from ptune_rt.kernels.child_adamw import child_keep_mask

        return child_keep_mask(numel, reserve_p, seed, stream, device).reshape(shape)
    gen = torch.Generator(device=device).manual_seed(_splitmix64(int(seed) ^ _splitmix64(int(stream))) >> 1)
    return torch.rand(shape, generator=gen, device=device) < reserve_p


def adamw_in_place(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch's single-tensor AdamW step, op for op, on ``p``, ``m``, ``v`` in place."""
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))


@torch.no_grad()
def child_adamw_reference(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                          mode=None, reserve_p: float = 1.0, keep: torch.Tensor | None = None) -> None:
    """One masked AdamW step in place; ``keep``: bool like ``param`` (mode F's Bernoulli mask, or mode
    D's child), unused when ``mode`` is None or mode F has reserve_p = 1."""
    if mode not in (None, "F", "D"):
        raise ValueError(f"mode must be None, 'F' or 'D', got {mode!r}")
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    work = exp_avg.dtype
    g = grad.to(work)
    if mode == "F" and reserve_p < 1.0:
        g = torch.where(keep, g / reserve_p, torch.zeros((), dtype=work, device=g.device))
    if mode == "D":  # the same ops out of place, then only the child's entries written back
        p = param.to(work) * (1.0 - lr * weight_decay)
        m = exp_avg.lerp(g, 1.0 - beta1)
        v = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))
        torch.where(keep, p.to(param.dtype), param, out=param)
        torch.where(keep, m, exp_avg, out=exp_avg)
        torch.where(keep, v, exp_avg_sq, out=exp_avg_sq)
        return
    p = param if param.dtype == work else param.to(work)
    adamw_in_place(p, g, exp_avg, exp_avg_sq, **hyper)
    if p is not param:
        param.copy_(p)
