"""IA3 checkpoints: what a model's IA3 adapter is on disk, and how a checkpoint goes back in.

Keys are module paths of the unswapped model with the adapter name left out, as in PEFT's saved
files (which add the prefix ``base_model.model.``)::

    model.layers.0.self_attn.k_proj.ia3_l   [out_features, 1]  (output scale)
    model.layers.0.mlp.down_proj.ia3_l      [1, in_features]   (feedforward: input scale)
    score.weight, ...                       (modules_to_save: whole heads, e.g. a classifier)

Loading validates the checkpoint against the model completely before changing it; if anything
still fails while it is put in, the model is given back exactly as it was (all or nothing).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.io import peft_config
from ptune_rt.io.common import (AdapterError, collect_prompt_heads, config_from_ptune, copy_all_or_nothing, cpu_copy,
                                exact_regex, model_class, model_type, prompt_head_destinations, raise_problems,
                                saved_model_and_heads, shape_str, tensor_problem)
from ptune_rt.methods._config import check_bool, check_module_names
from ptune_rt.methods.ia3 import inject
from ptune_rt.methods.ia3.config import IA3Config
from ptune_rt.methods.ia3.layer import IA3Linear
from ptune_rt.targets import is_linear_like, linear_shape, match_heads, match_targets, module_view

METHOD = "ia3"
PEFT_TYPE = "IA3"
VECTOR_KEY = "ia3_l"
_KINDS = ("linear", "conv1d")


def has_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, IA3Linear) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class IA3State:
    """One IA3 adapter of a model, ready to be written."""

    config: IA3Config                    # target / feedforward modules selecting exactly ``targets``
    targets: dict[str, IA3Linear]
    adapter_name: str
    tensors: dict[str, torch.Tensor]     # checkpoint key -> CPU copy
    heads: list[str]
    head_names: list[str]

    @property
    def fan_in_fan_out(self) -> bool:
        return all(m.fan_in_fan_out for m in self.targets.values())

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        return {
            "model": {"model_type": model_type(model), "class": model_class(model)},
            "targets": [{"module": n, "in_features": m.in_features, "out_features": m.out_features,
                         "kind": "conv1d" if m.fan_in_fan_out else "linear", "feedforward": m.is_feedforward}
                        for n, m in self.targets.items()],
            "modules_to_save": list(self.heads),
        }


def _specs(model: nn.Module, view: dict, mods: dict[str, IA3Linear], config: Optional[IA3Config]):
    """(target_modules, feedforward_modules) that select exactly the model's IA3 modules and their
    feedforward flags under PEFT's rules: the configured ones if they still do, else the last name
    components, else the full names (a list of feedforward entries stays a subset of a list of
    targets, which PEFT requires)."""
    names, flags = set(mods), {n: m.is_feedforward for n, m in mods.items()}
    candidates = []
    if config is not None:
        try:
            candidates.append(inject.default_targets(model, config))
        except ValueError:
            pass
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    candidates.append((short, [s for s in short if all(flags[n] for n in names if n.endswith("." + s) or n == s)]))
    full = sorted(names)
    candidates.append((full, [n for n in full if flags[n]]))
    for tm, ff in candidates:
        if tm == "all-linear" or set(match_targets(model, view, tm)) != names:
            continue
        if all(inject.is_feedforward(n, ff) == flags[n] for n in names):
            return tm, ff
    return full, [n for n in full if flags[n]]


def collect(model: nn.Module, adapter_name: Optional[str], head_names: list[str], heads_required: bool,
            hint: Optional[IA3Config] = None) -> IA3State:
    """The IA3 adapter ``adapter_name`` (default: the active one) of ``model``, validated."""
    view = module_view(model)
    mods = {n: m for n, m in view.items() if isinstance(m, IA3Linear)}
    if not mods:
        raise AdapterError(f"{model_class(model)} has no IA3 modules: apply an adapter first "
                           "(ptune_rt.apply(model, IA3Config(...))) or load one (ptune_rt.load_adapter)")
    actives = {m.active_adapter for m in mods.values()}
    if adapter_name is None:
        if len(actives) > 1:
            raise AdapterError(f"the IA3 modules have different active adapters {sorted(actives)}: pass adapter_name")
        adapter_name = actives.pop()
    lacking = [n for n, m in mods.items() if adapter_name not in m.ia3_l]
    if lacking:
        raise AdapterError(f"adapter_name={adapter_name!r} is not an adapter of IA3 modules {lacking[:5]}")
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise AdapterError(f"IA3 modules {merged[:3]} have their vector merged into the base weight: unmerge the model "
                           "before saving (a merged checkpoint would hold the vectors and scaled weights both)")
    cfg0 = inject.model_config(model) or hint
    tm, ff = _specs(model, view, mods, cfg0)
    backend = cfg0.backend if cfg0 is not None else next(iter(mods.values())).backend
    if not heads_required:  # "auto": the task heads, and the modules the model trains whole
        recorded = model_state.get(model, inject.NAME)
        head_names = list(dict.fromkeys(list(head_names) + (recorded.heads if recorded is not None else [])))
    heads, used, head_tensors = collect_prompt_heads(model, view, head_names, heads_required)
    clash = [h for h in heads for t in mods if t == h or t.startswith(h + ".") or h.startswith(t + ".")]
    if clash:
        raise AdapterError(f"modules {clash[:3]} are both saved whole (modules_to_save) and IA3 targets or inside one")
    try:
        config = IA3Config(target_modules=tm, feedforward_modules=ff, backend=backend,
                           init_ia3_weights=cfg0.init_ia3_weights if cfg0 is not None else True,
                           modules_to_save=list(heads) if heads else (None if cfg0 is None else cfg0.modules_to_save))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"the model's IA3 adapter cannot be described by an IA3Config: {e}") from e
    tensors = {f"{n}.{VECTOR_KEY}": cpu_copy(m.ia3_l[adapter_name]) for n, m in mods.items()}
    tensors.update(head_tensors)
    return IA3State(config=config, targets=mods, adapter_name=adapter_name, tensors=tensors, heads=heads,
                    head_names=used)


def to_peft(state: IA3State, model: nn.Module, task_type: Optional[str]) -> tuple[dict, dict]:
    """(``adapter_config.json`` contents, ``adapter_model.safetensors`` tensors) as PEFT writes them."""
    c = state.config
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "auto_mapping": peft_config.auto_mapping(model, task_type),
        "base_model_name_or_path": peft_config.name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "target_modules": c.target_modules,
        "exclude_modules": None,
        "feedforward_modules": c.feedforward_modules,
        "fan_in_fan_out": bool(state.fan_in_fan_out),
        "modules_to_save": list(state.head_names) if state.head_names else None,
        "init_ia3_weights": bool(c.init_ia3_weights),
    }
    return config, {peft_config.PEFT_KEY_PREFIX + k: t for k, t in state.tensors.items()}


def hint_from_peft(peft_cfg, adapter_name: str, source: str) -> Optional[IA3Config]:
    """The IA3Config of a PEFT model's IA3 adapter (None where it cannot be read)."""
    if not hasattr(peft_cfg, "to_dict"):
        return None
    d = {k: (v.value if hasattr(v, "value") else v) for k, v in peft_cfg.to_dict().items()}
    try:
        return _config_from_peft(d, source, "auto")
    except AdapterError:
        return None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class IA3Spec:
    """An IA3 checkpoint's description, whatever the file format."""

    config: IA3Config
    source: str
    targets: Optional[dict[str, tuple[int, int, str, bool]]] = None  # module -> (in, out, kind, ff) (own format)
    model_type: Optional[str] = None
    model_class: Optional[str] = None
    heads: list[str] = dataclasses.field(default_factory=list)
    heads_exact: bool = False


