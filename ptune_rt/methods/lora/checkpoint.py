"""LoRA checkpoints: what a model's LoRA adapter is on disk, and how a checkpoint goes back in.

Keys are module paths of the unswapped model with the adapter name left out, as in PEFT's saved
files (which add the prefix ``base_model.model.``)::

    model.layers.0.self_attn.q_proj.lora_A.weight   [r, in_features]
    model.layers.0.self_attn.q_proj.lora_B.weight   [out_features, r]
    model.layers.0.self_attn.q_proj.lora_magnitude_vector  [out_features] (DoRA adapters only)
    model.embed_tokens.token_adapter.trainable_tokens_delta  [n tokens, D] (trainable_token_indices)
    model.layers.0.self_attn.q_proj.base_layer.bias (bias="lora_only" / "all": the target's bias)
    model.norm.bias, ...                            (bias="all": every other bias)
    score.weight, ...                               (modules_to_save: whole heads, e.g. a classifier)

Loading validates the checkpoint against the model completely before changing it, and undoes a
partial change if anything still fails.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.io import peft_config
from ptune_rt.io.common import (AdapterError, config_from_ptune, cpu_copy, exact_regex, model_class, model_type,
                                raise_problems, saved_model_and_heads, shape_str, tensor_problem)
from ptune_rt.methods.lora import inject
from ptune_rt.methods.lora import peft_config as lora_peft_config
from ptune_rt.methods.lora.config import LoRAConfig
from ptune_rt.methods.lora.inits import BASE_MODIFYING, FROZEN_B
from ptune_rt.methods.lora.inject import DEFAULT_TARGETS, SOURCE_ATTR, restore_lora
from ptune_rt.methods.lora.layer import LoRALinear
from ptune_rt.methods.lora.tokens import TrainableTokensEmbedding
from ptune_rt.targets import (in_layers, is_linear_like, lora_target_shape, match_heads, match_targets, module_matches,
                              module_view)

METHOD = "lora"
PEFT_TYPE = "LORA"
#: A DoRA magnitude's key after its module path (PEFT's file key: no adapter name, no ".weight").
MAGNITUDE_KEY = "lora_magnitude_vector"
#: Trained embedding rows (trainable_token_indices) after the embedding's path.
TOKENS_KEY = "token_adapter.trainable_tokens_delta"


# ----------------------------------------------------------------------------------------------
# Saving: a model's LoRA adapter as (config, tensors)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoRAState:
    """One LoRA adapter of a model, ready to be written."""

    config: LoRAConfig                   # target_modules chosen to select exactly ``targets``
    targets: dict[str, LoRALinear]       # module name -> swapped module
    adapter_name: str
    tensors: dict[str, torch.Tensor]     # checkpoint key -> CPU copy
    heads: list[str]                     # module names saved whole (modules_to_save)
    head_names: list[str]                # the names they were selected by

    @property
    def fan_in_fan_out(self) -> bool:
        return all(m.fan_in_fan_out for m in self.targets.values())

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        return {
            "model": {"model_type": model_type(model), "class": model_class(model)},
            "targets": [{"module": n, "in_features": m.in_features, "out_features": m.out_features,
                         "kind": _kind(m.base_layer)} for n, m in self.targets.items()],
            "modules_to_save": list(self.heads),
        }


def has_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _one_value(values: dict[str, Any], what: str) -> Any:
    distinct: dict[Any, list[str]] = {}
    for name, v in values.items():
        distinct.setdefault(v, []).append(name)
    if len(distinct) > 1:
        detail = "; ".join(f"{v!r} on {names[:3]}{' ...' if len(names) > 3 else ''}" for v, names in distinct.items())
        raise AdapterError(f"the LoRA modules have different {what} ({detail}): a checkpoint stores one {what} "
                           "for all modules")
    return next(iter(distinct))


def _targets_spec(model: nn.Module, view: dict[str, nn.Module], names: list[str], config: Optional[LoRAConfig]):
    """(``target_modules``, (``layers_to_transform``, ``layers_pattern``)) that select exactly ``names``
    in this model: the configured ones if they still do, else PEFT's short form (the last name
    components), else the full names (both without a layer filter)."""
    candidates = []
    tm = config.target_modules if config is not None else None
    if config is not None and tm is None:
        tm = DEFAULT_TARGETS.get(model_type(model))
    layers = (config.layers_to_transform, config.layers_pattern) if config is not None else (None, None)
    if tm is not None and tm != "all-linear":
        candidates.append((tm, layers))
    candidates.append((sorted({n.rsplit(".", 1)[-1] for n in names}), (None, None)))
    for c, lay in candidates:
        if {n for n in match_targets(model, view, c) if in_layers(n, *lay)} == set(names):
            return c, lay
    return list(names), (None, None)


def _against_original_base(m: LoRALinear, adapter: str) -> tuple:
    """(A, B, r, alpha) of ``adapter`` as a plain LoRA adapter of the layer's original base weight.
    After a base-modifying init (PiSSA, OLoRA: base ``W - s B0 A0``) the trained adapter is
    ``s (B A - B0 A0)`` against W, written as rank 2r: A' = [A; A0], B' = [B, -B0], and alpha doubled
    (times sqrt(2) with rsLoRA) so the scaling stays s, as PEFT's conversion for saving does."""
    A, B = m.lora_A[adapter].weight, m.lora_B[adapter].weight
    r, alpha = m.r[adapter], m.lora_alpha[adapter]
    offset = m.init_offset(adapter)
    if offset is None:
        return A, B, r, alpha
    a0, b0 = offset
    rslora = math.isclose(m.scaling[adapter], alpha / math.sqrt(r), rel_tol=1e-6) and r != 1
    with torch.no_grad():
        A2 = torch.cat([A.detach(), a0.to(A.dtype)], 0)
        B2 = torch.cat([B.detach(), -b0.to(B.dtype)], 1)
    return A2, B2, 2 * r, alpha * (math.sqrt(2) if rslora else 2)


