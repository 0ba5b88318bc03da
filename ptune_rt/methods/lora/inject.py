"""How LoRA goes into a model and out again: ``apply_lora`` swaps the targets for ``LoRALinear``
modules with fresh adapters and freezes the rest; ``restore_lora`` puts the original modules back
(the very same objects). Only the instance passed in changes, never a class; every check runs
before the first change."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.heads import head_modules
from ptune_rt.methods.lora.config import LoRAConfig
from ptune_rt.methods.lora.groups import disable_projection_groups, enable_projection_groups
from ptune_rt.methods.lora.embedding import LoRAEmbedding
from ptune_rt.methods.lora.layer import LoRALinear
from ptune_rt.methods.lora.tokens import TrainableTokensEmbedding, TrainableTokensLinear, fold_into_table
from ptune_rt.methods.lora.swiglu import disable_mlp_recompute, enable_mlp_recompute
from ptune_rt.ops.backend import resolve_backend
from ptune_rt.ops.lora_linear import OP_DTYPES
from ptune_rt.peft_layers import remove_peft_guards
from ptune_rt.targets import (in_layers, is_linear, is_lora_target, lora_target_shape, module_matches,
                              output_layer_names)

NAME = LoRAConfig.METHOD

#: Default targets per model type when ``target_modules`` is None (the same choice PEFT makes).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "t5": ["q", "v"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}

#: Top-level submodules ptune-rt itself attaches (prefix / prompt encoders): never LoRA targets.
OWN_MODULES = ("prompt_encoder",)
#: LoRALinear attribute: the module ``restore`` puts back (not registered as a submodule).
ORIGIN_ATTR = "_ptune_rt_origin"
#: LoRALinear attribute: "apply" or "peft", how the module got into the model.
SOURCE_ATTR = "_ptune_rt_source"


@dataclasses.dataclass
class LoRAModelState:
    """What a model carrying LoRA records (``ptune_rt.state``): the config it was applied or loaded
    with, and the requires_grad flags (by parameter name) from before ``apply_lora`` (None when
    the modules came from a PEFT model)."""

    config: Optional[LoRAConfig]
    requires_grad: Optional[dict] = None
    heads: list = dataclasses.field(default_factory=list)  # modules trained whole (modules_to_save)
    tokens: dict = dataclasses.field(default_factory=dict)  # trainable-token module name -> the module it replaced


def model_config(model: nn.Module) -> Optional[LoRAConfig]:
    """The LoRAConfig ``model`` was applied or loaded with (None: none recorded)."""
    st = model_state.get(model, NAME)
    return st.config if st is not None else None


def set_model_config(model: nn.Module, config: LoRAConfig) -> None:
    st = model_state.get(model, NAME)
    if st is None:
        model_state.record(model, NAME, LoRAModelState(config))
    else:
        st.config = config



def _peft_lora_classes():
    """(LoraLayer, lora Linear) of the installed PEFT, or (None, None) without PEFT."""
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except Exception:
        return None, None
    return LoraLayer, Linear


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    LoraLayer, _ = _peft_lora_classes()
    if LoraLayer is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def restore_requires_grad(model: nn.Module) -> None:
    """The requires_grad flags from before ``apply_lora`` back (none recorded: nothing changes)."""
    st = model_state.get(model, NAME)
    if st is not None and st.requires_grad is not None:
        for pn, p in model.named_parameters():
            if pn in st.requires_grad:
                p.requires_grad_(st.requires_grad[pn])


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_module(model, arg: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")


def _require_swapped(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    _require_module(model)
    mods = lora_modules(model)
    if not mods:
        raise ValueError(f"{what}: model has no ptune-rt LoRA modules; expected a model passed through "
                         "ptune_rt.apply(...) or ptune_rt.accelerate(...)")
    return mods


def lora_class(layer: nn.Module) -> type:
    """The module class that adapts ``layer``: LoRAEmbedding for an embedding, LoRALinear otherwise."""
    return LoRAEmbedding if isinstance(layer, nn.Embedding) else LoRALinear


def _check_weight_dtype(module_name: str, layer: nn.Module, what: str, backend: str) -> None:
    """Refuse now, not at the first forward, a layer whose dtype the chosen path cannot run: the fused
    op takes float32, float16 and bfloat16; float64 runs on the torch path only (as plain torch ops)."""
    dtype = layer.weight.dtype
    if dtype in OP_DTYPES:
        return
    if dtype == torch.float64:
        chosen, why = resolve_backend(backend, layer.weight.device)
        if chosen == "torch":
            return
        raise ValueError(f"{what} {module_name!r}, whose weight is float64; the Triton kernels ({why}) take float32, "
                         "float16 and bfloat16: cast the model, or run float64 with backend='torch' on CPU")
    raise ValueError(f"{what} {module_name!r}, whose weight is {dtype}; ptune-rt's LoRA runs float32, float16 and "
                     "bfloat16 layers (float64 on the torch path): cast the model or leave this layer out")


def _check_backend(backend: str, module_name: str, layer: nn.Module, arg: str) -> None:
    try:
        resolve_backend(backend, layer.weight.device)
    except RuntimeError as e:
        raise ValueError(f"{arg}={backend!r} cannot run target {module_name!r}: {e}") from None


def resolve_targets(model: nn.Module, target_modules, layers_to_transform=None, layers_pattern=None) -> list[str]:
    """Names of the modules ``target_modules`` selects; raises naming what did not match.

    A list selects modules whose name equals an entry or ends with ``"." + entry``; a string is
    a regular expression matched against full module names; ``"all-linear"`` selects every
    nn.Linear / Conv1D except the output layer; None takes the model type's default. With
    ``layers_to_transform`` only those in the given layers (``targets.in_layers``, PEFT's rule).
    """
    if target_modules is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(f"LoRAConfig.target_modules is None and there is no default for model type "
                             f"{mtype!r}: pass LoRAConfig(target_modules=[...])")
        target_modules = DEFAULT_TARGETS[mtype]
    # ptune-rt's own trainable modules (a prefix / prompt encoder) are never LoRA targets.
    named = {n: m for n, m in model.named_modules() if n.split(".")[0] not in OWN_MODULES}
    order = {n: i for i, n in enumerate(named)}
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = output_layer_names(model, named)
        names = [n for n, m in named.items() if is_linear(m) and n not in skip]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"LoRAConfig.target_modules={target_modules!r} is not a valid regular expression: "
                             f"{e}") from None
        names = [n for n in named if n and pattern.fullmatch(n)]
    else:
        names, unmatched = set(), []
        for t in target_modules:
            hits = [n for n in named if module_matches(n, [t])]
            if not hits:
                unmatched.append(t)
            names.update(hits)
        if unmatched:
            raise ValueError(f"LoRAConfig.target_modules entries {unmatched} match no module of "
                             f"{type(model).__name__}; expected names (or name suffixes) of its nn.Linear / "
                             f"Conv1D layers, e.g. {_example_linear_names(named)}")
        names = sorted(names, key=order.__getitem__)
    if not names:
        raise ValueError(f"LoRAConfig.target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__}")
    kept = [n for n in names if in_layers(n, layers_to_transform, layers_pattern)]
    if not kept:
        raise ValueError(f"LoRAConfig.layers_to_transform={layers_to_transform!r} (layers_pattern={layers_pattern!r}) "
                         f"keeps none of the {len(names)} targets, e.g. {names[:2]}: no layer index found in their "
                         "names, or none of these layers")
    names = kept
    for n in names:
        m = named[n]
        if not is_lora_target(m):
            raise TypeError(f"LoRAConfig.target_modules selects module {n!r}, a {type(m).__name__}; "
                            "LoRA targets must be nn.Linear, GPT-2 Conv1D or nn.Embedding layers")
    return names


def _example_linear_names(named: dict) -> list[str]:
    leaves = []
    for n, m in named.items():
        leaf = n.rpartition(".")[2]
        if is_linear(m) and leaf not in leaves:
            leaves.append(leaf)
    return leaves[:8]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _refuse_already_swapped(model: nn.Module) -> None:
    mods = lora_modules(model)
    if mods:
        first = next(iter(mods))
        raise ValueError(f"model already carries ptune-rt LoRA modules (e.g. {first!r}); expected an unswapped "
                         "model: call ptune_rt.restore(model) first")


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Swap the targets of ``config`` for ``LoRALinear`` modules (in place) and freeze the rest.

    Afterwards exactly these parameters train: every adapter's lora_A / lora_B, plus the targets'
    biases with ``bias="lora_only"`` or every parameter named ``*.bias`` with ``bias="all"`` (as
    in PEFT). The previous requires_grad flags are kept and given back by ``restore``.
    """
    _require_module(model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    config.validate()
    _refuse_already_swapped(model)
    peft_layers = peft_lora_layers(model)
    if peft_layers:
        raise ValueError(f"model already has PEFT LoRA layers (e.g. {next(iter(peft_layers))!r}); expected a "
                         "plain model: use ptune_rt.accelerate(peft_model) to run a PEFT model on fused modules")
    heads = head_modules(model, config.modules_to_save, "LoRAConfig", OWN_MODULES[0])
    names = _without_heads(resolve_targets(model, config.target_modules, config.layers_to_transform,
                                           config.layers_pattern), heads, config.target_modules)
    for n in names:  # every check before the first change
        layer = model.get_submodule(n)
        in_f, out_f = lora_target_shape(layer)
        r = config.rank_for(n)
        if r > min(in_f, out_f):
            where = "r" if r == config.r else "rank_pattern entry"
            raise ValueError(f"LoRAConfig.{where}={r} must be at most min(in_features={in_f}, "
                             f"out_features={out_f}) of target {n!r}")
        _check_backend(config.backend, n, layer, "LoRAConfig.backend")
        _check_weight_dtype(n, layer, "LoRAConfig.target_modules selects", config.backend)
    token_plan = token_modules(model, config.trainable_token_indices, names)
    new = _new_modules(model, names, config)

    # Nothing below can fail on a validated model.
    before = {pn: p.requires_grad for pn, p in model.named_parameters()}
    trainable_bias = set()
    if config.bias == "all":
        trainable_bias = {pn for pn in before if pn.rpartition(".")[2] == "bias"}
    elif config.bias == "lora_only":
        trainable_bias = {f"{n}.bias" for n in names if new[n].base_layer.bias is not None}
    for pn, p in model.named_parameters():
        p.requires_grad_(pn in trainable_bias)
    for h in heads:  # the task head trains whole next to the adapters, as PEFT's modules_to_save
        model.get_submodule(h).requires_grad_(True)
    for n, m in new.items():
        m.__dict__[ORIGIN_ATTR] = m.base_layer
        m.__dict__[SOURCE_ATTR] = "apply"
        m.train(m.base_layer.training)
        _set_submodule(model, n, m)
    tokens = _swap_in_tokens(model, token_plan)
    if config.recompute_mlp:
        enable_mlp_recompute(model)
    if config.group_projections:
        enable_projection_groups(model)
    model_state.record(model, NAME, LoRAModelState(config, before, heads, tokens))
    return model


def token_modules(model: nn.Module, indices, lora_targets: list[str]) -> list[tuple[str, list[int], Optional[str]]]:
    """(embedding name, token ids, tied output layer name or None) for ``trainable_token_indices``
    (PEFT's rule: a list names rows of the input embedding, and of the output layer when it shares
    the table; a dict maps module names, or name suffixes, to rows). Raises before any change."""
    if indices is None:
        return []
    named = dict(model.named_modules())
    if isinstance(indices, dict):
        pairs = []
        for key, ids in indices.items():
            hits = [n for n in named if module_matches(n, [key]) and isinstance(named[n], nn.Embedding)]
            if len(hits) != 1:
                raise ValueError(f"LoRAConfig.trainable_token_indices key {key!r} must name one nn.Embedding of "
                                 f"{type(model).__name__}, found {hits or 'none'}")
            pairs.append((hits[0], ids, None))
    else:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in named.items() if m is emb), None)
        if not isinstance(emb, nn.Embedding) or name is None:
            raise ValueError(f"LoRAConfig.trainable_token_indices is a list, which names rows of the input "
                             f"embedding, but {type(model).__name__} has no nn.Embedding input embedding; pass "
                             "{module_name: [token ids]}")
        pairs = [(name, indices, _tied_output(model, named, emb))]
    for name, ids, _ in pairs:
        size = named[name].num_embeddings
        bad = [i for i in ids if i >= size]
        if bad:
            raise ValueError(f"LoRAConfig.trainable_token_indices: token ids {bad[:5]} are outside {name!r} "
                             f"(num_embeddings={size})")
        if name in lora_targets:
            raise ValueError(f"module {name!r} is both a LoRA target and holds trainable_token_indices; choose one")
    return pairs


