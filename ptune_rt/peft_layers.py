"""What every method's ``accelerate`` bridge needs from PEFT's side, written once.

* :func:`peft_tuner_class` makes a method's fused module class visible to PEFT as one of its tuner
  layers (``isinstance(m, BaseTunerLayer)``): PEFT's ``save_pretrained``, ``merge_adapter`` /
  ``unmerge_adapter`` and ``disable_adapter()`` keep working on it, its ``active_adapter``,
  ``merged`` and ``disabled`` state is PEFT's own (``_active_adapter``, ``merged_adapters``,
  ``_disable_adapters``), and it holds the adapters it was built with: switching to, adding or
  deleting others raises. The base class provides ``merge()``, ``unmerge()``, ``held_adapters()``
  (their names) and ``set_adapters_trainable(flag)``.
* :func:`install_peft_guards` answers the PEFT model's own adapter management on the instance while
  the layers are swapped, and :func:`remove_peft_guards` takes that back (``restore``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

from torch import nn

#: Methods of a PEFT model (``PeftModel``, its tuner) that an accelerated model answers on the instance.
PEFT_GUARDED = ("add_adapter", "load_adapter", "set_adapter", "inject_adapter", "_enable_peft_forward_hooks")

_CLASSES: dict = {}


def peft_tuner_class(base: type, adapter_layer_names: tuple, module: str) -> type:
    """The subclass of ``base`` that PEFT sees as a tuner layer, made once per base (imports PEFT);
    named ``"Peft" + base.__name__`` in ``module`` (whose ``__getattr__`` gives it back for pickle)."""
    if base in _CLASSES:
        return _CLASSES[base]
    from peft.tuners.tuners_utils import BaseTunerLayer

    class PeftLayer(base, BaseTunerLayer):
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
                                f"{sorted(kwargs) or len(args)} (a mixed batch runs through the PEFT model's "
                                "forward(adapter_names=...) where the method supports it)")
            if self.disabled and self.merged:  # PEFT's disable_adapter() on a merged layer
                self.unmerge()
            return super().forward(x)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            if adapter_names is not None and list(adapter_names) != [self._active_adapter]:
                raise ValueError(f"adapter_names={adapter_names!r}: this layer holds only the adapter "
                                 f"{self._active_adapter!r}")
            if not self.disabled:
                base.merge(self)

        def unmerge(self) -> None:
            base.unmerge(self)

        def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            if names != self.held_adapters():
                raise ValueError(f"adapter_names={adapter_names!r}: a layer swapped by ptune_rt.accelerate holds "
                                 f"only the adapter {self.held_adapters()}; call ptune_rt.restore(peft_model) to "
                                 "switch adapters")
            self.set_adapters_trainable(not inference_mode)
            self._active_adapter = names[0]

        def delete_adapter(self, adapter_name: str, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot delete its adapter; call "
                             "ptune_rt.restore(peft_model) first")

        def update_layer(self, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot take another adapter; call "
                             "ptune_rt.restore(peft_model) first")

    PeftLayer.adapter_layer_names = adapter_layer_names
    PeftLayer.__name__ = PeftLayer.__qualname__ = "Peft" + base.__name__
    PeftLayer.__module__ = module
    _CLASSES[base] = PeftLayer
    return PeftLayer


# ----------------------------------------------------------------------------------------
# PEFT's adapter management on an accelerated model
# ----------------------------------------------------------------------------------------


def install_peft_guards(peft_model: nn.Module, adapters: list[str], mixed: Optional[Callable] = None) -> None:
    """While the layers are swapped (``remove_peft_guards`` undoes this):

    * ``add_adapter`` / ``load_adapter`` (``PeftModel``) and ``inject_adapter`` (its tuner) raise: PEFT
      would wrap the swapped layers in new PEFT layers, run both adapters at once and rename the
      saved keys;
    * ``set_adapter`` passes the adapter the layers hold to PEFT and raises for any other;
    * ``forward(adapter_names=[...])`` / ``generate(adapter_names=[...])`` (rows of a batch using
      different adapters or ``"__base__"``) runs inside ``mixed(peft_model, names)`` (the method's
      mixed-batch context), or raises when the method has none.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    for obj in peft_model.modules():
        if isinstance(obj, PeftModel):
            _guard(obj, "add_adapter", _Refusal(type(obj).__name__, "add_adapter", adapters))
            _guard(obj, "load_adapter", _Refusal(type(obj).__name__, "load_adapter", adapters))
            _guard(obj, "set_adapter", _OnlyHeld(obj, adapters))
        elif isinstance(obj, BaseTuner):
            _guard(obj, "inject_adapter", _Refusal(type(obj).__name__, "inject_adapter", adapters))
            _guard(obj, "set_adapter", _OnlyHeld(obj, adapters))
            if hasattr(type(obj), "_enable_peft_forward_hooks"):
                _guard(obj, "_enable_peft_forward_hooks", _MixedBatchHooks(peft_model, obj, mixed))


def remove_peft_guards(model: nn.Module) -> None:
    for m in model.modules():
        for name in PEFT_GUARDED:
            if isinstance(m.__dict__.get(name), _Guard):
                del m.__dict__[name]


def _guard(obj: nn.Module, name: str, fn) -> None:
    obj.__dict__[name] = fn


class _Guard:
    """A guard is a plain object (not a closure), so an accelerated model still pickles; it calls the
    class's own method, never the instance's attribute (which is the guard itself)."""


class _Refusal(_Guard):
    def __init__(self, owner: str, name: str, adapters: list[str]):
        self.owner, self.name, self.adapters = owner, name, adapters

    def __call__(self, *args, **kwargs):
        raise ValueError(f"{self.owner}.{self.name} after ptune_rt.accelerate: the swapped layers hold one adapter "
                         f"each ({self.adapters}); PEFT would wrap them in new layers that run both adapters at once. "
                         "Call ptune_rt.restore(peft_model), add or load the adapter with PEFT, then "
                         "ptune_rt.accelerate again (or ptune_rt.load_adapter(model, path, adapter_name=...) on a "
                         "ptune-rt model)")


class _OnlyHeld(_Guard):
    def __init__(self, owner: nn.Module, adapters: list[str]):
        self.owner, self.adapters = owner, adapters

    def __call__(self, adapter_name, *args, **kwargs):
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != self.adapters:
            raise ValueError(f"set_adapter({adapter_name!r}) after ptune_rt.accelerate: the swapped layers hold only "
                             f"{self.adapters}; call ptune_rt.restore(peft_model) to switch PEFT's adapters")
        return type(self.owner).set_adapter(self.owner, adapter_name, *args, **kwargs)


class _MixedBatchHooks(_Guard):
    def __init__(self, peft_model: nn.Module, owner: nn.Module, mixed: Optional[Callable]):
        self.peft_model, self.owner, self.mixed = peft_model, owner, mixed

    @contextlib.contextmanager
    def __call__(self, *args, **kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None and self.mixed is None:
            raise ValueError("adapter_names=... after ptune_rt.accelerate: this method runs no mixed-adapter batch; "
                             "call ptune_rt.restore(peft_model) first")
        with type(self.owner)._enable_peft_forward_hooks(self.owner, *args, **kwargs):
            if names is None:
                yield
            else:
                with self.mixed(self.peft_model, list(names)):
                    yield