def _saved_init(cfg0: Optional[LoRAConfig]) -> str:
    """The init a checkpoint records: a base-modifying one is written converted (plain LoRA)."""
    if cfg0 is None or cfg0.init in BASE_MODIFYING:
        return "default"
    return cfg0.init


def _trained_token_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> the trained rows of every trainable-token embedding (ptune-rt's, or PEFT's
    wrapper in an accelerated model: both hold ``token_adapter.trainable_tokens_delta``)."""
    out = {}
    for n, m in model.named_modules():
        adapter = getattr(m, "token_adapter", None)
        deltas = getattr(adapter, "trainable_tokens_delta", None)
        if isinstance(deltas, nn.ParameterDict) and len(deltas) and getattr(adapter, "tied_adapter", None) is None:
            key = n.removeprefix("base_model.model.")
            out[f"{key}.{TOKENS_KEY}"] = next(iter(deltas.values()))
    return out


def _value_and_pattern(values: dict[str, Any]) -> tuple[Any, Optional[dict]]:
    """(the most common value, PEFT's pattern dict for the modules that differ from it: one key
    per module, its whole name escaped) of per-module ranks or alphas."""
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=counts.__getitem__)
    pattern = {re.escape(n): v for n, v in values.items() if v != common}
    return common, pattern or None


def _rslora_of(mods: dict, adapter: str, cfg0: Optional[LoRAConfig]) -> bool:
    """use_rslora as the modules' scalings say (every module alpha / r, or every one alpha / sqrt(r));
    the recorded config decides where both agree (r = 1)."""
    plain = rs = True
    for n, m in mods.items():
        r, alpha, scaling = m.r[adapter], m.lora_alpha[adapter], m.scaling[adapter]
        plain &= math.isclose(scaling, alpha / r, rel_tol=1e-6)
        rs &= math.isclose(scaling, alpha / math.sqrt(r), rel_tol=1e-6)
        if not (plain or rs):
            raise AdapterError(f"LoRA module {n!r}: scaling {scaling} is neither lora_alpha / r ({alpha / r}) nor "
                               f"lora_alpha / sqrt(r) ({alpha / math.sqrt(r)}) consistently with the other modules: "
                               "it cannot be written as a LoRA config")
    if plain and rs:
        return cfg0.use_rslora if cfg0 is not None else False
    return rs


def collect(model: nn.Module, adapter_name: Optional[str], head_names: list[str], heads_required: bool,
            config_hint: Optional[LoRAConfig] = None) -> LoRAState:
    """The LoRA adapter ``adapter_name`` (default: the active one) of ``model``, validated.

    Rank, alpha, dropout and scaling come from the modules; target_modules, bias, init and backend
    from the config ``apply`` recorded on the model, else from ``config_hint``, else defaults."""
    view = module_view(model)
    mods = {n: m for n, m in view.items() if isinstance(m, LoRALinear)}
    if not mods:
        raise AdapterError(f"{model_class(model)} has no LoRA modules: apply an adapter first "
                           "(ptune_rt.apply(model, LoRAConfig(...))) or load one (ptune_rt.load_adapter)")
    if adapter_name is None:
        adapter_name = _one_value({n: m.active_adapter for n, m in mods.items()}, "active adapters")
    lacking = [n for n, m in mods.items() if adapter_name not in m.lora_A]
    if lacking:
        raise AdapterError(f"adapter_name={adapter_name!r} is not an adapter of LoRA modules {lacking[:5]}"
                           f"{' ...' if len(lacking) > 5 else ''}")
    a = adapter_name
    adapters = {n: _against_original_base(m, a) for n, m in mods.items()}
    ranks = {n: ad[2] for n, ad in adapters.items()}
    alphas = {n: ad[3] for n, ad in adapters.items()}
    r, rank_pattern = _value_and_pattern(ranks)
    alpha, alpha_pattern = _value_and_pattern(alphas)
    dropout = _one_value({n: m.lora_dropout_p[a] for n, m in mods.items()}, "dropout rates")
    use_dora = _one_value({n: m.is_dora(a) for n, m in mods.items()}, "DoRA settings (use_dora)")
    lora_bias = _one_value({n: m.lora_bias(a) is not None for n, m in mods.items()}, "lora_bias settings")

    cfg0 = inject.model_config(model) or config_hint
    use_rslora = _rslora_of(mods, a, cfg0)
    backend = cfg0.backend if cfg0 is not None else _one_value({n: m.backend for n, m in mods.items()}, "backends")
    targets, layers = _targets_spec(model, view, list(mods), cfg0)
    try:
        config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                            trainable_token_indices=cfg0.trainable_token_indices if cfg0 is not None else None,
                            layers_to_transform=layers[0], layers_pattern=layers[1],
                            bias=cfg0.bias if cfg0 is not None else "none", use_rslora=use_rslora,
                            init=_saved_init(cfg0), backend=backend,
                            recompute_mlp=cfg0.recompute_mlp if cfg0 is not None else True,
                            group_projections=cfg0.group_projections if cfg0 is not None else True,
                            use_dora=use_dora, lora_bias=lora_bias,
                            modules_to_save=cfg0.modules_to_save if cfg0 is not None else None)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"the model's LoRA adapter cannot be described by a LoRAConfig: {e}") from e

    state = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, m in mods.items():
        key_a, key_b = type(m).CHECKPOINT_KEYS
        tensors[f"{n}.{key_a}"], tensors[f"{n}.{key_b}"] = adapters[n][:2]
        if lora_bias:
            tensors[f"{n}.lora_B.bias"] = m.lora_bias(a)
        if use_dora:
            tensors[f"{n}.{MAGNITUDE_KEY}"] = m.lora_magnitude_vector[a].weight
    tensors.update(_bias_entries(state, mods, config.bias))
    tensors.update(_trained_token_rows(model))

    if not heads_required:  # "auto": the task heads, and the modules the model trains whole
        recorded = model_state.get(model, inject.NAME)
        head_names = list(dict.fromkeys(list(head_names) + (recorded.heads if recorded is not None else [])))
    heads: list[str] = []
    for h, found in match_heads(view, head_names, dotted=True).items():
        if not found and heads_required:
            raise AdapterError(f"modules_to_save entry {h!r} matches no module of {model_class(model)}")
        heads += [n for n in found if n not in heads]
    _check_heads_vs_targets(heads, list(mods))
    for h in heads:
        tensors.update({k: t for k, t in state.items() if k.startswith(h + ".")})
    used = [h for h, found in match_heads(view, head_names, dotted=True).items() if found]

    cpu = {k: cpu_copy(t) for k, t in tensors.items()}
    return LoRAState(config=config, targets=mods, adapter_name=a, tensors=cpu, heads=heads, head_names=used)


def _bias_entries(state: dict[str, torch.Tensor], targets, bias: str) -> dict[str, torch.Tensor]:
    """Bias keys (swapped-model names) a checkpoint carries for this ``bias`` mode."""
    if bias == "all":
        return {k: t for k, t in state.items() if k == "bias" or k.endswith(".bias")}
    if bias == "lora_only":
        return {f"{n}.base_layer.bias": state[f"{n}.base_layer.bias"] for n in targets
                if f"{n}.base_layer.bias" in state}
    return {}


def _check_heads_vs_targets(heads: list[str], targets: list[str]) -> None:
    for h in heads:
        for t in targets:
            if t == h or t.startswith(h + ".") or h.startswith(t + "."):
                raise AdapterError(f"module {h!r} is both saved whole (modules_to_save) and a LoRA target or "
                                   f"inside one ({t!r}); a module can only be one of them")


def to_peft(state: LoRAState, model: nn.Module, task_type: Optional[str]) -> tuple[dict, dict]:
    """(``adapter_config.json`` contents, ``adapter_model.safetensors`` tensors) as PEFT writes them."""
    config = lora_peft_config.lora_to_peft(state.config, model, task_type, state.fan_in_fan_out, state.head_names)
    tensors = {peft_config.PEFT_KEY_PREFIX + k: t for k, t in state.tensors.items()}
    return config, tensors


# ----------------------------------------------------------------------------------------------
# Loading: a checkpoint, validated against a model, then put in
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoRASpec:
    """A LoRA checkpoint's description, whatever the file format."""

    config: LoRAConfig                  # hyper-parameters; target_modules as written in the file
    source: str                         # the config file (for messages)
    exclude_modules: Any = None         # PEFT's exclude_modules
    targets: Optional[dict[str, tuple[int, int, str]]] = None  # exact module -> (in, out, kind) (own format)
    model_type: Optional[str] = None
    model_class: Optional[str] = None
    heads: list[str] = dataclasses.field(default_factory=list)
    heads_exact: bool = False           # heads are exact module names (own format), not PEFT suffixes


