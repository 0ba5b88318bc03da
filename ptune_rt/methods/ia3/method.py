"""IA3's entry in the method registry."""
from __future__ import annotations

from torch import nn

from ptune_rt import state as model_state
from ptune_rt.methods.ia3 import adapters, checkpoint, inject, peft_bridge, report
from ptune_rt.methods.ia3.config import IA3Config
from ptune_rt.methods.method import Method


def trainable(model: nn.Module) -> list:
    """The active vectors, and the heads trained whole, that require grad."""
    out = [m.ia3_l[m.active_adapter] for m in inject.ia3_modules(model).values() if m.active_adapter in m.ia3_l]
    st = model_state.get(model, inject.NAME)
    for h in st.heads if st is not None else []:
        out += list(model.get_submodule(h).parameters())
    return list({id(p): p for p in out if p.requires_grad}.values())


METHOD = Method(
    name=IA3Config.METHOD, config_class=IA3Config, apply=inject.apply_ia3, remove=inject.restore_ia3,
    is_applied=lambda model: bool(inject.ia3_modules(model)), trainable=trainable,
    report_rows=report.ia3_rows, cells=report.ia3_cells, summary=report.ia3_summary, checkpoint=checkpoint,
    example=lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    peft_types=(checkpoint.PEFT_TYPE,), peft_bridge=peft_bridge.BRIDGE, merge_and_unload=adapters.merge_and_unload,
    disable=adapters.disable)
