"""What ``ptune_rt.report`` says of a soft prompt: one row per prompt, and the summary line."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.prompt import inject
from ptune_rt.methods.prompt.forward import ADAPTER, MODULE_ATTR
from ptune_rt.report_format import backends_cell, carriers, plural, sizes_cell, tasks_cell


def prompt_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of a soft prompt: one (keys: module, method "prompt_tuning" / "p_tuning", source,
    adapter, num_virtual_tokens, num_tasks, hidden_size, template_tokens, before_input, encoder,
    trainable_parameters, dtype, device, backend and why of the input builder, merged False)."""
    rows = []
    for root, carrier in carriers(model, inject.is_prompt_model, lambda m: m.__dict__["forward"]):
        info = inject.prompt_report(carrier)
        w = carrier.get_input_embeddings().weight
        rows.append({"module": f"{root}{MODULE_ATTR}.{ADAPTER}", "method": info["method"],
                     "source": "apply", "adapter": ADAPTER, "num_virtual_tokens": info["num_virtual_tokens"],
                     "num_tasks": info["num_tasks"], "hidden_size": int(w.shape[1]),
                     "template_tokens": info["template_tokens"], "before_input": info["before_input"],
                     "encoder": info["encoder"], "trainable_parameters": info["trainable_parameters"],
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device),
                     "backend": info["backend"], "why": info["why"], "merged": False})
    return rows


def prompt_summary(rows: list[dict]) -> str:
    tasks = tasks_cell(rows)
    encoders = sorted({r["encoder"] for r in rows if r.get("encoder")})
    extra = f", {'/'.join(encoders)} encoder" if encoders else ""
    task_word = "task" if tasks == "1" else "tasks"
    method = rows[0]["method"]
    return f"{plural(len(rows), f'{method} soft prompt')} (P={sizes_cell(rows)}, {tasks} {task_word}{extra}): " \
           f"{backends_cell(rows)}"