def spec_from_peft(d: dict, source: str, backend: Optional[str]) -> LoRASpec:
    """A LoRASpec from PEFT's ``adapter_config.json`` dict for LORA."""
    config, exclude = lora_peft_config.read_lora_config(d, source, backend or "auto")
    return LoRASpec(config=config, source=source, exclude_modules=exclude,
                    heads=peft_config.peft_task_heads(d, source))


def tensors_from_peft(raw: dict[str, torch.Tensor], weights_file: str):
    """(tensors keyed by module path, file_key): PEFT's keys without ``base_model.model.``."""
    prefix = peft_config.PEFT_KEY_PREFIX
    bad = [k for k in raw if not k.startswith(prefix)]
    if bad:
        raise AdapterError(f"cannot load {weights_file}: keys {bad[:5]}{' ...' if len(bad) > 5 else ''} do not "
                           f"start with {prefix!r}, as every key of a PEFT LoRA checkpoint does")

    def file_key(k: str) -> str:
        return prefix + k
    return {k[len(prefix):]: t for k, t in raw.items()}, file_key


def spec_from_ptune(d: dict, source: str, backend: Optional[str]) -> LoRASpec:
    """A LoRASpec from the own format's config dict (``ptune_config.json``)."""
    config = config_from_ptune(d, source, backend, LoRAConfig, "LoRA")
    targets = {}
    entries = d.get("targets")
    if not isinstance(entries, list) or not entries:
        raise AdapterError(f"{source}: 'targets' must be a non-empty list of "
                           "{module, in_features, out_features, kind} objects")
    for e in entries:
        ok = isinstance(e, dict) and isinstance(e.get("module"), str) and e.get("kind", "linear") in _KINDS
        if not ok or any(not isinstance(e.get(k), int) or isinstance(e.get(k), bool) or e.get(k) < 1
                         for k in ("in_features", "out_features")):
            raise AdapterError(f"{source}: malformed entry in 'targets': {e!r} (expected module: a name, "
                               f"in_features / out_features: integers >= 1, kind: one of {_KINDS})")
        targets[e["module"]] = (e["in_features"], e["out_features"], e.get("kind", "linear"))
    mtype, mclass, heads = saved_model_and_heads(d, source)
    return LoRASpec(config=config, source=source, targets=targets, model_type=mtype, model_class=mclass,
                    heads=heads, heads_exact=True)