def _tied_output(model: nn.Module, named: dict, emb: nn.Embedding) -> Optional[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, nn.Linear) and out.weight is emb.weight:
        return next(n for n, m in named.items() if m is out)
    return None


def _swap_in_tokens(model: nn.Module, plan: list) -> dict[str, nn.Module]:
    """Put the trainable-token modules in; returns {name: the module they replace} for restore."""
    replaced = {}
    for name, ids, tied in plan:
        emb = model.get_submodule(name)
        wrapper = TrainableTokensEmbedding(emb, ids)
        replaced[name] = emb
        _set_submodule(model, name, wrapper)
        if tied is not None:
            replaced[tied] = model.get_submodule(tied)
            _set_submodule(model, tied, TrainableTokensLinear(replaced[tied], wrapper.token_adapter))
    return replaced


def _swap_out_tokens(model: nn.Module, fold: bool = False) -> None:
    """Put back the modules the trainable-token wrappers replaced; ``fold``: write the trained rows into
    the table first (merge_and_unload)."""
    st = model_state.get(model, NAME)
    for name, original in (st.tokens if st is not None else {}).items():
        wrapper = model.get_submodule(name)
        if fold and isinstance(wrapper, TrainableTokensEmbedding):
            fold_into_table(wrapper)
        _set_submodule(model, name, original)


