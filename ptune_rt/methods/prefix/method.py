"""Prefix tuning's entry in the method registry."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.method import Method
from ptune_rt.methods.prefix import checkpoint, inject, peft_bridge, report
from ptune_rt.methods.prefix.config import PrefixConfig
from ptune_rt.report_format import prompt_learning_cells


def trainable(model: nn.Module) -> list:
    st = inject.prefix_state(model)
    return [p for p in list(st.encoder.parameters()) + list(st.head_params) if p.requires_grad]


def disable(model: nn.Module):
    """Run the model without its prefix; returns the function that switches it back on."""
    st = inject.prefix_state(model)
    gate = st.gate
    st.gate = lambda: False

    def enable() -> None:
        st.gate = gate
    return enable


METHOD = Method(
    name=PrefixConfig.METHOD, config_class=PrefixConfig, apply=inject.apply_prefix, remove=inject.remove_prefix,
    is_applied=inject.has_prefix, trainable=trainable, report_rows=report.prefix_rows, cells=prompt_learning_cells,
    summary=report.prefix_summary, checkpoint=checkpoint, example=lambda: PrefixConfig(num_virtual_tokens=4),
    peft_types=(checkpoint.PEFT_TYPE,), peft_bridge=peft_bridge.BRIDGE, disable=disable)
