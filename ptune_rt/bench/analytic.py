"""Analytic HBM traffic, FLOPs and a roofline bound of one LoRA linear (a model, not a measurement).

For one linear ``y = x W^T + s * (dropout(x) A^T) B^T`` with x [M, K], W [N, K], A [r, K], B [N, r]
we list the kernels each implementation launches and count, per kernel, the bytes it reads and
writes in HBM, assuming ideal tiling (every operand read once per kernel, every result written
once; no L2 reuse across kernels) and its FLOPs. A kernel's time bound is
``max(flop_time, bytes / hbm_bandwidth)``; kernels run one after another, so a chain's bound is the
sum of its kernels' bounds. FLOP time depends on the arithmetic a product runs in: dense bf16/fp16
tensor cores at the peak, 3xTF32 (three TF32 MMAs at half the bf16 rate) at 1/6 of it, two TF32
MMAs (a half operand, exact in TF32, times an fp32 one split in two) at 1/4, IEEE fp32 on the CUDA
cores at the fp32 peak.

* ``unfused``: HF PEFT's eager chain. PEFT keeps the adapter weights in fp32 by default
  (``autocast_adapter_dtype=True``) even on a half base model, and casts x to the adapters' dtype,
  so beside a half base the low-rank path is fp32 throughout: cast x, dropout (reads x, writes the
  dropped copy and its mask; only with dropout), A GEMM, B GEMM (an fp32 M x N result), scale, add
  (promotes to fp32), cast back; backward: the autograd chain of the same ops (the casts included)
  plus the accumulation of the two input gradients.
* ``fused``: ptune-rt's Triton path: forward = skinny shrink kernel ``S = dropout(x) A^T`` (fp32,
  mask regenerated from a seed) + one GEMM whose epilogue adds ``s * S B^T``; backward =
  ``G = dY B``, one GEMM for ``dX = dY W + s (G A)`` (low-rank term in the epilogue),
  ``dB = s dY^T S``, ``dA = s G^T dropout(x)``. Beside half activations the epilogue's fp32 x fp32
  product (S or G times fp32 adapters) runs as 3xTF32, about 6r/K of the main loop's tensor-core
  time, not r/K; the skinny kernels multiply a half operand by an fp32 one in two TF32 MMAs.
"""
from __future__ import annotations

import dataclasses

#: H100 SXM5: dense bf16 tensor-core peak, IEEE fp32 (CUDA-core) peak and HBM3 bandwidth.
H100_SXM = {"name": "H100 SXM", "peak_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes_per_s": 3.35e12}
#: H200 SXM: the H100's compute with HBM3e (141 GB).
H200 = {"name": "H200", "peak_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes_per_s": 4.8e12}
#: Roofline models by a substring of ``torch.cuda.get_device_name()``, most specific first.
HARDWARE_BY_DEVICE_NAME = (("H200", H200), ("H100", H100_SXM))

#: One 3xTF32 FLOP costs six dense bf16 tensor-core FLOPs: three TF32 MMAs at half the bf16 rate.
TF32X3_COST = 6.0
#: A half x fp32 product as two TF32 MMAs (the fp32 operand split in a TF32 head and the rest).
TF32X2_COST = 4.0
#: Bytes per element of PEFT's LoRA adapter weights by default (fp32: ``autocast_adapter_dtype=True``).
PEFT_ADAPTER_BYTES = 4

SEVEN_B_SHAPES = [  # (label, M tokens, K in, N out)
    ("q/k/v/o_proj 4096->4096", 8192, 4096, 4096),
    ("gate/up_proj 4096->11008", 8192, 4096, 11008),
    ("down_proj 11008->4096", 8192, 11008, 4096),
]


def hardware_for(device_name: str) -> tuple[dict, str]:
    """The roofline model for a device name and how it was chosen: ``(hw, note)``."""
    for key, hw in HARDWARE_BY_DEVICE_NAME:
        if key.lower() in (device_name or "").lower():
            return hw, f"{hw['name']} model (matched '{key}' in the device name)"
    return H100_SXM, f"no model for '{device_name}': the {H100_SXM['name']} model stands in"


