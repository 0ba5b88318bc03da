"""How IA3 goes into a model and out again: ``apply_ia3`` swaps the targets for ``IA3Linear``
modules with fresh vectors and freezes the rest; ``restore_ia3`` puts the original modules back
(the very same objects). Only the instance passed in changes; every check runs before the first
change."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.heads import head_modules
from ptune_rt.methods.ia3.config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3Config
from ptune_rt.methods.ia3.layer import IA3Linear
from ptune_rt.ops.backend import resolve_backend
from ptune_rt.ops.ia3_linear import OP_DTYPES
from ptune_rt.peft_layers import remove_peft_guards
from ptune_rt.targets import is_linear, match_targets

NAME = IA3Config.METHOD
#: Top-level submodules ptune-rt itself attaches (prefix / prompt encoders): never IA3 targets.
OWN_MODULES = ("prompt_encoder",)
#: IA3Linear attribute: the module ``restore`` puts back (not registered as a submodule).
ORIGIN_ATTR = "_ptune_rt_origin"
#: IA3Linear attribute: "apply" or "peft", how the module got into the model.
SOURCE_ATTR = "_ptune_rt_source"


@dataclasses.dataclass
class IA3ModelState:
    """What a model carrying IA3 records (``ptune_rt.state``): the config it was applied or loaded
    with, the requires_grad flags (by parameter name) from before ``apply_ia3``, the heads trained
    whole."""

    config: Optional[IA3Config]
    requires_grad: Optional[dict] = None
    heads: list = dataclasses.field(default_factory=list)


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def model_config(model: nn.Module) -> Optional[IA3Config]:
    st = model_state.get(model, NAME)
    return st.config if st is not None else None


def ia3_modules(model: nn.Module) -> dict[str, IA3Linear]:
    """Every ``IA3Linear`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def require_swapped(model: nn.Module, what: str) -> dict[str, IA3Linear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mods = ia3_modules(model)
    if not mods:
        raise ValueError(f"{what}: model has no ptune-rt IA3 modules; expected a model passed through "
                         "ptune_rt.apply(model, IA3Config(...)), ptune_rt.accelerate(...) or ptune_rt.load_adapter(...)")
    return mods


def peft_ia3_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's IA3 layers of ``model`` (none without PEFT; PEFT is imported only once loaded elsewhere)."""
    import sys
    if "peft" not in sys.modules:
        return {}
    try:
        from peft.tuners.ia3.layer import IA3Layer
    except Exception:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


def default_targets(model: nn.Module, config: IA3Config):
    """(target_modules, feedforward_modules) with None replaced by the model type's defaults."""
    tm, ff, mtype = config.target_modules, config.feedforward_modules, model_type(model)
    if tm is None:
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(f"IA3Config.target_modules is None and there is no default for model type {mtype!r}: "
                             "pass IA3Config(target_modules=[...], feedforward_modules=[...])")
        tm = DEFAULT_TARGETS[mtype]
    if ff is None:
        if mtype not in DEFAULT_FEEDFORWARD:
            raise ValueError(f"IA3Config.feedforward_modules is None and there is no default for model type "
                             f"{mtype!r}: pass IA3Config(feedforward_modules=[...]) ([] when no target is a "
                             "feedforward output projection)")
        ff = DEFAULT_FEEDFORWARD[mtype]
    return tm, ff


def is_feedforward(name: str, feedforward_modules) -> bool:
    """PEFT's rule: a regex string matches the whole name; a list entry any name ending with it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(f) for f in feedforward_modules)


def resolve_targets(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """{module name: feedforward} of the modules ``config`` selects; raises naming what does not match."""
    tm, ff = default_targets(model, config)
    view = {n: m for n, m in model.named_modules() if n.split(".")[0] not in OWN_MODULES}
    if isinstance(tm, list):
        unmatched = [t for t in tm if not match_targets(model, view, [t])]
        if unmatched:
            leaves = list(dict.fromkeys(n.rpartition(".")[2] for n, m in view.items() if is_linear(m)))[:8]
            raise ValueError(f"IA3Config.target_modules entries {unmatched} match no module of {type(model).__name__}; "
                             f"expected names (or name suffixes) of its nn.Linear / Conv1D layers, e.g. {leaves}")
    names = match_targets(model, view, tm, config.exclude_modules)
    if not names:
        raise ValueError(f"IA3Config.target_modules={tm!r} matches no module of {type(model).__name__}")
    for n in names:
        if not is_linear(view[n]):
            raise TypeError(f"IA3Config.target_modules selects module {n!r}, a {type(view[n]).__name__}; IA3 targets "
                            "must be nn.Linear or GPT-2 Conv1D layers")
    return {n: is_feedforward(n, ff) for n in names}


def check_layer(module_name: str, layer: nn.Module, backend: str, what: str) -> None:
    """Refuse now, not at the first forward, a layer the chosen path cannot run: the fused op takes
    float32, float16 and bfloat16; float64 runs on the torch path only."""
    try:
        chosen, why = resolve_backend(backend, layer.weight.device)
    except RuntimeError as e:
        raise ValueError(f"{what}: backend={backend!r} cannot run target {module_name!r}: {e}") from None
    dtype = layer.weight.dtype
    if dtype in OP_DTYPES or (dtype == torch.float64 and chosen == "torch"):
        return
    raise ValueError(f"{what} {module_name!r}, whose weight is {dtype}; ptune-rt's IA3 runs float32, float16 and "
                     "bfloat16 layers (float64 on the torch path): cast the model or leave this layer out")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_ia3(model: nn.Module, config: IA3Config) -> nn.Module:
    """Swap the targets of ``config`` for ``IA3Linear`` modules (in place) and freeze the rest: the
    vectors (and the heads of ``modules_to_save``) train. The previous requires_grad flags are kept
    and given back by ``restore``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be an IA3Config, got {type(config).__name__}")
    config.validate()
    if ia3_modules(model):
        raise ValueError("model already carries ptune-rt IA3 modules; expected an unswapped model: call "
                         "ptune_rt.restore(model) first")
    peft_layers = peft_ia3_layers(model)
    if peft_layers:
        raise ValueError(f"model already has PEFT IA3 layers (e.g. {next(iter(peft_layers))!r}); expected a plain "
                         "model: use ptune_rt.accelerate(peft_model) to run a PEFT model on fused modules")
    heads = head_modules(model, config.modules_to_save, "IA3Config", OWN_MODULES[0])
    targets = resolve_targets(model, config)
    inside = [n for n in targets if any(n == h or n.startswith(h + ".") for h in heads)]
    if inside:
        raise ValueError(f"IA3Config.target_modules selects {inside[:3]}, inside the modules trained whole "
                         f"(modules_to_save: {heads}); a module is either an IA3 target or trained whole")
    for n in targets:  # every check before the first change
        check_layer(n, model.get_submodule(n), config.backend, "IA3Config.target_modules selects")
    new = {n: IA3Linear(model.get_submodule(n), ff, config.backend, init_ia3_weights=config.init_ia3_weights)
           for n, ff in targets.items()}

    before = {pn: p.requires_grad for pn, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for h in heads:
        model.get_submodule(h).requires_grad_(True)
    for n, m in new.items():
        m.__dict__[ORIGIN_ATTR] = m.base_layer
        m.__dict__[SOURCE_ATTR] = "apply"
        m.train(m.base_layer.training)
        set_submodule(model, n, m)
    model_state.record(model, NAME, IA3ModelState(config, before, heads))
    return model


def restore_requires_grad(model: nn.Module) -> None:
    st = model_state.get(model, NAME)
    if st is not None and st.requires_grad is not None:
        for pn, p in model.named_parameters():
            if pn in st.requires_grad:
                p.requires_grad_(st.requires_grad[pn])


def restore_ia3(model: nn.Module) -> nn.Module:
    """Undo ``apply`` / ``accelerate`` / ``load_adapter`` of IA3: unmerge where merged, then put the
    original modules back (the very same objects, so weights are bit-exact) and the previous
    requires_grad flags. After ``accelerate`` PEFT's IA3 layers come back, holding the same
    (possibly trained) vectors."""
    mods = require_swapped(model, "restore")
    for m in mods.values():
        m.unmerge()
    for n, m in mods.items():
        origin = m.__dict__.get(ORIGIN_ATTR, m.base_layer)
        origin.train(m.training)
        if origin is not m.base_layer:  # a PEFT layer: hand back the enabled / disabled state
            origin._disable_adapters = m.disabled
        set_submodule(model, n, origin)
    restore_requires_grad(model)
    remove_peft_guards(model)
    model_state.forget(model, NAME)
    return model
