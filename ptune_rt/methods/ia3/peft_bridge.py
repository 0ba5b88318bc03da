"""``ptune_rt.accelerate`` for PEFT IA3 models: PEFT's IA3 layers are replaced by ``PeftIA3Linear``
modules (``IA3Linear`` that PEFT also sees as its tuner layers) holding the very same base layer and
``ia3_l`` ParameterDict, hence the same Parameter objects under the same names."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.ia3.inject import (ORIGIN_ATTR, SOURCE_ATTR, check_layer, ia3_modules, peft_ia3_layers,
                                         set_submodule)
from ptune_rt.methods.ia3.layer import IA3Linear
from ptune_rt.methods.ia3.report import ia3_rows
from ptune_rt.methods.method import PeftBridge
from ptune_rt.targets import is_linear

_PEFT_IA3_LINEAR = None


def _peft_ia3_linear_class():
    """``PeftIA3Linear``: the module ``accelerate_peft`` puts in, defined on first use (imports PEFT)."""
    global _PEFT_IA3_LINEAR
    if _PEFT_IA3_LINEAR is not None:
        return _PEFT_IA3_LINEAR
    from peft.tuners.tuners_utils import BaseTunerLayer

    class PeftIA3Linear(IA3Linear, BaseTunerLayer):
        """An ``IA3Linear`` that PEFT also recognises as one of its tuner layers, so its
        ``save_pretrained``, ``merge_adapter`` / ``unmerge_adapter`` and ``disable_adapter()``
        keep working: ``active_adapter``, ``merged`` and ``disabled`` are PEFT's own state
        (``_active_adapter``, ``merged_adapters``, ``_disable_adapters``). It runs one adapter;
        switching, adding or deleting adapters raises: ``ptune_rt.restore(peft_model)`` first."""

        adapter_layer_names = ("ia3_l",)

        @property
        def active_adapter(self) -> str:
            return self._active_adapter

        @active_adapter.setter
        def active_adapter(self, name: str) -> None:
            self._active_adapter = name

        @property
        def merged(self) -> bool:
            return bool(self.merged_adapters)

        @merged.setter
        def merged(self, value: bool) -> None:
            self.merged_adapters = [self._active_adapter] if value else []

        @property
        def disabled(self) -> bool:
            return self._disable_adapters

        @disabled.setter
        def disabled(self, value: bool) -> None:
            self._disable_adapters = bool(value)

        def forward(self, x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"{type(self).__name__} takes only the input tensor; got extra arguments "
                                f"{sorted(kwargs) or len(args)}: call ptune_rt.restore(peft_model) first")
            if self.disabled and self.merged:
                self.unmerge()
            return super().forward(x)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            if adapter_names is not None and list(adapter_names) != [self._active_adapter]:
                raise ValueError(f"adapter_names={adapter_names!r}: this layer runs only the adapter "
                                 f"{self._active_adapter!r}")
            if not self.disabled:
                IA3Linear.merge(self)

        def unmerge(self) -> None:
            IA3Linear.unmerge(self)

        def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            if names != [self._active_adapter]:
                raise ValueError(f"adapter_names={adapter_names!r}: a layer swapped by ptune_rt.accelerate runs only "
                                 f"the adapter {self._active_adapter!r}; call ptune_rt.restore(peft_model) to switch")
            self.ia3_l[names[0]].requires_grad_(not inference_mode)

        def delete_adapter(self, adapter_name: str, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot delete its adapter; call "
                             "ptune_rt.restore(peft_model) first")

        def update_layer(self, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot take another adapter; call "
                             "ptune_rt.restore(peft_model) first")

    PeftIA3Linear.__module__ = __name__
    PeftIA3Linear.__qualname__ = "PeftIA3Linear"
    _PEFT_IA3_LINEAR = PeftIA3Linear
    return PeftIA3Linear


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