def _names(d: dict, key: str, source: str):
    v = d.get(key)
    if isinstance(v, (list, tuple, set)):
        v = sorted(v) if isinstance(v, set) else list(v)
    try:
        if not (key == "feedforward_modules" and v == []):
            check_module_names(f"{source}: {key}", v)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    return v


def _config_from_peft(d: dict, source: str, backend: str) -> IA3Config:
    try:
        check_bool(f"{source}: init_ia3_weights", d.get("init_ia3_weights", True))
        return IA3Config(target_modules=_names(d, "target_modules", source),
                         feedforward_modules=_names(d, "feedforward_modules", source),
                         exclude_modules=_names(d, "exclude_modules", source),
                         init_ia3_weights=d.get("init_ia3_weights", True), backend=backend)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: not a valid IA3 config for ptune_rt: {e}") from None


def spec_from_peft(d: dict, source: str, backend: Optional[str]) -> IA3Spec:
    """An IA3Spec from PEFT's ``adapter_config.json`` dict for IA3."""
    config = _config_from_peft(d, source, backend or "auto")
    return IA3Spec(config=config, source=source, heads=peft_config.peft_task_heads(d, source))


def tensors_from_peft(raw: dict[str, torch.Tensor], weights_file: str):
    """(tensors keyed by module path, file_key): PEFT's keys without ``base_model.model.``."""
    prefix = peft_config.PEFT_KEY_PREFIX
    bad = [k for k in raw if not k.startswith(prefix)]
    if bad:
        raise AdapterError(f"cannot load {weights_file}: keys {bad[:5]} do not start with {prefix!r}, as every key "
                           "of a PEFT IA3 checkpoint does")
    return {k[len(prefix):]: t for k, t in raw.items()}, lambda k: prefix + k