@dataclasses.dataclass
class Kernel:
    """One kernel's HBM traffic and FLOPs. ``flops`` is the total; ``tf32x3_flops`` and
    ``fp32_flops`` say which part of it runs as 3xTF32 or as IEEE fp32 (the rest on half tensor cores)."""
    name: str
    read: float
    write: float
    flops: float
    tf32x3_flops: float = 0.0
    fp32_flops: float = 0.0
    tf32x2_flops: float = 0.0

    @property
    def bytes(self) -> float:
        return self.read + self.write

    def flop_time_s(self, hw: dict) -> float:
        half = self.flops - self.tf32x3_flops - self.fp32_flops - self.tf32x2_flops
        return ((half + TF32X3_COST * self.tf32x3_flops + TF32X2_COST * self.tf32x2_flops) / hw["peak_flops"]
                + self.fp32_flops / hw.get("fp32_flops", hw["peak_flops"]))

    def bound_s(self, hw: dict) -> float:
        return max(self.flop_time_s(hw), self.bytes / hw["hbm_bytes_per_s"])


def _mm(name, read, write, flops, math) -> Kernel:
    """A kernel whose FLOPs all run in ``math``: "half" (tensor cores), "tf32x3", "tf32x2" or "fp32"."""
    return Kernel(name, read, write, flops, tf32x3_flops=flops if math == "tf32x3" else 0.0,
                  fp32_flops=flops if math == "fp32" else 0.0, tf32x2_flops=flops if math == "tf32x2" else 0.0)


def _skinny_math(act_bytes, other_bytes) -> str:
    """The skinny kernel's arithmetic: a half activation times an fp32 operand runs as two TF32 MMAs."""
    return "tf32x2" if (act_bytes, other_bytes) == (2, 4) else _math(act_bytes, other_bytes)


def _math(*elem_bytes) -> str:
    """Arithmetic of a product whose operands have these element sizes, as the kernels pick it:
    all half -> tensor cores; all fp32 -> IEEE fp32 (torch's default, TF32 off); mixed -> 3xTF32."""
    if all(b == 2 for b in elem_bytes):
        return "half"
    return "fp32" if all(b == 4 for b in elem_bytes) else "tf32x3"


def unfused_kernels(M, K, N, r, e=2, p=0.0, backward=False, a=PEFT_ADAPTER_BYTES) -> list[Kernel]:
    """PEFT's eager op chain (e = bytes per activation/weight element, a = per adapter element,
    1-byte bool mask). The low-rank path runs in the adapters' dtype (x cast to it, as PEFT does)."""
    drop, cast = p > 0, a != e
    base, lr, y = _math(e), _math(a), max(e, a)  # the add promotes to the wider dtype
    if not backward:
        ks = [_mm("base GEMM y0 = x W^T", M * K * e + N * K * e, M * N * e, 2 * M * N * K, base)]
        if cast:
            ks.append(Kernel("cast x to the adapter dtype", M * K * e, M * K * a, 0))
        if drop:
            ks.append(Kernel("dropout xd = x * mask / (1-p)", M * K * a, M * K * a + M * K, M * K))
        ks += [_mm("A GEMM S = xd A^T", M * K * a + r * K * a, M * r * a, 2 * M * K * r, lr),
               _mm("B GEMM T = S B^T", M * r * a + N * r * a, M * N * a, 2 * M * N * r, lr),
               Kernel("scale T * s", M * N * a, M * N * a, M * N),
               Kernel("add y = y0 + T", M * N * e + M * N * a, M * N * y, M * N)]
        if cast:
            ks.append(Kernel("cast y back to the base dtype", M * N * y, M * N * e, 0))
        return ks
    ks = []
    if cast:
        ks += [Kernel("cast backward: dY to the adapter dtype", M * N * e, M * N * a, 0),
               Kernel("add backward: dY back to the base dtype for the base GEMM", M * N * a, M * N * e, 0)]
    ks += [Kernel("scale backward dT = s dY", M * N * a, M * N * a, M * N),
           _mm("B GEMM dS = dT B", M * N * a + N * r * a, M * r * a, 2 * M * N * r, lr),
           _mm("B GEMM dB = dT^T S", M * N * a + M * r * a, N * r * a, 2 * M * N * r, lr),
           _mm("A GEMM dxd = dS A", M * r * a + r * K * a, M * K * a, 2 * M * r * K, lr),
           _mm("A GEMM dA = dS^T xd", M * r * a + M * K * a, r * K * a, 2 * M * r * K, lr)]
    if drop:
        ks.append(Kernel("dropout backward dxl = dxd * mask / (1-p)", M * K * a + M * K, M * K * a, M * K))
    if cast:
        ks.append(Kernel("cast backward: dx of the low-rank path to the base dtype", M * K * a, M * K * e, 0))
    ks += [_mm("base GEMM dx0 = dY W", M * N * e + N * K * e, M * K * e, 2 * M * N * K, base),
           Kernel("accumulate dx = dx0 + dxl", 2 * M * K * e, M * K * e, M * K)]
    return ks