_PEFT_WRAPPER_PARTS = ("original_module.", "modules_to_save.")
_KINDS = ("linear", "conv1d", "embedding")


def _base_of(m: nn.Module) -> nn.Module:
    return m.base_layer if isinstance(m, LoRALinear) else m


def _kind(layer: nn.Module) -> str:
    """How a checkpoint names a target layer's type."""
    if isinstance(layer, nn.Embedding):
        return "embedding"
    return "linear" if isinstance(layer, nn.Linear) else "conv1d"


class LoRALoadPlan:
    """A validated load: ``execute()`` swaps in (if needed) and copies, all or nothing."""

    def __init__(self, model: nn.Module, fresh: bool, apply_config: Optional[LoRAConfig],
                 final_config: Optional[LoRAConfig], lora_copies: list[tuple[str, str, torch.Tensor]],
                 other_copies: list[tuple[torch.Tensor, torch.Tensor]], adapter_name: Optional[str],
                 add_config: Optional[LoRAConfig] = None):
        self.model, self.fresh = model, fresh
        self.apply_config, self.final_config = apply_config, final_config
        self.lora_copies, self.other_copies = lora_copies, other_copies
        self.adapter_name = adapter_name
        self.add_config = add_config  # set: the adapter is added to the model's LoRA modules

    def execute(self) -> nn.Module:
        model = self.model
        grads = [(p, p.requires_grad) for p in model.parameters()]
        prior = model_state.get(model, inject.NAME)
        prior_config = prior.config if prior is not None else None
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        added: list[LoRALinear] = []
        try:
            if self.fresh:
                inject.apply_lora(model, self.apply_config)
            if self.add_config is not None:
                c = self.add_config
                for module in dict.fromkeys(n for n, which, _ in self.lora_copies if which != "T"):
                    m = model.get_submodule(module)
                    m.add_adapter(self.adapter_name, c.rank_for(module), c.alpha_for(module), c.dropout,
                                  c.use_rslora, init="zeros", use_dora=c.use_dora, lora_bias=c.lora_bias)
                    added.append(m)
                    for layer in _adapter_modules(m, self.adapter_name):
                        layer.requires_grad_(False)  # inactive until ptune_rt.set_adapter (as in PEFT)
            copies = list(self.other_copies)
            for module, which, src in self.lora_copies:
                m = model.get_submodule(module)
                if which == "T":
                    copies.append((m.token_adapter.delta, src))
                    continue
                name = self.adapter_name or m.active_adapter
                holder = {"A": m.lora_A, "B": m.lora_B, "b": m.lora_B, "M": m.lora_magnitude_vector}[which]
                copies.append((holder[name].bias if which == "b" else holder[name].weight, src))
            with torch.no_grad():
                backups = [(dst, dst.detach().clone()) for dst, _ in copies]
                for dst, src in copies:
                    dst.copy_(src)
            self._freeze_b_where_the_init_says()
            if self.fresh:
                inject.set_model_config(model, self.final_config)
        except BaseException:
            with torch.no_grad():
                for dst, old in backups:
                    dst.copy_(old)
            for m in added:
                m.delete_adapter(self.adapter_name)
            if self.fresh and has_adapter(model):  # every LoRA module there is came from this call
                restore_lora(model)
            for p, flag in grads:
                p.requires_grad_(flag)
            if prior is not None:
                prior.config = prior_config
            elif model_state.get(model, inject.NAME) is not None:
                model_state.forget(model, inject.NAME)
            raise
        return model

    def _freeze_b_where_the_init_says(self) -> None:
        """A checkpoint of an init whose B stays frozen (MiCA) loads with B frozen, as PEFT does."""
        config = self.final_config if self.fresh else self.add_config
        if config is None or config.init not in FROZEN_B:
            return
        for module in dict.fromkeys(n for n, which, _ in self.lora_copies if which != "T"):
            m = self.model.get_submodule(module)
            m.freeze_b(self.adapter_name or m.active_adapter)


