"""The list of PEFT methods, and what loops over it: ``apply``, ``restore``, ``report``,
``format_report``, and the checkpoint handlers behind ``save_adapter`` / ``load_adapter``.

A method is a package ``ptune_rt/methods/<name>/`` exposing one :class:`~ptune_rt.methods.method.Method`;
adding one is one line in ``_ENTRIES`` (``"module:attribute"``, imported on first use). Also
``accelerate`` (PEFT models, through the methods' PEFT bridges).
"""
from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

from ptune_rt import trainer_checkpoints
from ptune_rt.methods.method import Method

_ENTRIES = (
    "ptune_rt.methods.lora:METHOD",
    "ptune_rt.methods.prefix:METHOD",
    "ptune_rt.methods.prompt:PROMPT_TUNING",
    "ptune_rt.methods.prompt:P_TUNING",
    "ptune_rt.methods.bitfit:METHOD",
    "ptune_rt.methods.ln_tuning:METHOD",
    "ptune_rt.methods.child_tuning:METHOD",
    "ptune_rt.methods.ia3:METHOD",
)
#: The application order of a model's methods (names), for restoring in reverse.
ORDER_ATTR = "_ptune_rt_order"

_methods: Optional[list] = None


def methods() -> list[Method]:
    """Every registered method, in registry order."""
    global _methods
    if _methods is None:
        loaded = []
        for entry in _ENTRIES:
            module, _, attr = entry.partition(":")
            loaded.append(getattr(importlib.import_module(module), attr))
        _methods = loaded
    return list(_methods)


def by_name(name: str) -> Method:
    for m in methods():
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; registered: {[m.name for m in methods()]}")


def applied_methods(model: nn.Module) -> list[Method]:
    """The methods ``model`` carries, oldest first (those applied outside ``apply``, e.g. by
    ``load_adapter`` or ``accelerate``, count as the oldest, in registry order)."""
    present = [m for m in methods() if m.is_applied(model)]
    order = model.__dict__.get(ORDER_ATTR, [])
    rank = {n: i for i, n in enumerate(order)}
    return sorted(present, key=lambda m: rank.get(m.name, -1))


def _require_module(model, arg: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")


def apply(model: nn.Module, config) -> nn.Module:
    """Put the method of ``config`` into ``model`` (in place), freeze the base model, return the model.

    Parameters that methods already applied train keep training. Raises TypeError for a config of
    no registered method; every check runs before the model changes.
    """
    _require_module(model)
    method = next((m for m in methods() if isinstance(config, m.config_class)), None)
    if method is None:
        names = [m.config_class.__name__ for m in methods()]
        raise TypeError(f"config must be a ptune_rt config ({', '.join(names[:-1])} or {names[-1]}), got "
                        f"{type(config).__name__}")
    others = trainable_of_others(model, method.name)
    method.apply(model, config)
    for p in others:
        p.requires_grad_(True)
    order = [n for n in model.__dict__.get(ORDER_ATTR, []) if n != method.name]
    model.__dict__[ORDER_ATTR] = order + [method.name]
    trainer_checkpoints.install(model, applied_methods)  # Trainer checkpoints hold the adapter
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo everything ptune-rt put into ``model``, newest method first: the model comes back
    bit-exact (modules, weights, requires_grad flags, attention implementation, forward)."""
    _require_module(model)
    for bridge in _bridges():
        if bridge.is_accelerated is not None and bridge.is_accelerated(model):
            return bridge.restore(model)
    present = applied_methods(model)
    if not present:
        names = ", ".join(m.name for m in methods())
        raise ValueError(f"restore: model has no ptune-rt LoRA modules and no prefix or soft prompt, nor another "
                         f"registered method ({names}); expected a model passed through ptune_rt.apply(...), "
                         "ptune_rt.accelerate(...) or ptune_rt.load_adapter(...)")
    for m in reversed(present):
        m.remove(model)
    model.__dict__.pop(ORDER_ATTR, None)
    trainer_checkpoints.uninstall(model)
    return model


def _bridges() -> list:
    return [m.peft_bridge for m in methods() if m.peft_bridge is not None]


def accelerate(peft_model: nn.Module, backend: str = "auto") -> list[dict]:
    """Run an existing PEFT model on ptune-rt's fused path, in place; returns ``report``'s rows.

    Each method with a PEFT bridge says whether the model is one it runs (LoRA: PEFT LoRA layers,
    swapped for fused modules holding the very same parameters; prefix tuning: the fused prefix
    attention); see the bridges for what each keeps and refuses. ``ptune_rt.restore(peft_model)``
    gives PEFT its own modules back."""
    _require_module(peft_model, "peft_model")
    from ptune_rt.ops.backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    bridges = _bridges()
    for bridge in bridges:
        if bridge.claims(peft_model):
            return bridge.accelerate(peft_model, backend)
    raise ValueError(f"peft_model ({type(peft_model).__name__}) has no {' and no '.join(b.kind for b in bridges)}; "
                     "expected a model from peft.get_peft_model(model, config) of one of those methods")


def trainable_of_others(model: nn.Module, method: str) -> list:
    """The parameters the methods of ``model`` other than ``method`` train."""
    return [p for m in applied_methods(model) if m.name != method for p in m.trainable(model)]


def report(model: nn.Module) -> list[dict]:
    """What ptune-rt runs in ``model``: one row per unit of every applied method, each with its
    backend and why (see each method's ``report_rows`` for its keys)."""
    _require_module(model)
    return [r for m in methods() for r in m.report_rows(model)]


def format_report(rows: list[dict]) -> str:
    """``report`` rows as an aligned text table (one line per row, then a summary line per method)."""
    if not isinstance(rows, list):
        raise TypeError(f"rows must be the list returned by ptune_rt.report, got {type(rows).__name__}")
    if not rows:
        return "no ptune-rt modules"
    header = ["module", "method", "shape", "r / P", "dtype", "backend", "merged", "why"]
    known = {m.name: m for m in methods()}
    lines = []
    for r in rows:
        shape, size, merged = known[r["method"]].cells(r) if r.get("method") in known else ("-", "-", "-")
        lines.append([r["module"], r["method"], shape, size, r["dtype"], r["backend"], merged, r["why"]])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths), "---")]
    out += [fmt.format(*line) for line in lines]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for name, group in by_method.items():
        out.append(known[name].summary(group) if name in known else f"{len(group)} {name} rows")
    return "\n".join(out)


def checkpoint_handlers() -> tuple[dict, dict, object]:
    """(method name -> checkpoint handler, PEFT peft_type -> method name, ``trainable_of_others``)
    for ``ptune_rt.io.adapters.register_handlers``."""
    handlers = {m.name: m.checkpoint for m in methods()}
    peft_types = {t: m.name for m in methods() for t in m.peft_types}
    return handlers, peft_types, trainable_of_others
