"""Pieces shared by every adapter method's checkpoint code: the error type, the module view of a
model (a swapped module counts as one layer), PEFT's target-matching rules, and error reporting."""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from ptune_rt.methods.lora import Conv1D, LoRALinear


class AdapterError(ValueError):
    """An adapter checkpoint cannot be saved or loaded. The message names the file, key or
    argument at fault and what was expected; the model has not been changed."""


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def model_class(model: nn.Module) -> str:
    return type(model).__name__


def module_view(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` with each ``LoRALinear`` seen as one leaf: its inner modules
    (``base_layer``, ``lora_A.<name>``, ...) are hidden, so names are those of the unswapped model."""
    view: dict[str, nn.Module] = {}
    hidden: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if hidden and name.startswith(hidden):
            continue
        view[name] = module
        if isinstance(module, LoRALinear):
            if not name:  # the model itself is one swapped layer
                break
            hidden += (name + ".",)
    return view


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoRALinear)) or bool(Conv1D) and isinstance(module, Conv1D)


def output_layer_names(model: nn.Module, view: dict[str, nn.Module]) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        out = get() if callable(get) else None
    except Exception:  # some models raise instead of returning None
        out = None
    return {n for n, m in view.items() if out is not None and m is out}


def _matches(name: str, pattern: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a regex matched against the full module name; a list matches a
    name equal to an entry or ending with ``"." + entry``."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def match_targets(model: nn.Module, view: dict[str, nn.Module], target_modules,
                  exclude_modules=None) -> list[str]:
    """Names (in ``view``) that ``target_modules`` selects, minus ``exclude_modules``, with the
    same rules PEFT uses; ``"all-linear"`` means every linear layer except the output layer."""
    names = [n for n in view if n]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = output_layer_names(model, view)
        hits = [n for n in names if is_linear_like(view[n]) and n not in skip]
    else:
        hits = [n for n in names if _matches(n, target_modules)]
    if exclude_modules:
        hits = [n for n in hits if not _matches(n, exclude_modules)]
    return hits


def match_heads(view: dict[str, nn.Module], head_names: Iterable[str], dotted: bool) -> dict[str, list[str]]:
    """Modules that each name in ``head_names`` selects (outermost ones only).

    ``dotted``: match ``name == h`` or ``name.endswith("." + h)``; otherwise PEFT's looser
    ``modules_to_save`` rule ``name.endswith(h)``."""
    found: dict[str, list[str]] = {}
    for h in head_names:
        hits = [n for n in view if n and (n == h or n.endswith("." + h) if dotted else n.endswith(h))]
        found[h] = [n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)]
    return found


def exact_regex(names: Iterable[str]) -> str:
    """A ``target_modules`` regex matching exactly these module names (and nothing else)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def raise_problems(header: str, problems: list[str], limit: int = 20) -> None:
    if not problems:
        return
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise AdapterError(header + "\n  " + "\n  ".join(shown) + more)


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"
