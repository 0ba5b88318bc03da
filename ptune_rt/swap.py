"""The module-swap layer: put fused LoRA modules into a model instance and take them out again.

Every public function validates everything it needs before it changes anything, so a failed
call leaves the model exactly as it was.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from ptune_rt.methods.lora import Conv1D, LoRAConfig, LoRALinear, linear_shape

#: Default targets per model type when ``target_modules`` is None (the same choice PEFT makes).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "t5": ["q", "v"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or bool(Conv1D) and isinstance(m, Conv1D)


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        names.update(n for n, m in model.named_modules() if m is out)
    return names


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules ``target_modules`` selects; raises naming what did not match."""
    if target_modules is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules is None and there is no default for model type {mtype!r}: "
                             "pass LoRAConfig(target_modules=[...])")
        target_modules = DEFAULT_TARGETS[mtype]
    named = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [n for n, m in named.items() if _is_linear(m) and n not in skip]
    elif isinstance(target_modules, str):
        names = [n for n in named if n and re.fullmatch(target_modules, n)]
    else:
        names, unmatched = [], []
        for t in target_modules:
            hits = [n for n in named if n == t or n.endswith("." + t)]
            if not hits:
                unmatched.append(t)
            names += hits
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no module of {type(model).__name__}")
        names = sorted(set(names), key=list(named).index)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no module of {type(model).__name__}")
    for n in names:
        m = named[n]
        if isinstance(m, LoRALinear):
            raise ValueError(f"module {n!r} already carries a LoRA adapter: call ptune_rt.restore(model) first")
        if not _is_linear(m):
            raise TypeError(f"target module {n!r} is a {type(m).__name__}; LoRA targets must be nn.Linear or "
                            "GPT-2 Conv1D layers")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    config.validate()
    names = resolve_targets(model, config.target_modules)
    for n in names:  # validate every target before touching any
        in_f, out_f = linear_shape(model.get_submodule(n))
        if config.r > min(in_f, out_f):
            raise ValueError(f"rank r={config.r} is larger than min(in_features={in_f}, out_features={out_f}) "
                             f"of target {n!r}")
    new = {n: LoRALinear(model.get_submodule(n), config.r, config.alpha, config.dropout, config.use_rslora,
                         config.init, config.backend) for n in names}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in new.items():
        _set_submodule(model, n, m)
        if config.bias == "lora_only" and m.base_layer.bias is not None:
            m.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for pn, p in model.named_parameters():
            if pn.endswith("bias") and p in requires_grad:
                p.requires_grad_(True)
    model._ptune_rt_config = config
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def report(model: nn.Module) -> list[dict]:
    """One row per swapped module: name, method, shape, rank, backend and why."""
    rows = []
    for n, m in lora_modules(model).items():
        backend, why = m.backend_choice()
        rows.append({"module": n, "method": "lora", "in_features": m.in_features, "out_features": m.out_features,
                     "r": m.r[m.active_adapter], "backend": backend, "why": why, "merged": m.merged})
    return rows


def restore(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very same objects, so weights are bit-exact)."""
    for n, m in lora_modules(model).items():
        if m.merged:
            m.unmerge()
    for n, m in lora_modules(model).items():
        _set_submodule(model, n, m.base_layer)
    return model