def spec_from_ptune(d: dict, source: str, backend: Optional[str]) -> IA3Spec:
    """An IA3Spec from the own format's config dict (``ptune_config.json``)."""
    config = config_from_ptune(d, source, backend, IA3Config, "IA3")
    entries = d.get("targets")
    if not isinstance(entries, list) or not entries:
        raise AdapterError(f"{source}: 'targets' must be a non-empty list of "
                           "{module, in_features, out_features, kind, feedforward} objects")
    targets = {}
    for e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("module"), str) and e.get("kind") in _KINDS
              and isinstance(e.get("feedforward"), bool)
              and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) and e.get(k) >= 1
                      for k in ("in_features", "out_features")))
        if not ok:
            raise AdapterError(f"{source}: malformed entry in 'targets': {e!r} (expected module: a name, in_features / "
                               f"out_features: integers >= 1, kind: one of {_KINDS}, feedforward: true / false)")
        targets[e["module"]] = (e["in_features"], e["out_features"], e["kind"], e["feedforward"])
    mtype, mclass, heads = saved_model_and_heads(d, source)
    return IA3Spec(config=config, source=source, targets=targets, model_type=mtype, model_class=mclass, heads=heads,
                   heads_exact=True)


@dataclasses.dataclass
class IA3LoadPlan:
    """A validated load: ``execute()`` swaps in (``apply_config``, when the model has no IA3 modules),
    adds the adapter ``add_name`` (when given), then copies; on any failure the model comes back as
    it was."""

    model: nn.Module
    apply_config: Optional[IA3Config]
    final_config: Optional[IA3Config]
    add_name: Optional[str]
    vector_copies: list           # [(module name, adapter name or None for the active one, tensor)]
    other_copies: list            # [(model tensor, tensor)]

    def execute(self) -> nn.Module:
        model = self.model
        grads = [(p, p.requires_grad) for p in model.parameters()]
        added = []
        try:
            if self.apply_config is not None:
                inject.apply_ia3(model, self.apply_config)
            if self.add_name is not None:
                for module, _, _ in self.vector_copies:
                    m = model.get_submodule(module)
                    m.add_adapter(self.add_name)
                    added.append(m)
                    m.ia3_l[self.add_name].requires_grad_(False)  # inactive until set_adapter (as in PEFT)
            copies = [(model.get_submodule(n).ia3_l[a or model.get_submodule(n).active_adapter], t)
                      for n, a, t in self.vector_copies]
            copy_all_or_nothing(copies + list(self.other_copies))
            if self.apply_config is not None:
                model_state.get(model, inject.NAME).config = self.final_config
        except BaseException:
            for m in added:
                if self.add_name in m.ia3_l:
                    del m.ia3_l[self.add_name]
            if self.apply_config is not None and inject.ia3_modules(model):
                inject.restore_ia3(model)
            for p, flag in grads:
                p.requires_grad_(flag)
            raise
        return model


