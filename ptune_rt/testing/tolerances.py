"""The one place where numerical tolerances live.

Rule (FlashAttention's test rule, DESIGN.md section 4): on the same inputs compute

* ``out``: the fused kernel / op under test,
* ``ref``: the eager reference in the same dtype,
* ``gold``: the eager reference in float64,

and require ``max|out - gold| <= FACTOR * max|ref - gold| + FLOOR * max(1, max|gold|)``.

The kernel may be no worse than a small multiple of eager PyTorch's own rounding error. The floor
(relative to the magnitude of the result) covers cases where eager happens to be almost exact
(e.g. fp32 on tiny reductions) and reduction-order noise dominates. These numbers are never
loosened to make a test pass: a failure is a bug to find.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    factor: float  # allowed multiple of eager's own error to float64
    floor: float   # absolute floor, relative to max(1, max|gold|)


TOLERANCES = {
    torch.float32: Tolerance(factor=2.0, floor=1e-5),
    torch.float16: Tolerance(factor=2.0, floor=1e-3),
    torch.bfloat16: Tolerance(factor=2.0, floor=8e-3),
}


def error_report(out: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, dtype: torch.dtype) -> dict:
    """Errors of ``out`` and ``ref`` against ``gold`` and the bound the rule allows."""
    tol = TOLERANCES[dtype]
    gold = gold.double()
    err = (out.double() - gold).abs().max().item() if out.numel() else 0.0
    ref_err = (ref.double() - gold).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, gold.abs().max().item() if gold.numel() else 0.0)
    bound = tol.factor * ref_err + tol.floor * scale
    return {"err": err, "ref_err": ref_err, "bound": bound, "ok": err <= bound}


def assert_close_to_reference(out, ref, gold, dtype, name: str = "output") -> dict:
    if out.shape != gold.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(gold.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the output")
    r = error_report(out, ref, gold, dtype)
    if not r["ok"]:
        raise AssertionError(f"{name} ({dtype}): max error {r['err']:.3e} to float64 exceeds the bound "
                             f"{r['bound']:.3e} (eager {dtype} error {r['ref_err']:.3e})")
    return r


#: Two fp32 runs of one model through different, equally accurate code paths (fused modules vs
#: PEFT's, torch.compile vs eager, merged vs unmerged weights), compared directly where no float64
#: run is made: ``max|out - ref| <= FP32_END_TO_END * max(1, max|ref|)``. On the tiny test models
#: such runs differ by accumulated fp32 rounding (~1e-7 relative); 1e-5 still catches a wrong
#: scale, a missing bias or a dropped adapter (>= 1e-3 there). Where a float64 run exists, the
#: factor-and-floor rule above is used instead.
FP32_END_TO_END = 1e-5


def assert_fp32_end_to_end_close(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> float:
    """Check ``out`` against ``ref`` (both fp32 runs) by ``FP32_END_TO_END``; returns max|out - ref|."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the output")
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    bound = FP32_END_TO_END * max(1.0, ref.double().abs().max().item() if ref.numel() else 0.0)
    if err > bound:
        raise AssertionError(f"{name}: max difference {err:.3e} to the fp32 reference exceeds {bound:.3e}")
    return err