def _adapter_modules(m: LoRALinear, name: str) -> list[nn.Module]:
    """The modules holding adapter ``name``'s parameters in ``m``."""
    return [d[name] for d in (m.lora_A, m.lora_B, m.lora_magnitude_vector) if name in d]


@dataclasses.dataclass
class _LoadTarget:
    """What ``plan_load`` checks a checkpoint against: the model, its module view, its LoRA modules."""

    model: nn.Module
    view: dict
    existing: dict  # name -> LoRALinear already in the model
    spec: LoRASpec

    @property
    def fresh(self) -> bool:
        return not self.existing

    @property
    def cls(self) -> str:
        return model_class(self.model)

    @functools.cached_property
    def heads_found(self) -> dict:
        """The checkpoint's whole modules (modules_to_save) -> the model's modules they name."""
        return match_heads(self.view, self.spec.heads, dotted=self.spec.heads_exact)


def plan_load(model: nn.Module, spec: LoRASpec, tensors: dict[str, torch.Tensor], *, adapter_name: Optional[str],
              file_key: Callable[[str], str], weights_file: str, hint=None) -> LoRALoadPlan:
    """Check ``tensors`` (module-path keys) and ``spec`` against ``model``; raise AdapterError
    listing every problem, or return the plan that loads them."""
    view = module_view(model)
    t = _LoadTarget(model, view, {n: m for n, m in view.items() if isinstance(m, LoRALinear)}, spec)
    names = _target_names(t)
    shapes, problems = _check_target_layers(t, names)
    add, more = _check_adapter_name(t, names, adapter_name)
    raise_problems(f"cannot load the adapter of {spec.source} into this {t.cls}:", problems + more)
    lora_keys, destinations, artifacts = _expected_keys(t, names, shapes, tensors)
    expected = {k: _lora_shape(which, shapes[n], spec.config.rank_for(n)) for k, (n, which) in lora_keys.items()
                if which != "T"}
    expected.update(_token_shapes(t, names, lora_keys))
    expected.update({k: tuple(d.shape) for k, d in destinations.items()})
    problems = _check_tensors(t, names, tensors, expected, artifacts, lora_keys, shapes, file_key)
    raise_problems(f"cannot load {weights_file} into this {t.cls}:", problems)
    apply_config, final_config = _fresh_configs(t, names) if t.fresh else (None, None)
    return LoRALoadPlan(model, t.fresh, apply_config, final_config,
                        [(n, which, tensors[k]) for k, (n, which) in lora_keys.items()],
                        [(dst, tensors[k]) for k, dst in destinations.items()], adapter_name,
                        spec.config if add else None)


def _lora_shape(which: str, in_out: tuple[int, int], r: int) -> tuple:
    """The shape of a target's lora_A ("A"), lora_B ("B") or DoRA magnitude ("M") tensor."""
    in_f, out_f = in_out
    return {"A": (r, in_f), "B": (out_f, r), "M": (out_f,), "b": (out_f,)}[which]


def _target_names(t: _LoadTarget) -> list[str]:
    """The modules the adapter targets in this model; raises when it was made for another base model."""
    spec, mtype = t.spec, model_type(t.model)
    if spec.model_type is not None and mtype is not None and spec.model_type != mtype:
        raise AdapterError(f"{spec.source}: the adapter was saved for model_type {spec.model_type!r} "
                           f"({spec.model_class}), this model is {mtype!r} ({t.cls})")
    if spec.targets is not None:
        names = list(spec.targets)
        absent = [n for n in names if n not in t.view]
        if absent:
            raise AdapterError(f"{spec.source}: target modules {absent[:5]}{' ...' if len(absent) > 5 else ''} "
                               f"do not exist in this {t.cls}: the adapter was made for another base model")
        return names
    tm = spec.config.target_modules
    if tm is None:
        tm = DEFAULT_TARGETS.get(mtype)
        if tm is None:
            raise AdapterError(f"{spec.source}: target_modules is null and model type {mtype!r} has no default "
                               "targets")
    names = [n for n in match_targets(t.model, t.view, tm, spec.exclude_modules)
             if in_layers(n, spec.config.layers_to_transform, spec.config.layers_pattern)]
    if not names:
        raise AdapterError(f"{spec.source}: target_modules={tm!r} match no module of this {t.cls} "
                           f"(model_type {mtype!r}): the adapter was made for another base model")
    return names