def _target_flags(model: nn.Module, view: dict, spec: IA3Spec) -> dict[str, bool]:
    """{module name: feedforward} the checkpoint targets in this model; raises when it was made for
    another base model."""
    mtype, cls = model_type(model), model_class(model)
    if spec.model_type is not None and mtype is not None and spec.model_type != mtype:
        raise AdapterError(f"{spec.source}: the adapter was saved for model_type {spec.model_type!r} "
                           f"({spec.model_class}), this model is {mtype!r} ({cls})")
    if spec.targets is not None:
        absent = [n for n in spec.targets if n not in view]
        if absent:
            raise AdapterError(f"{spec.source}: target modules {absent[:5]} do not exist in this {cls}: the adapter "
                               "was made for another base model")
        return {n: t[3] for n, t in spec.targets.items()}
    try:
        tm, ff = inject.default_targets(model, spec.config)
    except ValueError as e:
        raise AdapterError(f"{spec.source}: {e}") from None
    names = match_targets(model, view, tm, spec.config.exclude_modules)
    if not names:
        raise AdapterError(f"{spec.source}: target_modules={tm!r} match no module of this {cls} (model_type "
                           f"{mtype!r}): the adapter was made for another base model")
    return {n: inject.is_feedforward(n, ff) for n in names}


def _check_layers(view: dict, existing: dict, flags: dict, spec: IA3Spec, adapter_name) -> tuple[dict, list, bool]:
    """({name: vector shape}, problems, whether the load adds ``adapter_name`` beside the model's adapters)."""
    problems, shapes = [], {}
    fresh = not existing
    if fresh and adapter_name not in (None, "default"):
        problems.append(f"adapter_name={adapter_name!r}: a model without IA3 modules gets the adapter 'default'")
    extra = sorted(set(existing) - set(flags))
    if extra:
        problems.append(f"this model's IA3 modules {extra[:5]} are not in the adapter; ptune_rt.restore(model) first "
                        "to load it fresh")
    holders = [n for n, m in existing.items() if adapter_name in m.ia3_l] if adapter_name is not None else []
    add = bool(existing) and adapter_name is not None and not holders
    if add and any(m.__dict__.get(inject.SOURCE_ATTR) == "peft" for m in existing.values()):
        problems.append(f"adapter_name={adapter_name!r}: this model's IA3 layers come from a PEFT model, which keeps "
                        "its own adapter registry; ptune_rt.restore(model) first")
    for n, ff in flags.items():
        m = view[n]
        if isinstance(m, IA3Linear):
            base = m.base_layer
            if m.is_feedforward != ff:
                problems.append(f"module {n!r}: the model's IA3 vector scales the {'input' if m.is_feedforward else 'output'}, "
                                f"the checkpoint's the {'input' if ff else 'output'}")
            if m.merged:
                problems.append(f"module {n!r} has its vector merged into the base weight: unmerge it before loading")
            if not add and (adapter_name or m.active_adapter) not in m.ia3_l:
                problems.append(f"module {n!r} has no adapter named {adapter_name!r} (it has {sorted(m.ia3_l)})")
        elif fresh and is_linear_like(m):
            base = m
        else:
            why = ("" if fresh else f", but this model already carries IA3 modules ({sorted(existing)[:3]} ...): "
                   "ptune_rt.restore(model) first to load it fresh")
            problems.append(f"target module {n!r} is a {type(m).__module__}.{type(m).__qualname__}{why}; ptune_rt's IA3 "
                            "targets nn.Linear and GPT-2 Conv1D layers")
            continue
        in_f, out_f = linear_shape(base)
        shapes[n] = (1, in_f) if ff else (out_f, 1)
        if spec.targets is not None:
            want_in, want_out, want_kind, _ = spec.targets[n]
            kind = "linear" if isinstance(base, nn.Linear) else "conv1d"
            if (want_in, want_out, want_kind) != (in_f, out_f, kind):
                problems.append(f"module {n!r}: adapter expects a {want_kind} layer with in_features={want_in}, "
                                f"out_features={want_out}; this model has a {kind} layer with in_features={in_f}, "
                                f"out_features={out_f}")
    return shapes, problems, add


