"""Inputs and reference results for the fused LoRA linear, shared by the tests and ``ptune-rt check``."""
from __future__ import annotations

import torch

from ptune_rt.reference import lora_linear_reference

#: (M, K, N, r): odd sizes that are not block multiples, rank 1, large ranks up to 256, decode-sized M.
SHAPES = [(37, 45, 53, 5), (64, 64, 96, 16), (1, 40, 72, 1), (19, 130, 33, 32), (70, 96, 80, 72),
          (9, 260, 264, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(M, K, N, r, dtype, adapter_dtype=torch.float32, bias=True, conv1d=False, strided=False,
              device="cpu"):
    """x [M, K], weight [N, K], bias [N], lora_a [r, K], lora_b [N, r], deterministic per shape.

    ``conv1d`` gives the weight as the [N, K] transposed view of a [K, N] tensor (GPT-2's layout);
    ``strided`` gives x as a strided slice of a larger activation.
    """
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N + r)
    x = torch.randn(M, 2 * K if strided else K, generator=g).to(dtype)
    if strided:
        x = x[:, ::2]
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    if conv1d:
        w = w.t().contiguous().t()
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    bb = (torch.randn(N, r, generator=g) / r**0.5).to(adapter_dtype)
    return tuple(t.to(device) if t is not None else None for t in (x, w, b, a, bb))


def reference_and_gold(x, w, b, a, bb, scale, keep, p, dy):
    """(y, dx, dA, dB) of the eager reference in the inputs' dtypes and in float64."""
    outs = {}
    for tag, cast in (("ref", lambda t: t), ("gold", lambda t: t.double())):
        xs = cast(x.detach()).requires_grad_()
        As = cast(a.detach()).requires_grad_()
        Bs = cast(bb.detach()).requires_grad_()
        y = lora_linear_reference(xs, cast(w), None if b is None else cast(b), As, Bs, scale, keep, p)
        y.backward(cast(dy))
        outs[tag] = (y.detach(), xs.grad, As.grad, Bs.grad)
    return outs["ref"], outs["gold"]