def _check_target_layers(t: _LoadTarget, names: list[str]) -> tuple[dict, list[str]]:
    """({name: (in_features, out_features)}, problems) of the target layers against the adapter."""
    cfg, problems, shapes = t.spec.config, [], {}
    for n in names:
        m = t.view[n]
        if isinstance(m, LoRALinear):
            base = m.base_layer
        elif t.fresh and (is_linear_like(m) or isinstance(m, nn.Embedding)):
            base = m
        elif t.fresh:
            kind = f"{type(m).__module__}.{type(m).__qualname__}"
            why = (" (a PEFT layer: run ptune_rt.accelerate(peft_model) first, or load with PEFT)"
                   if kind.startswith("peft.") else "")
            problems.append(f"target module {n!r} is a {kind}{why}; ptune_rt's LoRA targets nn.Linear and GPT-2 "
                            "Conv1D layers")
            continue
        else:
            problems.append(f"target module {n!r} has no LoRA adapter, but this model already carries LoRA "
                            f"modules ({sorted(t.existing)[:3]} ...): the adapter does not match them; "
                            "ptune_rt.restore(model) first to load it fresh")
            continue
        in_f, out_f = lora_target_shape(base)
        shapes[n] = (in_f, out_f)
        kind = _kind(base)
        if t.spec.targets is not None:
            want_in, want_out, want_kind = t.spec.targets[n]
            if (want_in, want_out) != (in_f, out_f) or want_kind != kind:
                problems.append(f"module {n!r}: adapter expects a {want_kind} layer with in_features={want_in}, "
                                f"out_features={want_out}; this model has a {kind} layer with in_features={in_f}, "
                                f"out_features={out_f}")
        if cfg.rank_for(n) > min(in_f, out_f):
            problems.append(f"module {n!r}: rank r={cfg.rank_for(n)} exceeds min(in_features={in_f}, "
                            f"out_features={out_f})")
    return shapes, problems


def _check_adapter_name(t: _LoadTarget, names: list[str], adapter_name: Optional[str]) -> tuple[bool, list[str]]:
    """(whether the load adds ``adapter_name`` beside the model's adapters, problems). A name no LoRA
    module holds yet adds an adapter (same modules, its own rank, alpha and dropout); a name some
    modules hold and others do not is an inconsistent model."""
    cfg, existing, problems = t.spec.config, t.existing, []
    if t.fresh:
        if adapter_name not in (None, "default"):
            problems.append(f"adapter_name={adapter_name!r}: a model without LoRA modules gets the adapter 'default'")
        return False, problems
    holders = [n for n, m in existing.items() if adapter_name in m.lora_A] if adapter_name is not None else []
    add = adapter_name is not None and not holders
    if adapter_name is not None and 0 < len(holders) < len(existing):
        problems.append(f"adapter_name={adapter_name!r} is an adapter of LoRA modules {holders[:3]} but not of "
                        f"{sorted(set(existing) - set(holders))[:3]}")
    if add:
        problems += _cannot_add(t, adapter_name)
    extra = sorted(set(existing) - set(names))
    if extra:
        problems.append(f"this model's LoRA modules {extra[:5]}{' ...' if len(extra) > 5 else ''} are not in the "
                        "adapter; ptune_rt.restore(model) first to load it fresh")
    for n in names:
        m = existing.get(n)
        if m is None or add:
            continue
        a = adapter_name or m.active_adapter
        if a not in m.lora_A:
            problems.append(f"module {n!r} has no adapter named {a!r} (it has {sorted(m.lora_A.keys())})")
        elif m.merged:
            problems.append(f"module {n!r} has its adapter merged into the base weight: unmerge it before "
                            "loading new adapter weights")
        elif (m.lora_bias(a) is not None) != cfg.lora_bias:
            problems.append(f"module {n!r}: the model's adapter has lora_bias={m.lora_bias(a) is not None}, the "
                            f"checkpoint lora_bias={cfg.lora_bias}")
        elif m.is_dora(a) != cfg.use_dora:
            problems.append(f"module {n!r}: the model's adapter has use_dora={m.is_dora(a)}, the checkpoint "
                            f"use_dora={cfg.use_dora}")
        elif m.r[a] != cfg.rank_for(n):
            problems.append(f"module {n!r}: the model's adapter has rank r={m.r[a]}, the checkpoint "
                            f"r={cfg.rank_for(n)}")
        elif not math.isclose(m.scaling[a], cfg.scaling_for(n), rel_tol=1e-6):
            problems.append(f"module {n!r}: the model's adapter has scaling {m.scaling[a]}, the checkpoint "
                            f"{cfg.scaling_for(n)} (lora_alpha={cfg.alpha_for(n)}, r={cfg.rank_for(n)}, "
                            f"use_rslora={cfg.use_rslora})")
    return add, problems


