"""LoRA's entry in the method registry."""
from __future__ import annotations

from torch import nn

from ptune_rt import state as model_state
from ptune_rt.methods.lora import adapters, checkpoint, inject, peft_bridge, report
from ptune_rt.methods.lora.config import LoRAConfig
from ptune_rt.methods.method import Method


def trainable(model: nn.Module) -> list:
    """The adapters' parameters, and the biases ``LoRAConfig.bias`` trains, that require grad."""
    mods = inject.lora_modules(model)
    out = [p for m in mods.values() for n, p in m.named_parameters() if not n.startswith("base_layer.")]
    bias = getattr(inject.model_config(model), "bias", "none")
    if bias == "all":
        out += [p for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias"]
    elif bias == "lora_only":
        out += [m.base_layer.bias for m in mods.values() if m.base_layer.bias is not None]
    st = model_state.get(model, inject.NAME)
    for h in st.heads if st is not None else []:
        out += list(model.get_submodule(h).parameters())
    return list({id(p): p for p in out if p.requires_grad}.values())


METHOD = Method(
    name=LoRAConfig.METHOD, config_class=LoRAConfig, apply=inject.apply_lora, remove=inject.restore_lora,
    is_applied=lambda model: bool(inject.lora_modules(model)), trainable=trainable,
    report_rows=report.lora_rows, cells=report.lora_cells, summary=report.lora_summary, checkpoint=checkpoint,
    example=lambda: LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    peft_types=(checkpoint.PEFT_TYPE,), peft_bridge=peft_bridge.BRIDGE, merge_and_unload=adapters.merge_and_unload,
    disable=adapters.disable)
