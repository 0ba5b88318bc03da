"""Prefix-tuning / P-tuning v2 checkpoints: what a model's prefix is on disk, and how it goes back in.

PEFT's layout (``format="peft"``), as PEFT 0.21.2's ``save_pretrained`` writes it for a
``PrefixTuningConfig``::

    adapter_config.json        peft_type "PREFIX_TUNING", num_virtual_tokens P, num_layers L,
                               num_attention_heads Hkv (kv heads: PEFT's GQA rule), token_dim Hkv*D,
                               num_transformer_submodules 1, encoder_hidden_size, prefix_projection,
                               inference_mode true, task_type, modules_to_save ...
    adapter_model.safetensors  prompt_embeddings [P, 2*L*Hkv*D]  (layer l: keys view(P, 2L, Hkv, D)[:, 2l],
                                                                  values [:, 2l+1])
                               base_model.<head>.<param>          (modules_to_save, e.g. a classifier)

With ``prefix_projection`` PEFT saves the projected prefix ``transform(embedding.weight)``, not the
MLP, and keeps ``prefix_projection: true`` in the config; PEFT loads such a file in inference mode
as a plain prefix. So does this module: a PEFT checkpoint always loads as a prefix without
projection (a model whose prefix has a projection cannot take one).

The own layout (``format="ptune"``) keeps the encoder's parameters as they are (the MLP too, so
training can resume; task-stacked ``[T, ...]`` with ``num_tasks=T > 1``, which PEFT's layout cannot
hold) under ``prompt_encoder.<name>``, next to the ``PrefixConfig`` and a fingerprint of the base
model (model type, layers, kv heads, head size, P).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from ptune_rt.io import peft_config
from ptune_rt.io.common import (ENCODER_PREFIX, PROMPT_KEY, AdapterError, PromptLearningCheckpoint,
                                PromptLearningLoadPlan, check_loaded_tensors, collect_prompt_heads, config_from_ptune,
                                cpu_copy, flat_tensors_from_peft, int_field, model_class, model_type,
                                prompt_head_destinations, raise_problems, saved_model_and_heads, shape_str,
                                with_checkpoint_heads)
from ptune_rt.methods.prefix import inject
from ptune_rt.methods.prefix.config import PrefixConfig
from ptune_rt.targets import module_view

METHOD = "prefix"
PEFT_TYPE = "PREFIX_TUNING"
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Layout:
    """The prefix split ``[P, 2 * L * Hkv * D]``."""

    P: int
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def split(self) -> str:
        return (f"[P, 2*L*Hkv*D] = [{self.P}, 2*{self.layers}*{self.kv_heads}*{self.head_dim}] = "
                f"[{self.P}, {self.width}]")


def _model_layout(model: nn.Module, P: int) -> Layout:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise AdapterError(f"{model_class(model)} has no transformers config: prefix tuning needs a transformers "
                           "PreTrainedModel")
    try:
        layers, kv_heads, head_dim = inject._model_dims(cfg)
    except ValueError as e:
        raise AdapterError(f"{model_class(model)}: {e}") from None
    return Layout(P, layers, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class PrefixCheckpoint(PromptLearningCheckpoint):
    """A model's prefix, ready to be written. ``prompt_embeddings``: E [P, 2*L*Hkv*D] (projected if
    there is an MLP; [T, P, ...] for T tasks)."""

    config: PrefixConfig
    layout: Layout
    hidden: Optional[int]                       # the MLP's width with projection

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        lay = self.layout
        return {
            "model": {"model_type": model_type(model), "class": model_class(model)},
            "prefix": {"num_virtual_tokens": lay.P, "num_layers": lay.layers, "num_kv_heads": lay.kv_heads,
                       "head_dim": lay.head_dim, "prefix_projection": self.config.prefix_projection,
                       "encoder_hidden_size": self.hidden},
            "modules_to_save": list(self.heads),
        }


def has_adapter(model: nn.Module) -> bool:
    return inject.has_prefix(model)


def _num_tasks(enc: nn.Module) -> int:
    return int(getattr(enc, "num_tasks", 1))


def _mlp_hidden(enc: nn.Module) -> Optional[int]:
    """The projection MLP's width (None without one); task-stacked linears have weight [T, out, in]."""
    return int(enc.transform[0].weight.shape[-2]) if enc.prefix_projection else None


