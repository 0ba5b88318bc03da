"""``report`` rows of the prefix and soft-prompt methods."""
from __future__ import annotations

from torch import nn

from ptune_rt.ops.lora_linear import resolve_backend
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
    from ptune_rt import hf_attention  # imports transformers: keep swap importable alone

    rows = []
    for root, carrier in carriers(model, hf_attention.has_prefix, hf_attention.prefix_state):
        state = hf_attention.prefix_state(carrier)
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


def prompt_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of a soft prompt: one (keys: module, method "prompt_tuning" / "p_tuning", source,
    adapter, num_virtual_tokens, num_tasks, hidden_size, template_tokens, before_input, encoder,
    trainable_parameters, dtype, device, backend and why of the input builder, merged False)."""
    from ptune_rt.methods import prompt  # imports the input-builder op: keep swap importable alone

    rows = []
    for root, carrier in carriers(model, prompt.is_prompt_model, lambda m: m.__dict__["forward"]):
        info = prompt.prompt_report(carrier)
        w = carrier.get_input_embeddings().weight
        rows.append({"module": f"{root}{prompt.MODULE_ATTR}.{prompt.ADAPTER}", "method": info["method"],
                     "source": "apply", "adapter": prompt.ADAPTER, "num_virtual_tokens": info["num_virtual_tokens"],
                     "num_tasks": info["num_tasks"], "hidden_size": int(w.shape[1]),
                     "template_tokens": info["template_tokens"], "before_input": info["before_input"],
                     "encoder": info["encoder"], "trainable_parameters": info["trainable_parameters"],
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device),
                     "backend": info["backend"], "why": info["why"], "merged": False})
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


def prompt_summary(rows: list[dict]) -> str:
    tasks = tasks_cell(rows)
    encoders = sorted({r["encoder"] for r in rows if r.get("encoder")})
    extra = f", {'/'.join(encoders)} encoder" if encoders else ""
    task_word = "task" if tasks == "1" else "tasks"
    method = rows[0]["method"]
    return f"{plural(len(rows), f'{method} soft prompt')} (P={sizes_cell(rows)}, {tasks} {task_word}{extra}): " \
           f"{backends_cell(rows)}"
