"""What ``ptune_rt.report`` says of IA3: one row per swapped module, its table cells and summary."""
from __future__ import annotations

import torch
from torch import nn

from ptune_rt.methods.ia3.inject import SOURCE_ATTR, ia3_modules
from ptune_rt.report_format import backends_cell, plural


def ia3_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of IA3: one per swapped module (keys: module, method "ia3", source, adapter,
    in_features, out_features, scaled: "input" (feedforward) or "output", size (the vector's
    length), dtype, device, backend, why, merged)."""
    rows = []
    for n, m in ia3_modules(model).items():
        backend, why = m.backend_choice()
        w = m.base_layer.weight
        if w.dtype == torch.float64 and backend == "torch":
            why += "; float64 as plain torch ops (the fused op takes float32, float16 and bfloat16)"
        rows.append({"module": n, "method": "ia3", "source": m.__dict__.get(SOURCE_ATTR, "apply"),
                     "adapter": m.active_adapter, "in_features": m.in_features, "out_features": m.out_features,
                     "scaled": "input" if m.is_feedforward else "output",
                     "size": m.in_features if m.is_feedforward else m.out_features,
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device), "backend": backend,
                     "why": why, "merged": m.merged})
    return rows


def ia3_cells(r: dict) -> tuple[str, str, str]:
    """(shape, r / P, merged) cells of an IA3 row: the vector scales the input or the output."""
    return f"{r['in_features']}->{r['out_features']}", f"{r['scaled']} {r['size']}", "yes" if r["merged"] else "no"


def ia3_summary(rows: list[dict]) -> str:
    inputs = sum(r["scaled"] == "input" for r in rows)
    return (f"{plural(len(rows), 'IA3 module')} ({inputs} input-scaled, {len(rows) - inputs} output-scaled): "
            f"{backends_cell(rows)}")