def token_adapters(model: nn.Module) -> list:
    """The trainable-token adapters of ``model`` (ptune-rt's)."""
    return [m.token_adapter for m in model.modules() if isinstance(m, TrainableTokensEmbedding)]


def _new_modules(model: nn.Module, names: list[str], config: LoRAConfig) -> dict:
    """The LoRA module of every target, not yet in the model. An init that changes a base weight
    (PiSSA, OLoRA) is undone in the modules already built if a later one fails."""
    new: dict = {}
    try:
        for n in names:
            layer = model.get_submodule(n)
            new[n] = lora_class(layer)(layer, config.rank_for(n), config.alpha_for(n), config.dropout,
                                       config.use_rslora, config.init, config.backend, use_dora=config.use_dora,
                                       lora_bias=config.lora_bias)
    except BaseException:
        for m in new.values():
            m.restore_base_weight()
        raise
    return new


def _without_heads(names: list[str], heads: list[str], target_modules) -> list[str]:
    """The targets minus those inside a head. A head named by ``target_modules`` itself (a list or
    a regex, not ``"all-linear"`` or the default) is an error: a module is trained whole or adapted."""
    inside = [n for n in names if any(n == h or n.startswith(h + ".") for h in heads)]
    explicit = target_modules is not None and target_modules != "all-linear"
    if inside and explicit:
        raise ValueError(f"LoRAConfig.target_modules selects {inside[:3]}, inside the modules trained whole "
                         f"(modules_to_save: {heads}); a module is either a LoRA target or trained whole")
    kept = [n for n in names if n not in inside]
    if not kept:
        raise ValueError(f"LoRAConfig.target_modules={target_modules!r} selects only modules trained whole "
                         f"(modules_to_save: {heads}); nothing is left to adapt")
    return kept


def restore_lora(model: nn.Module) -> nn.Module:
    """Undo ``apply`` / ``accelerate`` of LoRA: unmerge where merged, then put the original modules back
    (the very same objects, so weights are bit-exact) and, after ``apply``, the previous
    requires_grad flags. After ``accelerate`` PEFT's LoRA layers come back, holding the same
    (possibly trained) adapter parameters."""
    mods = _require_swapped(model, "restore")
    disable_mlp_recompute(model)
    disable_projection_groups(model)
    for m in mods.values():
        m.unmerge()
        m.restore_base_weight()
    for n, m in mods.items():
        origin = m.__dict__.get(ORIGIN_ATTR, m.base_layer)
        origin.train(m.training)
        if origin is not m.base_layer:  # a PEFT layer: hand back the enabled / disabled state
            origin._disable_adapters = m.disabled
        _set_submodule(model, n, origin)
    _swap_out_tokens(model)
    restore_requires_grad(model)
    remove_peft_guards(model)
    model_state.forget(model, NAME)
    return model