def _cannot_add(t: _LoadTarget, adapter_name: str) -> list[str]:
    """Why the checkpoint cannot become another adapter beside the model's (empty: it can)."""
    problems = []
    peft_layers = [n for n, m in t.existing.items() if m.__dict__.get(SOURCE_ATTR) == "peft"]
    if peft_layers:
        problems.append(f"adapter_name={adapter_name!r}: this model's LoRA layers come from a PEFT model "
                        f"({peft_layers[:3]} ...), which keeps its own adapter registry; add adapters with "
                        "PEFT's load_adapter before ptune_rt.accelerate, or ptune_rt.restore(model) first")
    if t.spec.config.trainable_token_indices is not None:
        problems.append(f"trainable_token_indices: the checkpoint trains embedding rows, which every adapter of this "
                        f"model shares; an added adapter (adapter_name={adapter_name!r}) cannot replace them (load it "
                        "into a model of its own)")
    if t.spec.config.bias != "none":
        problems.append(f"bias={t.spec.config.bias!r}: the checkpoint trains the base layers' biases, which every "
                        f"adapter of this model shares; an added adapter (adapter_name={adapter_name!r}) must have "
                        "bias='none' (load it into a model of its own)")
    if t.spec.heads and any(t.heads_found.values()):
        problems.append(f"the checkpoint saves whole modules (modules_to_save={list(t.spec.heads)}), which every "
                        f"adapter of this model shares; an added adapter (adapter_name={adapter_name!r}) cannot "
                        "replace them (load it into a model of its own)")
    return problems


def _expected_keys(t: _LoadTarget, names: list[str], shapes: dict, tensors: dict):
    """(LoRA key -> (module, "A" / "B"), other key -> the model tensor it loads into, PEFT wrapper
    keys to ignore): LoRA weights, biases, whole heads."""
    lora_keys = {}
    for n in names:
        m = t.view[n]
        key_a, key_b = (type(m) if isinstance(m, LoRALinear) else inject.lora_class(m)).CHECKPOINT_KEYS
        lora_keys[f"{n}.{key_a}"] = (n, "A")
        lora_keys[f"{n}.{key_b}"] = (n, "B")
        if t.spec.config.use_dora:
            lora_keys[f"{n}.{MAGNITUDE_KEY}"] = (n, "M")
        if t.spec.config.lora_bias:
            lora_keys[f"{n}.lora_B.bias"] = (n, "b")
    for name in _token_names(t, names):
        lora_keys[f"{name}.{TOKENS_KEY}"] = (name, "T")
    state = _swapped_state(t.model, names if t.fresh else [])
    destinations = dict(_bias_entries(state, names, t.spec.config.bias))
    for n in names:  # PEFT saves the table of an embedding it adapts (save_embedding_layers): it loads in
        k = f"{n}.base_layer.weight"
        if k in tensors and isinstance(_base_of(t.view[n]), nn.Embedding):
            destinations[k] = state[k]
    heads: list[str] = []
    for found in t.heads_found.values():
        heads += [n for n in found if n not in heads]
    artifacts = set()
    for h in heads:
        in_file = [k for k in tensors if k.startswith(h + ".")]
        artifacts |= {k for k in in_file if k[len(h) + 1:].startswith(_PEFT_WRAPPER_PARTS)}
        # A PEFT head absent from the file keeps the model's own head (as in PEFT); a partly present one is an error.
        if t.spec.heads_exact or len(in_file) > len(artifacts & set(in_file)):
            destinations.update({k: v for k, v in state.items() if k.startswith(h + ".")})
    return lora_keys, destinations, artifacts


def _token_names(t: _LoadTarget, names: list[str]) -> list[str]:
    """The embeddings whose trained rows the checkpoint holds (its trainable_token_indices)."""
    indices = t.spec.config.trainable_token_indices
    if indices is None:
        return []
    if not t.fresh:
        return [n for n, m in t.view.items() if isinstance(m, TrainableTokensEmbedding)]
    try:
        return [name for name, _, _ in inject.token_modules(t.model, indices, names)]
    except ValueError as e:
        raise AdapterError(f"{t.spec.source}: {e}") from None


def _token_shapes(t: _LoadTarget, names: list[str], lora_keys: dict) -> dict:
    indices = t.spec.config.trainable_token_indices
    out = {}
    for k, (n, which) in lora_keys.items():
        if which == "T":
            ids = indices[next(key for key in indices if module_matches(n, [key]))] if isinstance(indices, dict) \
                else indices
            table = getattr(t.view[n], "base_layer", t.view[n])  # the embedding, or the trainable-token wrapper's
            out[k] = (len(ids), table.embedding_dim)
    return out


