"""``ptune_rt.accelerate`` for PEFT IA3 models: PEFT's IA3 layers are replaced by ``PeftIA3Linear``
modules (``IA3Linear`` that PEFT also sees as its tuner layers) holding the very same base layer and
``ia3_l`` ParameterDict, hence the same Parameter objects under the same names."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.ia3.inject import (ORIGIN_ATTR, SOURCE_ATTR, check_layer, ia3_modules, peft_ia3_layers,
                                         set_submodule)
from ptune_rt.methods.ia3.layer import IA3Linear
from ptune_rt.methods.ia3.report import ia3_rows
from ptune_rt.methods.ia3.adapters import mixed_adapters
from ptune_rt.methods.method import PeftBridge
from ptune_rt.peft_layers import install_peft_guards, peft_tuner_class
from ptune_rt.targets import is_linear

def _peft_ia3_linear_class():
    """``PeftIA3Linear``: the module ``accelerate_peft`` puts in, an ``IA3Linear`` that PEFT also sees as
    one of its tuner layers (see ``ptune_rt.peft_layers.peft_tuner_class``)."""
    return peft_tuner_class(IA3Linear, ("ia3_l",), __name__)


def __getattr__(name: str):
    # ``PeftIA3Linear`` of this module exists once PEFT is imported; pickle finds it here too.
    if name == "PeftIA3Linear":
        return _peft_ia3_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def accelerate_peft(peft_model: nn.Module, backend: str = "auto") -> list[dict]:
    """Run an existing PEFT IA3 model on fused ``IA3Linear`` modules, in place; returns ``report``.

    Every ``peft.tuners.ia3.layer.Linear`` (over nn.Linear, or GPT-2 Conv1D) is replaced by a
    ``PeftIA3Linear`` holding the very same base layer and ``ia3_l`` ParameterDict: parameter
    names, state_dict keys, an optimizer built before the call and requires_grad flags are
    unaffected, and PEFT's ``save_pretrained``, ``merge_adapter`` / ``unmerge_adapter`` and
    ``disable_adapter()`` keep working. Supported: one adapter per layer, active and unmerged;
    refused before any change: several adapters or active adapters, merged or disabled layers, IA3
    on convolutions or quantized layers. ``ptune_rt.restore(peft_model)`` puts PEFT's layers back."""
    if ia3_modules(peft_model):
        raise ValueError("peft_model already runs on ptune-rt IA3 modules (ptune_rt.accelerate was called); "
                         "ptune_rt.restore(peft_model) first")
    layers = peft_ia3_layers(peft_model)
    if not layers:
        raise ValueError(f"peft_model ({type(peft_model).__name__}) has no PEFT IA3 layers; expected a model from "
                         "peft.get_peft_model(model, IA3Config(...))")
    plans = {n: _plan_peft_layer(n, m, backend) for n, m in layers.items()}
    cls = _peft_ia3_linear_class()
    new = {}
    for n, (m, adapter) in plans.items():
        layer = cls.from_vectors(m.base_layer, m.ia3_l, bool(m.is_feedforward), adapter_name=adapter,
                                 backend=backend)
        layer.__dict__[ORIGIN_ATTR] = m
        layer.__dict__[SOURCE_ATTR] = "peft"
        layer.train(m.training)
        new[n] = layer
    for n, layer in new.items():  # nothing below can fail on a validated model
        set_submodule(peft_model, n, layer)
    install_peft_guards(peft_model, sorted({adapter for _, adapter in plans.values()}), mixed_adapters)
    return ia3_rows(peft_model)


def _plan_peft_layer(name: str, m: nn.Module, backend: str):
    """Validate one PEFT IA3 layer; returns (layer, adapter name)."""
    from peft.tuners.ia3.layer import Linear as PeftLinear

    where = f"PEFT IA3 layer {name!r}"
    if type(m) is not PeftLinear:
        raise TypeError(f"{where} is a {type(m).__module__}.{type(m).__name__}; ptune_rt.accelerate supports IA3 on "
                        "nn.Linear and GPT-2 Conv1D layers only (peft.tuners.ia3.layer.Linear), not convolution or "
                        "quantized IA3 layers")
    if not is_linear(m.base_layer):
        raise TypeError(f"{where} wraps a {type(m.base_layer).__name__}; expected an nn.Linear or GPT-2 Conv1D")
    active = list(m.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{where} has active adapters {active}; ptune_rt.accelerate supports exactly one active "
                         "adapter (peft_model.set_adapter(name))")
    adapter = active[0]
    if sorted(m.ia3_l) != [adapter]:
        raise ValueError(f"{where} holds adapters {sorted(m.ia3_l)} (active: {adapter!r}); ptune_rt.accelerate "
                         "supports one adapter per layer: delete the others (peft_model.delete_adapter(name))")
    if m.merged:
        raise ValueError(f"{where} is merged ({m.merged_adapters}); expected unmerged layers: call "
                         "peft_model.unmerge_adapter() first")
    if m.disable_adapters:
        raise ValueError(f"{where} has its adapters disabled; expected enabled adapters (leave "
                         "peft_model.disable_adapter() first)")
    v, w = m.ia3_l[adapter], m.base_layer.weight
    if v.device != w.device:
        raise ValueError(f"{where}: ia3_l is on {v.device} but the base weight on {w.device}; expected one device")
    check_layer(name, m.base_layer, backend, "ptune_rt.accelerate: PEFT IA3 layer")
    return m, adapter


def claims(peft_model: nn.Module) -> bool:
    """PEFT IA3 layers, or IA3 layers already swapped in from PEFT (``accelerate_peft`` then says so)."""
    return bool(peft_ia3_layers(peft_model)) or any(m.__dict__.get(SOURCE_ATTR) == "peft"
                                                     for m in ia3_modules(peft_model).values())


BRIDGE = PeftBridge(kind="PEFT IA3 layers", claims=claims, accelerate=accelerate_peft)
