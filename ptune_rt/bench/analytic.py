"""Analytic HBM traffic, FLOPs and an H100 roofline bound of one LoRA linear (a model, not a measurement).

For one linear ``y = x W^T + s * (dropout(x) A^T) B^T`` with x [M, K], W [N, K], A [r, K], B [N, r]
we list the kernels each implementation launches and count, per kernel, the bytes it reads and
writes in HBM, assuming ideal tiling (every operand read once per kernel, every result written
once; no L2 reuse across kernels) and its FLOPs. A kernel's time bound is
``max(flops / peak_flops, bytes / hbm_bandwidth)``; kernels run one after another, so a chain's
bound is the sum of its kernels' bounds.

* ``unfused``: HF PEFT's eager chain: base GEMM, dropout (reads x, writes the dropped copy and its
  mask; only with dropout), A GEMM, B GEMM, scale, add; backward: the autograd chain of the same ops
  plus the accumulation of the two input gradients.
* ``fused``: ptune-rt's Triton path: forward = skinny shrink kernel ``S = dropout(x) A^T`` (fp32,
  mask regenerated from a seed) + one GEMM whose epilogue adds ``s * S B^T``; backward =
  ``G = dY B``, one GEMM for ``dX = dY W + s (G A)`` (low-rank term in the epilogue),
  ``dB = s dY^T S``, ``dA = s G^T dropout(x)``.

Adapter weights and their gradients are taken in the activation dtype for the unfused chain (the
same size either way, they are tiny); S and G are fp32 in the fused path, as in the kernels.
"""
from __future__ import annotations

import dataclasses

#: H100 SXM5: dense bf16 tensor-core peak and HBM3 bandwidth.
H100_SXM = {"name": "H100 SXM", "peak_flops": 989e12, "hbm_bytes_per_s": 3.35e12}

SEVEN_B_SHAPES = [  # (label, M tokens, K in, N out)
    ("q/k/v/o_proj 4096->4096", 8192, 4096, 4096),
    ("gate/up_proj 4096->11008", 8192, 4096, 11008),
    ("down_proj 11008->4096", 8192, 11008, 4096),
]


@dataclasses.dataclass
class Kernel:
    name: str
    read: float
    write: float
    flops: float

    @property
    def bytes(self) -> float:
        return self.read + self.write

    def bound_s(self, hw: dict) -> float:
        return max(self.flops / hw["peak_flops"], self.bytes / hw["hbm_bytes_per_s"])


def unfused_kernels(M, K, N, r, e=2, p=0.0, backward=False) -> list[Kernel]:
    """PEFT's eager op chain (e = bytes per activation/weight element, 1-byte bool mask)."""
    drop = p > 0
    if not backward:
        ks = [Kernel("base GEMM y0 = x W^T", M * K * e + N * K * e, M * N * e, 2 * M * N * K)]
        if drop:
            ks.append(Kernel("dropout xd = x * mask / (1-p)", M * K * e, M * K * e + M * K, M * K))
        ks += [Kernel("A GEMM S = xd A^T", M * K * e + r * K * e, M * r * e, 2 * M * K * r),
               Kernel("B GEMM T = S B^T", M * r * e + N * r * e, M * N * e, 2 * M * N * r),
               Kernel("scale T * s", M * N * e, M * N * e, M * N),
               Kernel("add y = y0 + T", 2 * M * N * e, M * N * e, M * N)]
        return ks
    ks = [Kernel("scale backward dT = s dY", M * N * e, M * N * e, M * N),
          Kernel("B GEMM dS = dT B", M * N * e + N * r * e, M * r * e, 2 * M * N * r),
          Kernel("B GEMM dB = dT^T S", M * N * e + M * r * e, N * r * e, 2 * M * N * r),
          Kernel("A GEMM dxd = dS A", M * r * e + r * K * e, M * K * e, 2 * M * r * K),
          Kernel("A GEMM dA = dS^T xd", M * r * e + M * K * e, r * K * e, 2 * M * r * K)]
    if drop:
        ks.append(Kernel("dropout backward dxl = dxd * mask / (1-p)", M * K * e + M * K, M * K * e, M * K))
    ks += [Kernel("base GEMM dx0 = dY W", M * N * e + N * K * e, M * K * e, 2 * M * N * K),
           Kernel("accumulate dx = dx0 + dxl", 2 * M * K * e, M * K * e, M * K)]
    return ks


