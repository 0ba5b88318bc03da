"""What ``ptune_rt.report`` says of a prefix: one row per self-attention layer carrying it, and the
summary line."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.prefix import inject
from ptune_rt.ops.backend import resolve_backend
from ptune_rt.report_format import backends_cell, carriers, dtype_device, plural, sizes_cell, tasks_cell


def _attention_dropout(m: nn.Module) -> float:
    """The attention-probability dropout a transformers attention module passes while training."""
    if not m.training:
        return 0.0
    p = getattr(m, "attention_dropout", None)  # Llama, Qwen, Mistral: a float
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        d = getattr(m, "attn_dropout", None) or getattr(m, "dropout", None)  # GPT-2 / BERT: an nn.Dropout
        p = getattr(d, "p", 0.0) if isinstance(d, nn.Module) else 0.0
    return float(p or 0.0)


def prefix_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of a prefix: one per self-attention layer carrying it (keys: module, method
    "prefix", source, adapter, layer, num_virtual_tokens, num_tasks, kv_heads, head_dim,
    prefix_projection, position_mode, dtype, device, backend, why, merged False). The
    backend is the prefix config's, resolved for the layer's device; with attention dropout while
    training the layer runs an unfused torch SDPA instead. A PEFT model accelerated by
    ``ptune_rt.accelerate`` reports the prefix of its base model."""
    rows = []
    for root, carrier in carriers(model, inject.has_prefix, inject.prefix_state):
        state = inject.prefix_state(carrier)
        cfg, enc = state.config, state.encoder
        for n, (m, layer) in sorted(state.attn_modules.items(), key=lambda item: item[1][1]):
            dtype, device = dtype_device(m, enc.embedding.weight)
            backend, why = resolve_backend(cfg.backend, device)
            p = _attention_dropout(m)
            if p > 0.0:
                backend, why = "torch", (f"attention dropout p={p} while training: unfused torch SDPA over "
                                         "[prefix; sequence] (the fused op has no dropout)")
            rows.append({"module": root + n, "method": "prefix",
                         "source": "apply" if getattr(state, "owns_encoder", True) else "peft",
                         "adapter": "default", "layer": layer, "num_virtual_tokens": state.num_virtual_tokens,
                         "num_tasks": getattr(cfg, "num_tasks", 1), "kv_heads": enc.num_kv_heads,
                         "head_dim": enc.head_dim, "prefix_projection": enc.prefix_projection,
                         "position_mode": cfg.position_mode, "dtype": dtype, "device": device,
                         "backend": backend, "why": why, "merged": False})
    return rows


def prefix_summary(rows: list[dict]) -> str:
    """Per-layer rows; a row without a layer (ptune_rt.accelerate's) is a whole prefix."""
    tasks = tasks_cell(rows)
    what = f"P={sizes_cell(rows)}" if tasks == "1" else f"P={sizes_cell(rows)}, {tasks} tasks"
    if all("layer" in r for r in rows):
        head = f"{plural(len(rows), 'prefix layer')} ({what})"
    else:
        head = f"{len(rows)} prefix{'' if len(rows) == 1 else 'es'} ({what})"
    return f"{head}: {backends_cell(rows)}"
