"""Working with a model's IA3 vectors: ``merge`` / ``unmerge`` (bit-exact), ``merge_and_unload``,
``disable``, ``set_adapter`` and ``mixed_adapters`` (each row of a batch with its own task's
vectors, for serving many tasks from one base)."""
from __future__ import annotations

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.methods.ia3.inject import (NAME, SOURCE_ATTR, require_swapped, restore_requires_grad,
                                         set_submodule)
from ptune_rt.methods.ia3.layer import IA3Linear


def merge(model: nn.Module) -> nn.Module:
    """Fold every IA3 module's active vector into its base weight (see ``IA3Linear.merge``). All or
    nothing: if one module cannot merge, those merged by this call are unmerged again (bit-exact)."""
    mods = require_swapped(model, "merge")
    todo = [m for m in mods.values() if not m.merged]
    for n, m in mods.items():
        if m.disabled and not m.merged:
            raise ValueError(f"cannot merge module {n!r}: its adapter is disabled")
        if m.active_adapter not in m.ia3_l:
            raise ValueError(f"cannot merge module {n!r}: active_adapter {m.active_adapter!r} is not one of its "
                             f"adapters {list(m.ia3_l)}")
    done = []
    try:
        for m in todo:
            m.merge()
            done.append(m)
    except Exception:
        for m in reversed(done):
            m.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged vector out of its base weight again, bit-exact (see ``IA3Linear.unmerge``)."""
    for m in require_swapped(model, "unmerge").values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every IA3 module's active vector into its base weight and put the base layers back in
    place of the ``IA3Linear`` modules (requires_grad flags as before ``apply``): the plain model.
    A model from ``ptune_rt.accelerate`` keeps PEFT's wrapper: use its own ``merge_and_unload()``."""
    mods = require_swapped(model, "merge_and_unload")
    from_peft = [n for n, m in mods.items() if m.__dict__.get(SOURCE_ATTR) == "peft"]
    if from_peft:
        raise ValueError(f"merge_and_unload: IA3 modules {from_peft[:3]} come from a PEFT model run by "
                         "ptune_rt.accelerate; call peft_model.merge_and_unload() (PEFT's own) instead")
    merge(model)
    for n, m in mods.items():
        m._merge_record = None  # the merge stays: nothing to undo
        m.base_layer.train(m.training)
        set_submodule(model, n, m.base_layer)
    restore_requires_grad(model)
    model_state.forget(model, NAME)
    return model


def disable(model: nn.Module):
    """Run every IA3 module's base layer alone; returns the function that enables them again."""
    mods = require_swapped(model, "disable_adapter")
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise ValueError(f"disable_adapter: IA3 modules {merged[:3]} have their vector merged into the base weight; "
                         "unmerge the model first (ptune_rt.methods.ia3.unmerge(model))")
    before = {n: m.disabled for n, m in mods.items()}
    for m in mods.values():
        m.disabled = True

    def enable() -> None:
        for n, m in mods.items():
            m.disabled = before[n]
    return enable


def _require_adapter(mods: dict[str, IA3Linear], name: str, prefix: str) -> None:
    lacking = [n for n, m in mods.items() if name not in m.ia3_l]
    if lacking:
        held = sorted({a for m in mods.values() for a in m.ia3_l})
        raise ValueError(f"{prefix}{name!r} is not an adapter of IA3 modules {lacking[:3]}"
                         f"{' ...' if len(lacking) > 3 else ''} (the model's adapters: {held})")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active IA3 adapter of every module (adapters are added with
    ``ptune_rt.load_adapter(model, path, adapter_name=...)``): its vectors train, the others are
    frozen. Checked first: every module must hold it, and no other adapter may be merged."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    mods = require_swapped(model, "set_adapter")
    _require_adapter(mods, adapter_name, "adapter_name=")
    merged = [n for n, m in mods.items() if m.merged and m.active_adapter != adapter_name]
    if merged:
        raise ValueError(f"modules {merged[:3]} have adapter {mods[merged[0]].active_adapter!r} merged into their "
                         f"base weight: unmerge the model before switching to {adapter_name!r}")
    for m in mods.values():
        m.active_adapter = adapter_name
        for name, p in m.ia3_l.items():
            p.requires_grad_(name == adapter_name)
    return model


class mixed_adapters:
    """``with mixed_adapters(model, adapter_names):`` row i of every batch the model runs uses the
    IA3 vectors of ``adapter_names[i]`` (None or ``"__base__"``: the base model alone), as PEFT's
    ``adapter_names=`` forward argument: many tasks served in one batch from one unmerged base.
    Inference only (``torch.no_grad()``). Checked on entry, before anything changes: every name must
    be an adapter of every IA3 module, none may be merged or disabled, blocks do not nest. Each row
    gives what running its task alone gives (see ``IA3Linear._mixed_forward`` for how)."""

    BASE = "__base__"

    def __init__(self, model: nn.Module, adapter_names):
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
            raise TypeError(f"adapter_names must be a sequence of adapter names (one per row, None or "
                            f"{self.BASE!r} for the base model), got {type(adapter_names).__name__}")
        names = [self.BASE if n is None else n for n in adapter_names]
        if not names:
            raise ValueError("adapter_names is empty; expected one adapter name per row of the batch")
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must hold str or None, got {names!r}")
        self.mods = require_swapped(model, "mixed_adapters")
        used = [n for n in dict.fromkeys(names) if n != self.BASE]
        for n in used:
            _require_adapter(self.mods, n, "adapter_names: ")
        blocked = [m for m, mod in self.mods.items() if mod.merged or mod.disabled]
        if blocked:
            raise ValueError(f"IA3 modules {blocked[:3]} are merged or disabled, which every row would get: unmerge / "
                             "enable the model before serving a mixed-adapter batch")
        self._check_not_nested()
        order = used + [self.BASE]
        device = next(iter(self.mods.values())).weight.device
        index = torch.tensor([order.index(n) for n in names], device=device)
        groups = tuple((None if n == self.BASE else n, torch.tensor([i for i, m in enumerate(names) if m == n],
                                                                    device=device)) for n in dict.fromkeys(names))
        self.rows = {}
        for key, mod in self.mods.items():
            with torch.no_grad():
                vectors = [mod.ia3_l[n].detach().reshape(-1) for n in used]
                dtype = vectors[0].dtype if vectors else mod.weight.dtype
                ones = torch.ones(mod.vector_shape()[0] * mod.vector_shape()[1], dtype=dtype, device=device)
                stacked = torch.stack([v.to(dtype) for v in vectors] + [ones])
            self.rows[key] = (len(names), groups, stacked, index)

    def _check_not_nested(self) -> None:
        busy = [m for m, mod in self.mods.items() if mod._rows is not None]
        if busy:
            raise RuntimeError(f"modules {busy[:3]} are already inside a mixed_adapters block: blocks do not nest")

    def __enter__(self):
        self._check_not_nested()
        for key, mod in self.mods.items():
            mod._rows = self.rows[key]
        return self

    def __exit__(self, *exc):
        for mod in self.mods.values():
            mod._rows = None
        return False
