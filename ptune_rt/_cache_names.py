"""The KV cache's name in transformers' forward arguments and outputs.

Releases up to 5.23 call it ``past_key_values``; 5.24 renamed it ``cache`` (``generate`` passes
``cache=``, model outputs carry ``.cache``, the old name still works with a deprecation warning).
The glue reads whichever is present so one code path serves both."""

from __future__ import annotations

from typing import Any, Optional

CACHE_KWARGS = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: dict) -> Optional[Any]:
    """The cache passed to a forward call under either name (None if neither)."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_from_output(out) -> Optional[Any]:
    """The cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    return getattr(out, "cache" if "cache" in fields else "past_key_values", None)
