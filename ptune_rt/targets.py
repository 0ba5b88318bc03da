"""Which modules a config names, and what counts as a linear layer: one set of rules for every method.

Matching is PEFT's: a list names modules by suffix (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``; a dotted entry such as ``"intermediate.dense"`` matches that
suffix); a string is a regex matched against the whole module name; ``"all-linear"`` is every
linear layer but the output layer. A module that wraps a layer in place of it (a class with
``WRAPS_LAYER = True``, e.g. ``LoRALinear``) is one leaf under the wrapped layer's name.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence, Union

from torch import nn

try:  # GPT-2 style Conv1D: weight is [in_features, out_features]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

Patterns = Union[str, Sequence[str]]


def module_matches(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_linear(m: nn.Module) -> bool:
    """An nn.Linear or a GPT-2 Conv1D."""
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


def wraps_layer(m: nn.Module) -> bool:
    return getattr(type(m), "WRAPS_LAYER", False)


def is_linear_like(m: nn.Module) -> bool:
    """A linear layer, or a module wrapping one in its place."""
    return is_linear(m) or (wraps_layer(m) and is_linear(getattr(m, "base_layer", None)))


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D and isinstance(layer, Conv1D):
        k, n = layer.weight.shape
        return k, n
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_lora_target(m: nn.Module) -> bool:
    """A layer LoRA can adapt: an nn.Linear, a GPT-2 Conv1D or an nn.Embedding."""
    return is_linear(m) or isinstance(m, nn.Embedding)


def lora_target_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a LoRA target; an embedding [V, D] is (V, D): its lookup is the
    product of a one-hot row and the table."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return linear_shape(layer)


def module_view(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` with each layer wrapper seen as one leaf: its inner modules
    (``base_layer``, ``lora_A.<name>``, ...) are hidden, so names are those of the unwrapped model."""
    view: dict[str, nn.Module] = {}
    hidden: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if hidden and name.startswith(hidden):
            continue
        view[name] = module
        if wraps_layer(module):
            if not name:  # the model itself is one wrapped layer
                break
            hidden += (name + ".",)
    return view


def output_layer_names(model: nn.Module, view: dict[str, nn.Module]) -> set[str]:
    """Names in ``view`` of the model's output embedding layer (the LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        out = get() if callable(get) else None
    except Exception:  # some models raise instead of returning None
        out = None
    return {n for n, m in view.items() if out is not None and m is out}


def match_targets(model: nn.Module, view: dict[str, nn.Module], target_modules, exclude_modules=None) -> list[str]:
    """Names (in ``view``, in its order) that ``target_modules`` selects, minus ``exclude_modules``."""
    names = [n for n in view if n]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = output_layer_names(model, view)
        hits = [n for n in names if is_linear_like(view[n]) and n not in skip]
    else:
        hits = [n for n in names if module_matches(n, target_modules)]
    if exclude_modules:
        hits = [n for n in hits if not module_matches(n, exclude_modules)]
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


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a PEFT ``rank_pattern`` / ``alpha_pattern`` that selects module ``name`` (a
    regex matched against a suffix of the name that starts at a dot), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The layer index in module ``name`` as PEFT reads it for ``layers_to_transform``: the first
    number after a dotted component (``model.layers.3.mlp`` -> 3), or after one of ``layers_pattern``
    (a name or a list of names); None when there is none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def in_layers(name: str, layers_to_transform, layers_pattern=None) -> bool:
    """Whether module ``name`` lies in one of ``layers_to_transform`` (an index or a list; None or
    an empty list: every layer), PEFT's rule."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers_to_transform if isinstance(layers_to_transform, int) else idx in layers_to_transform
