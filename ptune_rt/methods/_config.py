"""What every method config's ``from_dict`` checks before building the dataclass."""
from __future__ import annotations

import dataclasses


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
