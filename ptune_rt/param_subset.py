"""Methods that train a subset of the model's own parameters (BitFit's biases, LayerNorm tuning's
norm weights): what they share, knowing no method by name.

``apply_subset`` freezes every parameter except the chosen ones (the registry re-enables what
other applied methods train), and records the chosen parameters' values and every flag it changed, so that
``remove_subset`` brings the model back bit for bit. ``subset_tensors`` / ``load_subset`` move the
chosen parameters in and out of a checkpoint by name, all or nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ptune_rt import state as model_state


@dataclasses.dataclass
class SubsetState:
    config: Any
    names: list                 # the trained parameters' names, in model order
    originals: dict             # name -> CPU copy of the value at apply time
    flags: dict                 # name -> requires_grad before apply, for every flag apply changed

    def parameters(self, model: nn.Module) -> list:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]


def chosen_parameters(model: nn.Module, wanted) -> list[str]:
    """Names of the parameters for which ``wanted(module_name, module, param_name, param)`` holds
    (a parameter shared by two modules, e.g. a tied bias, counts once, under its first name)."""
    names = []
    for name, p in model.named_parameters():
        mn, _, pn = name.rpartition(".")
        if wanted(mn, model.get_submodule(mn), pn, p):
            names.append(name)
    return names


def head_parameters(model: nn.Module, modules_to_save, owner: str, exclude=()) -> list[str]:
    """Parameter names of the task heads trained next to the subset (PEFT's modules_to_save)."""
    from ptune_rt.heads import head_modules
    names = []
    for head in head_modules(model, modules_to_save, owner, skip="\0"):
        names += [f"{head}.{pn}" for pn, _ in model.get_submodule(head).named_parameters()
                  if f"{head}.{pn}" not in exclude]
    return names


def apply_subset(model: nn.Module, method: str, config, names: list[str]) -> None:
    """Train exactly ``names``, freeze the rest; record what ``remove_subset`` needs."""
    params = dict(model.named_parameters())
    trained = {id(params[n]) for n in names}
    flags = {n: p.requires_grad for n, p in params.items() if p.requires_grad != (id(p) in trained)}
    originals = {n: params[n].detach().to("cpu", copy=True) for n in names}
    model_state.record(model, method, SubsetState(config, list(names), originals, flags))
    for n in flags:
        params[n].requires_grad_(not params[n].requires_grad)


def remove_subset(model: nn.Module, method: str) -> None:
    """The chosen parameters' values and every flag back as they were before ``apply_subset``."""
    st = model_state.get(model, method)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in st.originals.items():
            params[n].copy_(value)
    for n, flag in st.flags.items():
        params[n].requires_grad_(flag)
    model_state.forget(model, method)


def unload_subset(model: nn.Module, method: str) -> None:
    """Keep the trained values, give back every flag: the plain model with the method's training in it."""
    st = model_state.get(model, method)
    params = dict(model.named_parameters())
    for n, flag in st.flags.items():
        params[n].requires_grad_(flag)
    model_state.forget(model, method)


def disable_subset(model: nn.Module, method: str):
    """The values from before training in place of the trained ones; returns the function that puts
    the trained values back."""
    st = model_state.get(model, method)
    params = dict(model.named_parameters())
    with torch.no_grad():
        trained = {n: params[n].detach().clone() for n in st.names}
        for n, value in st.originals.items():
            params[n].copy_(value)

    def enable() -> None:
        with torch.no_grad():
            for n, value in trained.items():
                params[n].copy_(value)
    return enable


class SubsetOps:
    """A subset method's ``apply`` / ``remove`` / ``is_applied`` / ``trainable``, for its registry entry.

    ``names_of(model, config)`` lists the parameters ``config`` trains (a ValueError when none);
    ``label`` names the method in messages."""

    def __init__(self, method: str, label: str, config_class: type, names_of):
        self.method, self.label, self.config_class, self.names_of = method, label, config_class, names_of

    def apply(self, model: nn.Module, config) -> nn.Module:
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if self.is_applied(model):
            raise ValueError(f"{type(model).__name__} already carries {self.label}: ptune_rt.restore(model) first")
        apply_subset(model, self.method, config, self.names_of(model, config))
        return model

    def remove(self, model: nn.Module) -> None:
        remove_subset(model, self.method)

    def is_applied(self, model: nn.Module) -> bool:
        return model_state.get(model, self.method) is not None

    def trainable(self, model: nn.Module) -> list:
        return model_state.get(model, self.method).parameters(model)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        unload_subset(model, self.method)
        return model

    def disable(self, model: nn.Module):
        return disable_subset(model, self.method)


def subset_tensors(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The chosen parameters by name, as contiguous CPU copies (what a checkpoint holds)."""
    st = model_state.get(model, method)
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in zip(st.names, st.parameters(model))}


def check_subset_tensors(model: nn.Module, names: list[str], tensors: dict, where: str) -> list[str]:
    """Problems of a checkpoint's tensors against the model's parameters ``names`` (empty: loadable)."""
    params = dict(model.named_parameters())
    problems = [f"{where}: missing tensor {n!r}" for n in names if n not in tensors]
    for n, t in tensors.items():
        if n not in names:
            problems.append(f"{where}: unexpected tensor {n!r} (not a parameter this method trains here)")
        elif tuple(t.shape) != tuple(params[n].shape):
            problems.append(f"{where}: {n!r} has shape {tuple(t.shape)}, the model's parameter {tuple(params[n].shape)}")
        elif not t.is_floating_point() or not torch.isfinite(t).all():
            problems.append(f"{where}: {n!r} must hold finite floating-point values")
    return problems


def load_subset(model: nn.Module, tensors: dict) -> None:
    """Copy checked tensors into the parameters of the same names (after ``check_subset_tensors``)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))