def collect(model: nn.Module, adapter_name: Optional[str], head_names: list[str], heads_required: bool,
            hint: Optional[str] = None) -> PrefixCheckpoint:
    """The prefix of ``model`` (and its heads), validated. ``hint``: the adapter name of the PEFT
    model the prefix came from (``ptune_rt.accelerate``), also accepted as ``adapter_name``."""
    if adapter_name not in (None, inject.ADAPTER_NAME, hint):
        raise AdapterError(f"adapter_name={adapter_name!r}: a prefix has one adapter "
                           f"({hint or inject.ADAPTER_NAME!r}); pass None")
    state = inject.prefix_state(model)
    enc = state.encoder
    layout = Layout(enc.num_virtual_tokens, enc.num_layers, enc.num_kv_heads, enc.head_dim)
    hidden = _mlp_hidden(enc)
    with torch.no_grad():
        w = enc.embedding.weight
        e = enc.transform(w) if enc.prefix_projection else w
        prompt = cpu_copy(e)
    T = _num_tasks(enc)
    if tuple(prompt.shape) != (T,) * (T > 1) + (layout.P, layout.width):  # pragma: no cover - the encoder's own
        raise AdapterError(f"the prefix encoder produces {shape_str(prompt.shape)}, expected {layout.split()}"
                           f"{f' for each of {T} tasks' if T > 1 else ''}")

    if not heads_required and state.config is not None:  # "auto": task heads and modules trained whole
        head_names = list(dict.fromkeys(list(head_names) + inject.trained_head_modules(model, state.config)))
    heads, used, head_tensors = collect_prompt_heads(model, module_view(model), head_names, heads_required)
    config = dataclasses.replace(state.config, encoder_hidden_size=hidden)
    return PrefixCheckpoint(config=config, layout=layout, hidden=hidden,
                            encoder_tensors=PrefixCheckpoint.encoder_copies(enc), prompt_embeddings=prompt,
                            heads=heads, head_names=used, head_tensors=head_tensors)


def to_peft(state: PrefixCheckpoint, model: nn.Module, task_type: Optional[str]) -> tuple[dict, dict]:
    """(``adapter_config.json`` contents, ``adapter_model.safetensors`` tensors) as PEFT writes them."""
    if state.config.position_mode != "shift":
        raise AdapterError(f"the prefix numbers positions with position_mode={state.config.position_mode!r}, which "
                           "PEFT's prefix tuning cannot express (PEFT numbers the real tokens after the prefix); "
                           "save it with format='ptune'")
    if state.prompt_embeddings.dim() == 3:
        raise AdapterError(f"the prefix holds num_tasks={state.prompt_embeddings.shape[0]} task prefixes, but PEFT's "
                           "PREFIX_TUNING holds one prefix per adapter, so it cannot be written in PEFT's layout; save "
                           "it with format='ptune'")
    lay = state.layout
    return peft_config.peft_prompt_learning_export(
        model, PEFT_TYPE, task_type, num_virtual_tokens=lay.P, token_dim=lay.token_dim,
        num_attention_heads=lay.kv_heads, num_layers=lay.layers, head_names=state.head_names,
        prompt_embeddings=state.prompt_embeddings, head_tensors=state.head_tensors,
        encoder_hidden_size=state.hidden if state.hidden is not None else lay.token_dim,
        prefix_projection=bool(state.config.prefix_projection), init_weights=None)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrefixSpec:
    """A prefix checkpoint's description, whatever the file format."""

    source: str                          # the config file (for messages)
    config: PrefixConfig                 # what a model without a prefix gets
    flat: bool                           # PEFT's layout: one prompt_embeddings tensor, no MLP
    layout: Optional[Layout] = None      # the split the config declares (None: not declared)
    layout_fields: str = ""              # how the config declares it (for messages)
    hidden: Optional[int] = None         # MLP width (own format with projection)
    model_type: Optional[str] = None
    model_class: Optional[str] = None
    heads: list[str] = dataclasses.field(default_factory=list)
    heads_exact: bool = False            # heads are exact module names (own format), not PEFT suffixes