def _check_tensors(t: _LoadTarget, names, tensors, expected, artifacts, lora_keys, shapes, file_key) -> list[str]:
    """Heads, missing / unexpected keys, shapes, dtypes and finiteness of the checkpoint's tensors."""
    spec, problems = t.spec, []
    heads = []
    for h, found in t.heads_found.items():
        if not found and spec.heads_exact:
            problems.append(f"module {h!r} (modules_to_save) does not exist in this {t.cls}")
        heads += [n for n in found if n not in heads]
    try:
        _check_heads_vs_targets(heads, names)
    except AdapterError as e:
        problems.append(str(e))
    for k in expected:
        if k not in tensors:
            problems.append(f"missing key {file_key(k)!r} (expected shape {shape_str(expected[k])})")
    for k in tensors:
        if k not in expected and k not in artifacts:
            problems.append(f"unexpected key {file_key(k)!r}{_why_unexpected(k, t.view, names, spec.config.bias)}")
    for k, want in expected.items():
        if k in tensors:
            problem = tensor_problem(file_key(k), tensors[k], want, _shape_reason(k, lora_keys, shapes, spec.config))
            if problem:
                problems.append(problem)
    return problems


def _fresh_configs(t: _LoadTarget, names: list[str]) -> tuple[LoRAConfig, LoRAConfig]:
    """(the config that swaps in exactly ``names`` with zero adapters, the config the model records).
    The checkpoint's whole modules (modules_to_save) train next to the adapter, as in PEFT: they
    become the config's modules_to_save (without any, a task model's head is picked as by apply)."""
    cfg = t.spec.config
    heads = [n for found in t.heads_found.values() for n in found]
    if heads and not t.spec.heads_exact:  # PEFT's file: its modules_to_save train (the own format's config says)
        cfg = dataclasses.replace(cfg, modules_to_save=list(dict.fromkeys(heads)))
    apply_config = dataclasses.replace(cfg, target_modules=exact_regex(names), layers_to_transform=None,
                                       layers_pattern=None, init="zeros")
    nice = cfg.target_modules
    if t.spec.targets is None and (t.spec.exclude_modules or nice is None):
        nice = list(names)
    return apply_config, dataclasses.replace(cfg, target_modules=nice)


def _swapped_state(model: nn.Module, to_swap: list[str]) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` with the keys it will have once ``to_swap`` are swapped
    (``t.bias`` -> ``t.base_layer.bias``); the tensors are the very objects that stay in place."""
    prefixes = tuple(n + "." for n in to_swap)
    out = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if prefixes and k.startswith(prefixes):
            n = next(p for p in prefixes if k.startswith(p))
            k = f"{n}base_layer.{k[len(n):]}"
        out[k] = t
    return out


def _shape_reason(key: str, lora_keys, shapes, config: LoRAConfig) -> str:
    if key in lora_keys:
        n, which = lora_keys[key]
        if which == "T":
            return f"(the trained rows of {n!r}: one per token of trainable_token_indices)"
        r = config.rank_for(n)
        in_f, out_f = shapes[n]
        return {"A": f"(r={r}, in_features={in_f} of {n!r})", "B": f"(out_features={out_f} of {n!r}, r={r})",
                "M": f"(the DoRA magnitude: out_features={out_f} of {n!r})",
                "b": f"(the lora_bias: out_features={out_f} of {n!r})"}[which]
    return "(this model's tensor)"


def _why_unexpected(key: str, view, names, bias: str) -> str:
    if key.endswith(".lora_B.bias"):
        return " (a lora_bias, but the adapter config says lora_bias=false)"
    for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
        if part in key:
            module = key.split(part)[0]
            if module not in view:
                return f" (there is no module {module!r} in this model: adapter made for another base model?)"
            return f" (module {module!r} is not selected by the adapter's target_modules)"
    if MAGNITUDE_KEY in key:
        return " (a DoRA magnitude, but the adapter config says use_dora=false)"
    if key.endswith(".bias") and bias != "all":
        return f" (a bias, but the adapter config says bias={bias!r})"
    module = key.rsplit(".", 1)[0]
    if module and module not in view and module.replace(".base_layer", "") not in view:
        return f" (there is no module {module!r} in this model)"
    return ""


def hint_from_peft(peft_config, adapter_name: str, source: str) -> Optional[LoRAConfig]:
    """The LoRAConfig of a PEFT model's LoRA adapter (None where ptune_rt's LoRA cannot express it):
    ``collect`` takes what the modules do not say (e.g. rsLoRA when both scalings agree) from it."""
    if not hasattr(peft_config, "to_dict"):
        return None
    d = {k: (v.value if hasattr(v, "value") else v) for k, v in peft_config.to_dict().items()}
    try:
        return lora_peft_config.read_lora_config(d, source, "auto")[0]
    except AdapterError:
        return None
