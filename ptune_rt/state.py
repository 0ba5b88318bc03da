"""The per-model record of what ptune-rt applied: one entry per method, in order of application.

Stored in the model instance's ``__dict__`` (not a submodule, not a parameter), so ``state_dict``,
``save_pretrained`` and ``to()`` never see it. Each entry is the method's own state object.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

ATTR = "_ptune_rt_state"


def applied(model: nn.Module) -> dict[str, Any]:
    """``{method name: state}`` of the methods applied to ``model``, oldest first (a copy)."""
    return dict(model.__dict__.get(ATTR, {}))


def get(model: nn.Module, method: str) -> Optional[Any]:
    return model.__dict__.get(ATTR, {}).get(method)


def record(model: nn.Module, method: str, state: Any) -> None:
    if get(model, method) is not None:
        raise ValueError(f"{type(model).__name__} already carries {method}: restore it first")
    model.__dict__.setdefault(ATTR, {})[method] = state


def forget(model: nn.Module, method: str) -> None:
    entries = model.__dict__.get(ATTR, {})
    entries.pop(method, None)
    if not entries:
        model.__dict__.pop(ATTR, None)