def spec_from_peft(d: dict, source: str, backend: Optional[str]) -> PrefixSpec:
    """A PrefixSpec from PEFT's ``adapter_config.json`` dict for PREFIX_TUNING."""
    P = int_field(d, "num_virtual_tokens", source)
    submodules = d.get("num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise AdapterError(f"{source}: num_transformer_submodules={submodules!r} (an encoder-decoder prefix) is not "
                           "supported; expected 1")
    layers = int_field(d, "num_layers", source, required=False)
    heads = int_field(d, "num_attention_heads", source, required=False)
    token_dim = int_field(d, "token_dim", source, required=False)
    layout = None
    fields = f"num_layers={layers}, num_attention_heads={heads}, token_dim={token_dim}"
    if None not in (layers, heads, token_dim):
        if token_dim % heads:
            raise AdapterError(f"{source}: token_dim={token_dim} is not a multiple of num_attention_heads={heads}")
        layout = Layout(P, layers, heads, token_dim // heads)
    projection = d.get("prefix_projection", False)
    if not isinstance(projection, bool):
        raise AdapterError(f"{source}: 'prefix_projection' must be true or false, got {projection!r}")
    task = d.get("task_type")
    if task is not None and task not in peft_config.TASK_TYPES:
        raise AdapterError(f"{source}: task_type {task!r} is not one of {peft_config.TASK_TYPES}")
    try:
        config = PrefixConfig(P, prefix_projection=False, position_mode="shift", backend=backend or "auto")
    except ValueError as e:
        raise AdapterError(f"{source}: {e}") from None
    return PrefixSpec(source=source, config=config, flat=True, layout=layout, layout_fields=fields,
                      heads=peft_config.peft_task_heads(d, source))


def tensors_from_peft(raw: dict[str, torch.Tensor], weights_file: str):
    """(tensors keyed as ``plan_load`` expects, file_key): ``prompt_embeddings`` stays, heads lose
    PEFT's ``base_model.``."""
    return flat_tensors_from_peft(raw, weights_file, "prefix-tuning")


def spec_from_ptune(d: dict, source: str, backend: Optional[str]) -> PrefixSpec:
    """A PrefixSpec from the own format's ``ptune_config.json`` dict."""
    config = config_from_ptune(d, source, backend, PrefixConfig, "prefix")
    fp = d.get("prefix")
    if not isinstance(fp, dict):
        raise AdapterError(f"{source}: 'prefix' must be an object {{num_virtual_tokens, num_layers, num_kv_heads, "
                           f"head_dim, prefix_projection, encoder_hidden_size}}, got {fp!r}")
    where = f"{source}: prefix"
    layout = Layout(int_field(fp, "num_virtual_tokens", where), int_field(fp, "num_layers", where),
                    int_field(fp, "num_kv_heads", where), int_field(fp, "head_dim", where))
    if layout.P != config.num_virtual_tokens:
        raise AdapterError(f"{source}: prefix.num_virtual_tokens={layout.P} but config.num_virtual_tokens="
                           f"{config.num_virtual_tokens}")
    if fp.get("prefix_projection", config.prefix_projection) != config.prefix_projection:
        raise AdapterError(f"{source}: prefix.prefix_projection={fp.get('prefix_projection')!r} but "
                           f"config.prefix_projection={config.prefix_projection!r}")
    hidden = int_field(fp, "encoder_hidden_size", where, required=config.prefix_projection)
    mtype, mclass, heads = saved_model_and_heads(d, source)
    fields = (f"num_layers={layout.layers}, num_kv_heads={layout.kv_heads}, head_dim={layout.head_dim} in "
              "its fingerprint")
    return PrefixSpec(source=source, config=config, flat=False, layout=layout, layout_fields=fields,
                      hidden=hidden if config.prefix_projection else None, model_type=mtype,
                      model_class=mclass, heads=heads, heads_exact=True)


def _layout_problem(spec: PrefixSpec, want: Layout, cls: str, existing: bool) -> Optional[str]:
    got = spec.layout
    if got is None or (got.layers, got.kv_heads, got.head_dim) == (want.layers, want.kv_heads, want.head_dim):
        return None
    diffs = [f"{what} {a} here vs {b} in the checkpoint" for what, a, b in
             (("layers", want.layers, got.layers), ("kv heads", want.kv_heads, got.kv_heads),
              ("head_dim", want.head_dim, got.head_dim)) if a != b]
    whose = "this model's prefix" if existing else f"this {cls}"
    return (f"the checkpoint's prefix is split {got.split()} ({spec.layout_fields}), but {whose} needs "
            f"{want.split()} ({'; '.join(diffs)}): the adapter was made for another base model")


def plan_load(model: nn.Module, spec: PrefixSpec, tensors: dict[str, torch.Tensor], *, adapter_name: Optional[str],
              file_key: Callable[[str], str], weights_file: str, hint: Optional[str] = None) -> PromptLearningLoadPlan:
    """Check ``tensors`` and ``spec`` against ``model``; raise AdapterError naming every problem, or
    return the plan that loads them. ``hint``: the adapter name of the accelerated PEFT model the
    prefix belongs to, which ``adapter_name`` may give (it has one prefix)."""
    if adapter_name is not None and adapter_name == hint:
        adapter_name = None
    cls = model_class(model)
    header = f"cannot load the prefix of {spec.source} into this {cls}:"
    if adapter_name not in (None, inject.ADAPTER_NAME):
        raise AdapterError(f"{header} adapter_name={adapter_name!r}: a prefix has one adapter; pass None")
    mtype = model_type(model)
    if spec.model_type is not None and mtype is not None and spec.model_type != mtype:
        raise AdapterError(f"{spec.source}: the adapter was saved for model_type {spec.model_type!r} "
                           f"({spec.model_class}), this model is {mtype!r} ({cls})")
    P = spec.config.num_virtual_tokens
    T = int(getattr(spec.config, "num_tasks", 1))
    existing = inject.prefix_state(model) if inject.has_prefix(model) else None

    problems: list[str] = []
    if existing is not None:
        enc = existing.encoder
        want = Layout(enc.num_virtual_tokens, enc.num_layers, enc.num_kv_heads, enc.head_dim)
        hidden = _mlp_hidden(enc)
        if want.P != P:
            problems.append(f"the checkpoint has num_virtual_tokens={P}, the model's prefix has {want.P}; "
                            "ptune_rt.restore(model) first to load it fresh")
        if _num_tasks(enc) != T:
            problems.append(f"the checkpoint has num_tasks={T}, the model's prefix has {_num_tasks(enc)}; "
                            "ptune_rt.restore(model) first to load it fresh")
        if spec.flat and enc.prefix_projection:
            problems.append("the checkpoint holds the prefix itself (PEFT's prompt_embeddings), but the model's "
                            "prefix is computed by an MLP (prefix_projection=True); ptune_rt.restore(model) first to "
                            "load it as a plain prefix")
        elif not spec.flat and spec.config.prefix_projection != enc.prefix_projection:
            problems.append(f"the checkpoint has prefix_projection={spec.config.prefix_projection}, the model's "
                            f"prefix {enc.prefix_projection}; ptune_rt.restore(model) first to load it fresh")
        elif not spec.flat and spec.hidden != hidden:
            problems.append(f"the checkpoint's MLP has encoder_hidden_size={spec.hidden}, the model's {hidden}")
        if spec.config.position_mode != existing.config.position_mode:
            problems.append(f"the checkpoint numbers positions with position_mode={spec.config.position_mode!r}, the "
                            f"model's prefix with {existing.config.position_mode!r}; ptune_rt.restore(model) first to "
                            "load it fresh")
        want = dataclasses.replace(want, P=P)
    else:
        want = _model_layout(model, P)
        hidden = spec.hidden
    layout_problem = _layout_problem(spec, want, cls, existing is not None)
    if layout_problem:
        problems.insert(0, layout_problem)
    raise_problems(header, problems)

    # The keys: the prefix (PEFT) or the encoder's parameters (own format), and whole heads.
    expected: dict[str, tuple[int, ...]] = {}
    why: dict[str, str] = {}
    encoder_keys: dict[str, str] = {}
    if spec.flat:
        expected[PROMPT_KEY] = (P, want.width)
        why[PROMPT_KEY] = want.split()
        encoder_keys[PROMPT_KEY] = "embedding.weight"
    else:
        if spec.config.prefix_projection:
            shapes = {"embedding.weight": (P, want.token_dim), "transform.0.weight": (hidden, want.token_dim),
                      "transform.0.bias": (hidden,), "transform.2.weight": (want.width, hidden),
                      "transform.2.bias": (want.width,)}
        else:
            shapes = {"embedding.weight": (P, want.width)}
        for name, shape in shapes.items():
            expected[ENCODER_PREFIX + name] = (T,) * (T > 1) + shape  # task-stacked parameters: [T, ...]
            why[ENCODER_PREFIX + name] = (f"({f'{T} tasks of ' if T > 1 else ''}{want.split()}"
                                          f"{f', encoder_hidden_size={hidden}' if hidden else ''})")
            encoder_keys[ENCODER_PREFIX + name] = name

    view = module_view(model)
    destinations = prompt_head_destinations(view, spec.heads, spec.heads_exact, tensors, cls, problems)
    for k, t in destinations.items():
        expected[k] = tuple(t.shape)
        why[k] = "(this model's tensor)"
    check_loaded_tensors(expected, why, tensors, view, cls, file_key, problems)
    raise_problems(f"cannot load {weights_file} into this {cls}:", problems)

    config = spec.config if spec.heads_exact else with_checkpoint_heads(spec.config, view, spec.heads, False)
    apply = None if existing is not None else functools.partial(inject.apply_prefix, config=config)
    return PromptLearningLoadPlan(model, "prefix", spec.source, apply, inject.has_prefix, inject.remove_prefix,
                                  inject.prefix_encoder, [(name, tensors[k]) for k, name in encoder_keys.items()],
                                  [(dst, tensors[k]) for k, dst in destinations.items()])


def hint_from_peft(peft_config, adapter_name: str, source: str) -> str:
    """The adapter name of an accelerated PEFT prefix model (its one prefix, see ``plan_load``)."""
    return adapter_name


def refuse_peft_model(model: nn.Module) -> None:
    """A PEFT prefix model that PEFT runs itself (not accelerated) keeps its prefix out of reach."""
    from ptune_rt.methods.prefix import peft_bridge  # imports PEFT-facing glue only when asked

    if peft_bridge.is_peft_prefix_model(model) and not peft_bridge.is_accelerated(model):
        raise AdapterError(f"{model_class(model)} is a PEFT prefix-tuning model that PEFT runs itself: use its "
                           "save_pretrained / load_adapter, or call ptune_rt.accelerate(peft_model) first (then "
                           "ptune_rt.save_adapter / load_adapter work on it)")
