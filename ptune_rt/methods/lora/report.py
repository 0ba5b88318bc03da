"""What ``ptune_rt.report`` says of LoRA: one row per swapped module, its table cells and summary."""
from __future__ import annotations

import torch
from torch import nn

from ptune_rt.methods.lora.groups import projection_group_names
from ptune_rt.methods.lora.inject import SOURCE_ATTR, lora_modules
from ptune_rt.methods.lora.swiglu import RecomputeSwiGLUMixin
from ptune_rt.report_format import backends_cell, plural

def lora_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of LoRA: one per swapped module (keys: module, method "lora", source, adapter,
    in_features, out_features, r, scaling, dropout, dtype, device, backend, why, merged,
    recompute_input: True for the down projection of a SwiGLU MLP that recomputes silu(gate) * up
    in backward, input_group: e.g. "q_proj+k_proj+v_proj" for a layer that trains in a projection
    group, else None)."""
    rows = []
    recompute = {f"{n}.down_proj" for n, m in model.named_modules() if isinstance(m, RecomputeSwiGLUMixin)}
    groups = projection_group_names(model)
    for n, m in lora_modules(model).items():
        backend, why = m.backend_choice()
        w = m.base_layer.weight
        if w.dtype == torch.float64 and backend == "torch":
            why += "; float64 as plain torch ops (the fused op takes float32, float16 and bfloat16)"
        name = m.active_adapter
        rows.append({"module": n, "method": "lora", "source": m.__dict__.get(SOURCE_ATTR, "apply"),
                     "adapter": name, "in_features": m.in_features, "out_features": m.out_features,
                     "r": m.r.get(name), "scaling": m.scaling.get(name), "dropout": m.lora_dropout_p.get(name),
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device),
                     "backend": backend, "why": why, "merged": m.merged, "recompute_input": n in recompute,
                     "input_group": groups.get(n)})
    return rows


def lora_cells(r: dict) -> tuple[str, str, str]:
    """(shape, r / P, merged) cells of a LoRA row in ``format_report``'s table."""
    return f"{r['in_features']}->{r['out_features']}", str(r["r"]), "yes" if r["merged"] else "no"


def lora_summary(rows: list[dict]) -> str:
    return f"{plural(len(rows), 'LoRA module')}: {backends_cell(rows)}"
