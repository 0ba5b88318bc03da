"""Which modules a config names: one matching rule for every method (PEFT's).

A list names modules by suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``; a dotted
entry such as ``"intermediate.dense"`` matches that suffix); a string is a regex matched against
the whole module name.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

Patterns = Union[str, Sequence[str]]


def module_matches(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