def fused_kernels(M, K, N, r, e=2, p=0.0, backward=False) -> list[Kernel]:
    """ptune-rt's Triton kernels (S and G fp32; dropout mask regenerated, never stored)."""
    f = 4
    if not backward:
        return [Kernel("shrink S = dropout(x) A^T", M * K * e + r * K * e, M * r * f, 2 * M * K * r),
                Kernel("fused GEMM y = x W^T + s S B^T", M * K * e + N * K * e + M * r * f + N * r * e,
                       M * N * e, 2 * M * N * K + 2 * M * N * r)]
    return [Kernel("G = dY B", M * N * e + N * r * e, M * r * f, 2 * M * N * r),
            Kernel("fused GEMM dX = dY W + s (G A)", M * N * e + N * K * e + M * r * f + r * K * e,
                   M * K * e, 2 * M * N * K + 2 * M * r * K),
            Kernel("dB = s dY^T S", M * N * e + M * r * f, N * r * f, 2 * M * N * r),
            Kernel("dA = s G^T dropout(x)", M * r * f + M * K * e, r * K * f, 2 * M * r * K)]


def _chain(ks: list[Kernel], hw: dict) -> dict:
    return {"kernels": len(ks), "bytes": sum(k.bytes for k in ks), "flops": sum(k.flops for k in ks),
            "bound_s": sum(k.bound_s(hw) for k in ks),
            "detail": [{"kernel": k.name, "read": k.read, "write": k.write, "flops": k.flops,
                        "bound_s": k.bound_s(hw)} for k in ks]}


def linear_model(M, K, N, r, e=2, p=0.0, hw=H100_SXM) -> dict:
    out = {}
    for pass_ in ("forward", "backward"):
        bwd = pass_ == "backward"
        un = _chain(unfused_kernels(M, K, N, r, e, p, bwd), hw)
        fu = _chain(fused_kernels(M, K, N, r, e, p, bwd), hw)
        base_flops = 2 * M * N * K
        base_bytes = (M * K + N * K + M * N) * e
        base_bound = max(base_flops / hw["peak_flops"], base_bytes / hw["hbm_bytes_per_s"])
        out[pass_] = {"unfused": un, "fused": fu,
                      "bytes_ratio_fused_over_unfused": fu["bytes"] / un["bytes"],
                      "bound_speedup_unfused_over_fused": un["bound_s"] / fu["bound_s"],
                      "frozen_gemm_alone_bound_s": base_bound}
    return out


def seven_b_table(r: int = 16, e: int = 2, dropouts=(0.0, 0.1), hw=H100_SXM) -> dict:
    rows = []
    for label, M, K, N in SEVEN_B_SHAPES:
        for p in dropouts:
            rows.append({"shape": label, "M": M, "K": K, "N": N, "r": r, "dtype_bytes": e, "dropout": p,
                         **linear_model(M, K, N, r, e, p, hw)})
    return {"hardware": hw, "dtype": "bfloat16" if e == 2 else f"{e}-byte", "r": r, "rows": rows,
            "note": "analytic model (ideal tiling, per-kernel roofline, kernels serialized), not a measurement"}


def lora_linear_flops(M, K, N, r) -> dict:
    """Analytic FLOPs of one LoRA linear (matrix products only)."""
    fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    # dX through W and A, plus G, dB, dA (W frozen: no dW)
    bwd = 2 * M * N * K + 2 * M * r * K + 2 * M * N * r + 2 * M * N * r + 2 * M * r * K
    return {"forward": fwd, "backward": bwd}
