"""Cells and summary words that several methods' ``report`` rows share."""
from __future__ import annotations

from torch import nn


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def backends_cell(rows: list[dict]) -> str:
    """"torch 3, triton 2": how many rows take each backend."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["backend"]] = counts.get(r["backend"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def sizes_cell(rows: list[dict]) -> str:
    return "/".join(str(p) for p in sorted({r.get("num_virtual_tokens") for r in rows}, key=str))


def tasks_cell(rows: list[dict]) -> str:
    return "/".join(str(t) for t in sorted({r.get("num_tasks", 1) for r in rows}))


def prompt_learning_cells(r: dict) -> tuple[str, str, str]:
    """The (shape, r / P, merged) cells of a prefix or soft-prompt row."""
    P = r.get("num_virtual_tokens")
    if r.get("kv_heads") is not None:
        shape = f"{r['kv_heads']}x{r['head_dim']} kv"
    elif r.get("hidden_size") is not None:
        T = r.get("num_tasks", 1)
        shape = f"{T}x{P}x{r['hidden_size']}" if T and T > 1 else f"{P}x{r['hidden_size']}"
    else:
        shape = "-"
    return shape, f"P={P}", "-"


def dtype_device(module: nn.Module, fallback) -> tuple[str, str]:
    """(dtype, device) names of ``module``'s first parameter, else of the tensor ``fallback``."""
    t = next(module.parameters(), None)
    t = fallback if t is None else t
    return str(t.dtype).replace("torch.", ""), str(t.device)


def carriers(model: nn.Module, has, state_of) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of the outermost module carrying each distinct state: the model itself,
    or a module inside it (a PEFT model's base). ``has(m)``: m carries one; ``state_of(m)``: which."""
    out, seen = [], set()
    for n, m in model.named_modules():  # outer modules come first
        if has(m) and id(state_of(m)) not in seen:
            seen.add(id(state_of(m)))
            out.append((f"{n}." if n else "", m))
    return out