def plan_load(model: nn.Module, spec: IA3Spec, tensors: dict[str, torch.Tensor], *, adapter_name: Optional[str],
              file_key: Callable[[str], str], weights_file: str, hint=None) -> IA3LoadPlan:
    """Check ``tensors`` (module-path keys) and ``spec`` against ``model``; raise AdapterError listing
    every problem, or return the plan that loads them."""
    view = module_view(model)
    cls = model_class(model)
    existing = {n: m for n, m in view.items() if isinstance(m, IA3Linear)}
    flags = _target_flags(model, view, spec)
    shapes, problems, add = _check_layers(view, existing, flags, spec, adapter_name)
    raise_problems(f"cannot load the adapter of {spec.source} into this {cls}:", problems)

    expected = {f"{n}.{VECTOR_KEY}": shape for n, shape in shapes.items()}
    problems = []
    heads = prompt_head_destinations(view, spec.heads, spec.heads_exact, tensors, cls, problems)
    if heads and add:
        problems.append(f"the checkpoint saves whole modules (modules_to_save={spec.heads}), which every adapter of "
                        f"this model shares; an added adapter (adapter_name={adapter_name!r}) cannot replace them")
    for k in expected:
        if k not in tensors:
            problems.append(f"missing key {file_key(k)!r} (expected shape {shape_str(expected[k])})")
    for k, t in tensors.items():
        if k in expected:
            module = k[:-len(VECTOR_KEY) - 1]
            why = f"(the {'input' if flags[module] else 'output'} scale of {module!r})"
            problem = tensor_problem(file_key(k), t, expected[k], why)
        elif k in heads:
            problem = tensor_problem(file_key(k), t, tuple(heads[k].shape), "(this model's tensor)")
        else:
            module = k.rsplit(".", 1)[0]
            problem = f"unexpected key {file_key(k)!r}" + ("" if module in view else
                                                           f" (there is no module {module!r} in this {cls})")
        if problem:
            problems.append(problem)
    raise_problems(f"cannot load {weights_file} into this {cls}:", problems)

    apply_config = None
    if not existing:
        ff_names = [n for n, ff in flags.items() if ff]
        head_modules = [n for found in match_heads(view, spec.heads, dotted=spec.heads_exact).values() for n in found
                        if any(k.startswith(n + ".") for k in heads)]
        apply_config = dataclasses.replace(spec.config, target_modules=exact_regex(flags), exclude_modules=None,
                                           feedforward_modules=exact_regex(ff_names) if ff_names else [],
                                           modules_to_save=list(dict.fromkeys(head_modules)))
    vector_copies = [(k[:-len(VECTOR_KEY) - 1], adapter_name, tensors[k]) for k in expected]
    return IA3LoadPlan(model, apply_config, spec.config, adapter_name if add else None, vector_copies,
                       [(dst, tensors[k]) for k, dst in heads.items()])