def fused_kernels(M, K, N, r, e=2, p=0.0, backward=False, a=PEFT_ADAPTER_BYTES) -> list[Kernel]:
    """ptune-rt's Triton kernels (S and G fp32; dropout mask regenerated, never stored)."""
    f = 4
    base, lr = _math(e), _math(e, f)  # the epilogue's S / G are fp32: 3xTF32 beside half activations

    def gemm(name, read, write, main, low):
        return Kernel(name, read, write, main + low, tf32x3_flops=low if lr == "tf32x3" else 0.0,
                      fp32_flops=(main if base == "fp32" else 0.0) + (low if lr == "fp32" else 0.0))

    if not backward:
        return [_mm("shrink S = dropout(x) A^T", M * K * e + r * K * a, M * r * f, 2 * M * K * r, _skinny_math(e, a)),
                gemm("fused GEMM y = x W^T + s S B^T", M * K * e + N * K * e + M * r * f + N * r * a,
                     M * N * e, 2 * M * N * K, 2 * M * N * r)]
    return [_mm("G = dY B", M * N * e + N * r * a, M * r * f, 2 * M * N * r, _skinny_math(e, a)),
            gemm("fused GEMM dX = dY W + s (G A)", M * N * e + N * K * e + M * r * f + r * K * a,
                 M * K * e, 2 * M * N * K, 2 * M * r * K),
            _mm("dB = s dY^T S", M * N * e + M * r * f, N * r * f, 2 * M * N * r, _skinny_math(e, f)),
            _mm("dA = s G^T dropout(x)", M * r * f + M * K * e, r * K * f, 2 * M * r * K, _skinny_math(e, f))]


def _chain(ks: list[Kernel], hw: dict) -> dict:
    return {"kernels": len(ks), "bytes": sum(k.bytes for k in ks), "flops": sum(k.flops for k in ks),
            "bound_s": sum(k.bound_s(hw) for k in ks),
            "detail": [{"kernel": k.name, "read": k.read, "write": k.write, "flops": k.flops,
                        "tf32x3_flops": k.tf32x3_flops, "tf32x2_flops": k.tf32x2_flops, "fp32_flops": k.fp32_flops,
                        "bound_s": k.bound_s(hw)} for k in ks]}


def linear_model(M, K, N, r, e=2, p=0.0, hw=H100_SXM, a=PEFT_ADAPTER_BYTES) -> dict:
    out = {}
    for pass_ in ("forward", "backward"):
        bwd = pass_ == "backward"
        un = _chain(unfused_kernels(M, K, N, r, e, p, bwd, a), hw)
        fu = _chain(fused_kernels(M, K, N, r, e, p, bwd, a), hw)
        base = _mm("frozen GEMM", (M * K + N * K + M * N) * e, 0, 2 * M * N * K, _math(e))
        out[pass_] = {"unfused": un, "fused": fu,
                      "bytes_ratio_fused_over_unfused": fu["bytes"] / un["bytes"],
                      "bound_speedup_unfused_over_fused": un["bound_s"] / fu["bound_s"],
                      "frozen_gemm_alone_bound_s": base.bound_s(hw)}
    return out


def seven_b_table(r: int = 16, e: int = 2, dropouts=(0.0, 0.1), hw=H100_SXM, a=PEFT_ADAPTER_BYTES) -> dict:
    rows = []
    for label, M, K, N in SEVEN_B_SHAPES:
        for p in dropouts:
            rows.append({"shape": label, "M": M, "K": K, "N": N, "r": r, "dtype_bytes": e,
                         "adapter_dtype_bytes": a, "dropout": p, **linear_model(M, K, N, r, e, p, hw, a)})
    return {"hardware": hw, "dtype": "bfloat16" if e == 2 else f"{e}-byte",
            "adapter_dtype": "float32" if a == 4 else f"{a}-byte", "r": r, "rows": rows,
            "note": "analytic model (ideal tiling, per-kernel roofline, kernels serialized), not a measurement; "
                    "adapters in PEFT's default fp32 on both sides, 3xTF32 counted at 6x a bf16 MMA"}


def lora_linear_flops(M, K, N, r) -> dict:
    """Analytic FLOPs of one LoRA linear (matrix products only)."""
    fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    # dX through W and A, plus G, dB, dA (W frozen: no dW)
    bwd = 2 * M * N * K + 2 * M * r * K + 2 * M * N * r + 2 * M * N * r + 2 * M * r * K
    return {"forward": fwd, "backward": bwd}
