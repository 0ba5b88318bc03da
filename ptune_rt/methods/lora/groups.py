"""Projection groups: the LoRA siblings of a block that read one input (q/k/v, gate/up) share the
shrink GEMM, the dA GEMM and the dX buffer while training."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.lora.layer import LoRALinear


#: Attribute names of the projections that read one input inside one transformers block.
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def enable_projection_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Link the ``LoRALinear`` siblings of every block that read one input (the names in
    :data:`PROJECTION_GROUPS`, two or more of them swapped, one in_features): in training they run
    as one :func:`~ptune_rt.ops.lora_linear.lora_linear_group` (see ``LoRALinear._grouped_forward``).
    Returns the groups as tuples of full module names."""
    found = []
    for n, parent in model.named_modules():
        for names in PROJECTION_GROUPS:
            mods = [(a, getattr(parent, a, None)) for a in names]
            mods = [(a, m) for a, m in mods if isinstance(m, LoRALinear)]
            if len(mods) < 2 or len({m.in_features for _, m in mods}) != 1:
                continue
            grp = tuple(m for _, m in mods)
            for m in grp:
                m._group, m._stash = grp, None
            found.append(tuple(f"{n}.{a}" if n else a for a, _ in mods))
    return found


def disable_projection_groups(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m._group = m._stash = None


def projection_group_names(model: nn.Module) -> dict[str, str]:
    """Module name -> "+"-joined names of its group's members (short names), for ``report``."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) and m._group is not None:
            out[n] = "+".join(names.get(id(g), "?").rpartition(".")[2] for g in m._group)
    return out