# ----------------------------------------------------------------------------------------------
# Checkpoints (the handler interface of ptune_rt.io.adapters)
# ----------------------------------------------------------------------------------------------

PEFT_KEY_PREFIX = "base_model.model."


@dataclasses.dataclass
class Collected:
    config: Any
    tensors: dict
    model_type: Any
    model_class: str

    def fingerprint(self, model: nn.Module) -> dict:
        return {"model": {"model_type": self.model_type, "class": self.model_class},
                "parameters": {n: list(t.shape) for n, t in self.tensors.items()}}


@dataclasses.dataclass
class PeftLayout:
    """How a subset method's checkpoint looks in PEFT's format: ``peft_type``, the key of one parameter
    (``key(name)``; ``name(key)`` inverts it) and the config fields (``config_to_peft(config)`` ->
    dict of PEFT fields, ``config_from_peft(d, source)`` -> config)."""
    peft_type: str
    key: Any
    name: Any
    config_to_peft: Any
    config_from_peft: Any


class SubsetCheckpoint:
    """Save and load a parameter-subset method: the trained parameters by name, all or nothing."""

    def __init__(self, method: str, config_class: type, apply, names_of, peft: PeftLayout = None):
        self.method, self.config_class, self.apply, self.names_of, self.peft = method, config_class, apply, names_of, peft

    def has_adapter(self, model: nn.Module) -> bool:
        return model_state.get(model, self.method) is not None

    def collect(self, model, adapter_name, head_names, heads_required, hint=None) -> Collected:
        from ptune_rt.errors import AdapterError
        if adapter_name not in (None, "default"):
            raise AdapterError(f"{self.method} has one adapter per model: leave adapter_name None")
        st = model_state.get(model, self.method)
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        from ptune_rt.io.common import model_class
        return Collected(st.config, subset_tensors(model, self.method), mtype, model_class(model))

    def to_peft(self, collected: Collected, model, task_type):
        if self.peft is None:
            from ptune_rt.errors import AdapterError
            raise AdapterError(f"PEFT has no {self.method} format: save with format='ptune'")
        config = {"peft_type": self.peft.peft_type, "task_type": task_type, "base_model_name_or_path": None,
                  "revision": None, "inference_mode": True, "auto_mapping": None,
                  **self.peft.config_to_peft(collected.config)}
        return config, {PEFT_KEY_PREFIX + self.peft.key(n): t for n, t in collected.tensors.items()}

    def spec_from_peft(self, d: dict, source: str, backend):
        return self.peft.config_from_peft(d, source)

    def tensors_from_peft(self, raw: dict, weights_file: str):
        from ptune_rt.errors import AdapterError
        bad = [k for k in raw if not k.startswith(PEFT_KEY_PREFIX)]
        if bad:
            raise AdapterError(f"cannot load {weights_file}: keys {bad[:5]} do not start with {PEFT_KEY_PREFIX!r}")
        keys = {self.peft.name(k[len(PEFT_KEY_PREFIX):]): k for k in raw}
        return {n: raw[k] for n, k in keys.items()}, lambda n: keys.get(n, n)

    def spec_from_ptune(self, d: dict, source: str, backend):
        from ptune_rt.errors import AdapterError
        try:
            return self.config_class.from_dict(d.get("config"))
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{source}: 'config' is not a valid {self.config_class.__name__}: {e}") from None

    def plan_load(self, model, config, tensors: dict, *, adapter_name, file_key, weights_file, hint=None):
        """Check everything first; the returned plan applies the method (when not applied) and copies."""
        from ptune_rt.errors import AdapterError
        if adapter_name is not None:
            raise AdapterError(f"{self.method} has one adapter per model: leave adapter_name None")
        st = model_state.get(model, self.method)
        if st is not None and st.config != config:
            raise AdapterError(f"{weights_file}: {type(model).__name__} carries {self.method} with {st.config}, the "
                               f"checkpoint has {config}: ptune_rt.restore(model) first")
        try:
            names = st.names if st is not None else self.names_of(model, config)
        except ValueError as e:
            raise AdapterError(f"{weights_file}: {e}") from None
        problems = check_subset_tensors(model, names, tensors, weights_file)
        if problems:
            raise AdapterError("cannot load the checkpoint:\n  " + "\n  ".join(problems[:20]))
        apply = self.apply

        class Plan:
            def execute(self):
                if st is None:
                    apply(model, config)
                load_subset(model, tensors)
        return Plan()
