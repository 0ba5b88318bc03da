"""Argument checks every method config, loader and entry point shares, so that a value of the wrong
type or a non-finite number is refused the same way everywhere: a ValueError whose message starts
with the field's label (``"LoRAConfig.alpha"``, ``"<file>: lora_alpha"``) and shows the value."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import torch


def config_kwargs(cls, d, method: str, kind: str) -> dict:
    """The keyword arguments of the config dataclass ``cls`` from ``d`` (what its ``to_dict`` wrote):
    ``d`` must be a dict whose ``method`` (if present) is ``method`` and whose other keys are all
    fields of ``cls``. ``kind`` names the config in the error ("LoRA config", ...)."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    d = dict(d)
    got = d.pop("method", method)
    if got != method:
        raise ValueError(f"not a {kind}: method={got!r}, expected {method!r}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return d


def check_int(label: str, value, low: int = 1, optional: bool = False) -> None:
    """An integer (not a bool) >= ``low``; None too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        none = "None or " if optional else ""
        raise ValueError(f"{label} must be {none}an integer >= {low}, got {value!r}")


def check_number(label: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = True) -> None:
    """A finite real number (int or float, not a bool or a string) in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (low_open and value == low) or value > high or (high_open and value == high):
        if high == math.inf:
            where = f"> {low}" if low_open else f">= {low}"
        else:
            where = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{label} must be a finite number {where}, got {value!r}")


def check_bool(label: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be True or False, got {value!r}")


def check_choice(label: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{label} must be one of {choices}, got {value!r}")


def check_regex(label: str, value: str) -> None:
    """A string ``target_modules`` / ``exclude_modules`` is a regex: it must compile."""
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{label}={value!r} is not a valid regular expression: {e}") from None


def check_module_names(label: str, value) -> None:
    """None, a regex string matched against whole module names, or a non-empty list of module names."""
    if isinstance(value, str):
        check_regex(label, value)
    elif value is not None and not (isinstance(value, list) and value and all(isinstance(t, str) and t for t in value)):
        raise ValueError(f"{label} must be None, a regex string or a non-empty list of module names, got {value!r}")


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Any signed or unsigned integer dtype (index tensors of every integer dtype are accepted alike)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_task_ids(task_ids, batch: Optional[int], num_tasks: int, what: str) -> Optional[torch.Tensor]:
    """``task_ids`` (a tensor or sequence of any integer dtype, a scalar meaning every row) as an
    int32 tensor [batch] on its device after checking shape and range, or None when there is one
    task; ``what`` names the adapters in messages ("prefixes", "soft prompts")."""
    if task_ids is None:
        if num_tasks > 1:
            raise ValueError(f"task_ids is required: this model has {what} for num_tasks={num_tasks} tasks; pass "
                             f"task_ids=[batch] integers in [0, {num_tasks}) (one task per row)")
        return None
    if not isinstance(task_ids, torch.Tensor):
        try:
            task_ids = torch.as_tensor(task_ids)
        except Exception:
            raise ValueError(f"task_ids must be an integer tensor [batch], got {type(task_ids).__name__}") from None
    if task_ids.dim() == 0 and batch is not None:
        task_ids = task_ids.expand(batch)
    if task_ids.dim() != 1 or (batch is not None and task_ids.shape[0] != batch) or \
            not is_integer_dtype(task_ids.dtype):
        raise ValueError(f"task_ids must be an integer tensor [batch={batch if batch is not None else '?'}], got "
                         f"shape {tuple(task_ids.shape)} and dtype {task_ids.dtype}")
    wide = task_ids.to(torch.int64)  # uint16/32/64 have no min/max; values past 2**63 turn negative: refused
    if wide.numel() and not torch.compiler.is_compiling():  # a data-dependent check: eager only
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi >= num_tasks:
            raise ValueError(f"task_ids must be in [0, num_tasks={num_tasks}), got values in [{lo}, {hi}]")
    return wide.to(torch.int32) if num_tasks > 1 else None
