"""How a prefix goes into a Hugging Face model and out again: ``apply_prefix`` / ``remove_prefix``.

``apply_prefix`` changes one model instance (never a class): it attaches the ``PrefixEncoder`` as
``model.prompt_encoder["default"]`` (PEFT's parameter names), switches the model's attention
implementation to ``ATTN_NAME`` (:mod:`.attention`, registered with transformers'
``AttentionInterface`` / ``AttentionMaskInterface``), tags every self-attention module with its
layer index, and adds a forward pre-hook to the inner model that computes the prefix ``E`` once
per forward, validates ``task_ids`` (mixed-task batches, through ``PrefixForward``, also in
``generate``) and, in "shift" mode, passes position ids shifted by P. The base model is frozen;
``modules_to_save`` (by default the task head of classification / QA models, as PEFT trains it
for P-tuning v2) trains. Positions follow PEFT 0.21.2 (real tokens start at P; RoBERTa's
padding-aware positions at ``padding_idx + 1 + P``). ``apply_prefix(model, config, encoder=...)``
runs a given encoder instead (the PEFT bridge's), attaching nothing and changing no flag.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt._cache_names import cache_from_kwargs
from ptune_rt.heads import head_modules
from ptune_rt.methods import _config
from ptune_rt.methods.prefix.attention import (ATTN_NAME, LAYER_ATTR, MODULE_STATE_ATTR, PREFIX_KWARG, TASKS_KWARG,
                                               register_attention)
from ptune_rt.methods.prefix.cache import adopt_cache
from ptune_rt.methods.prefix.config import PrefixConfig, check_model_dtype
from ptune_rt.methods.prefix.encoder import PrefixEncoder
from ptune_rt.ops.backend import resolve_backend

logger = logging.getLogger(__name__)

NAME = PrefixConfig.METHOD
#: The user-facing keyword of ``forward`` / ``generate`` selecting each row's prefix.
TASK_IDS = "task_ids"
#: The encoder is ``model.<ENCODER_ATTR>[<ADAPTER_NAME>]``, as in PEFT.
ENCODER_ATTR = "prompt_encoder"
ADAPTER_NAME = "default"

#: Model types whose attention and position handling this module reproduces (PEFT parity tested
#: on llama, qwen2, gpt2, bert; mistral, qwen3 and roberta share those code paths).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta")


class PrefixState:
    """Everything ``apply_prefix`` changed on a model, so ``remove_prefix`` can undo it."""

    def __init__(self, config: PrefixConfig, encoder: PrefixEncoder, base: nn.Module, attn_modules: dict,
                 attn_impls: list, changed_grad: list, position_limit: Optional[int], position_offset: int,
                 roberta_positions: bool):
        self.config = config
        self.encoder = encoder
        self.base = base
        self.attn_modules = attn_modules      # name -> (module, layer index)
        self.attn_impls = attn_impls          # [(config object, previous _attn_implementation_internal)]
        self.changed_grad = changed_grad      # [(parameter, previous requires_grad)] changed by apply
        self.position_limit = position_limit  # max_position_embeddings, or None
        self.position_offset = position_offset  # smallest position id of a real token (RoBERTa: padding_idx + 1)
        self.roberta_positions = roberta_positions
        self.checkpoint_modules = [m for m in base.modules() if hasattr(m, "gradient_checkpointing")]
        self.handles = []
        self.owns_encoder = True  # False: the encoder is someone else's module (not attached by apply_prefix)
        self.gate = None  # None, or a callable; when it returns False the model runs without its prefix
        self.heads = []  # names of the modules trained next to the prefix (modules_to_save)
        self.head_params = []  # their parameters
        self.pending_tasks = []  # task_ids handed from PrefixForward to the pre-hook (a stack: calls may nest)
        self._checked_tasks = None  # (key, int32 tensor) of the last validated task_ids

    @property
    def num_tasks(self) -> int:
        return self.encoder.num_tasks

    @property
    def layer_indices(self) -> list:
        return [idx for _, idx in self.attn_modules.values()]

    def torch_backend(self, device) -> bool:
        """Whether the prefix attention runs the torch path for tensors on ``device`` (False where the
        backend is unusable there: the attention call reports that)."""
        try:
            return resolve_backend(self.config.backend, device)[0] == "torch"
        except (RuntimeError, ValueError):
            return False

    def enabled(self) -> bool:
        return self.gate is None or bool(self.gate())

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens


# ----------------------------------------------------------------------------------------
# positions and the prefix, per forward
# ----------------------------------------------------------------------------------------


def _positional_names(fn) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def _shifted_positions(state: PrefixState, kwargs: dict):
    """The position ids to pass in "shift" mode (None: leave the model's own)."""
    P = state.num_virtual_tokens
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    L = ref.shape[1] if ref.dim() >= 2 else ref.shape[-1]
    cache = cache_from_kwargs(kwargs)
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    pos = kwargs.get("position_ids")
    limit = state.position_limit
    if pos is not None:
        new = pos + P
        top = int(new.max()) + 1 if new.numel() else 0
    elif state.roberta_positions:
        if ids is None:  # RoBERTa numbers embeddings from padding_idx + 1 regardless of a cache (PEFT too)
            return None
        emb = state.base.embeddings
        new = emb.create_position_ids_from_input_ids(ids, emb.padding_idx, past + P)
        top = state.position_offset + P + past + L
    else:
        new = (torch.arange(L, device=ref.device) + (P + past)).unsqueeze(0)
        top = P + past + L
    if limit is not None and top > limit:
        raise ValueError(
            f"prefix ({P} virtual tokens) + sequence need position ids up to {top - 1}, but the model has "
            f"max_position_embeddings={limit}; shorten the input (or the prefix), or use "
            "PrefixConfig(position_mode='none')")
    return new


def _batch_size(kwargs: dict) -> Optional[int]:
    for name in ("input_ids", "inputs_embeds"):
        x = kwargs.get(name)
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return int(x.shape[0])
    return None


def check_task_ids(task_ids, batch: Optional[int], num_tasks: int, device) -> Optional[torch.Tensor]:
    """``task_ids`` (any integer dtype) as an int32 tensor [batch] on ``device`` (a scalar applies to
    every row), or None for a one-task prefix; raises ValueError naming what was expected."""
    tasks = _config.check_task_ids(task_ids, batch, num_tasks, "prefixes")
    return tasks.to(device) if tasks is not None else None


def _resolve_tasks(state: PrefixState, task_ids, kwargs: dict, device):
    """The validated int32 task index of this forward (checked once per distinct tensor: ``generate``
    passes the same one at every step)."""
    if task_ids is None and state.pending_tasks:
        task_ids = state.pending_tasks[-1]
    batch = _batch_size(kwargs)
    if isinstance(task_ids, torch.Tensor):
        key = (id(task_ids), task_ids._version, task_ids.data_ptr(), tuple(task_ids.shape), batch, str(device))
        hit = state._checked_tasks
        if hit is not None and hit[0] == key and hit[2] is task_ids:
            return hit[1]
        checked = check_task_ids(task_ids, batch, state.num_tasks, device)
        state._checked_tasks = (key, checked, task_ids)
        return checked
    return check_task_ids(task_ids, batch, state.num_tasks, device)


def _pre_hook(state: PrefixState, names: list[str], module, args, kwargs):
    if not state.enabled():  # the prefix is switched off: the model runs as it is
        if TASK_IDS in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != TASK_IDS}
            return args, kwargs
        return None
    kwargs = dict(kwargs)
    task_ids = kwargs.pop(TASK_IDS, None)  # the inner model called directly with task_ids=...
    for name, a in zip(names, args):
        if name in kwargs:
            raise TypeError(f"{type(module).__name__}.forward got multiple values for argument {name!r}")
        kwargs[name] = a
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments but "
                        f"{len(args)} were given")
    device = state.encoder.embedding.weight.device
    kwargs[TASKS_KWARG] = _resolve_tasks(state, task_ids, kwargs, device)
    if not torch.is_grad_enabled():  # decode steps attend over [prefix ; cache] kept in one buffer
        cache = cache_from_kwargs(kwargs)
        if cache is not None and state.torch_backend(device):
            adopt_cache(cache, state.num_virtual_tokens, state.layer_indices)
    if state.config.position_mode == "shift":
        new = _shifted_positions(state, kwargs)
        if new is not None:
            kwargs["position_ids"] = new
    # Under reentrant checkpointing every layer's recomputation runs its own backward, and each would
    # traverse (and free) the graph of one shared E; a prefix that has a graph (projection, dropout)
    # is then computed inside each attention call instead (the attention function does so when E is
    # missing). Otherwise E is computed here, once per forward.
    kwargs[PREFIX_KWARG] = None if _per_layer_prefix(state) else state.encoder()
    return (), kwargs


def _reentrant_checkpointing(m: nn.Module) -> bool:
    if not (getattr(m, "gradient_checkpointing", False) and m.training):
        return False
    fn = getattr(m, "_gradient_checkpointing_func", None)
    keywords = getattr(fn, "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False  # torch's checkpoint without the flag: reentrant


def _per_layer_prefix(state: PrefixState) -> bool:
    enc = state.encoder
    if not torch.is_grad_enabled() or not (enc.prefix_projection or (enc.training and enc.dropout_p > 0.0)):
        return False
    return any(_reentrant_checkpointing(m) for m in state.checkpoint_modules)


# ----------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _calls_attention_interface(cls) -> bool:
    # transformers exposes no flag for "this attention calls AttentionInterface": its source does
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src and "get_interface(" in src


def _is_cross_attention(m: nn.Module) -> bool:
    return bool(getattr(m, "is_cross_attention", False)) or "Cross" in type(m).__name__


def find_attention_modules(model: nn.Module, num_layers: int) -> dict:
    """name -> (module, layer index) of the self-attention modules, exactly one per layer."""
    found, per_layer = {}, {}
    for name, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, bool) or not isinstance(idx, int) or _is_cross_attention(m):
            continue
        if not _calls_attention_interface(type(m)):
            continue
        found[name] = (m, idx)
        per_layer.setdefault(idx, []).append(name)
    bad = {i: n for i, n in per_layer.items() if len(n) != 1}
    missing = [i for i in range(num_layers) if i not in per_layer]
    extra = [i for i in per_layer if not 0 <= i < num_layers]
    if bad or missing or extra:
        raise ValueError(f"{type(model).__name__}: expected one self-attention module per layer 0..{num_layers - 1} "
                         f"calling transformers' AttentionInterface; found layers {sorted(per_layer)} "
                         f"(several modules: {bad or 'none'}, missing: {missing or 'none'})")
    return found


def _model_dims(cfg) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a transformers config."""
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise ValueError(f"model config {type(cfg).__name__} lacks num_hidden_layers / num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"cannot infer the attention head size from {type(cfg).__name__}")
    return layers, kv, head_dim


def has_prefix(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and isinstance(model_state.get(model, NAME), PrefixState)


def prefix_state(model: nn.Module) -> PrefixState:
    if not has_prefix(model):
        raise ValueError(f"{type(model).__name__} carries no ptune-rt prefix; expected a model passed through "
                         "ptune_rt.apply(model, PrefixConfig(...))")
    return model_state.get(model, NAME)


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The ``PrefixEncoder`` that ``apply_prefix`` attached to ``model``."""
    return prefix_state(model).encoder


def trained_head_modules(model: nn.Module, config: PrefixConfig) -> list[str]:
    """Names of the modules trained next to the prefix (see ``PrefixConfig.modules_to_save``)."""
    return head_modules(model, config.modules_to_save, "PrefixConfig", ENCODER_ATTR)


class PrefixForward:
    """The model instance's ``forward``: the model's own plus the keyword ``task_ids`` (so ``generate``
    accepts it and passes it to every step). It only hands ``task_ids`` to the inner model's
    pre-hook, which validates it and passes it to the attention. Held in ``model.__dict__["forward"]``;
    ``remove_prefix`` takes it out."""

    def __init__(self, model: nn.Module, prev):
        self.model, self.prev = model, prev
        sig = inspect.signature(prev if prev is not None else type(model).forward.__get__(model))
        params = list(sig.parameters.values())
        if TASK_IDS not in sig.parameters:
            extra = inspect.Parameter(TASK_IDS, inspect.Parameter.KEYWORD_ONLY, default=None)
            if params and params[-1].kind == inspect.Parameter.VAR_KEYWORD:
                params = params[:-1] + [extra, params[-1]]
            else:
                params = params + [extra]
        self.__signature__ = sig.replace(parameters=params)

    def __call__(self, *args, task_ids=None, **kwargs):
        state = model_state.get(self.model, NAME)
        if state is not None:
            state.pending_tasks.append(task_ids)
        try:
            if self.prev is not None:
                return self.prev(*args, **kwargs)
            return type(self.model).forward(self.model, *args, **kwargs)
        finally:
            if state is not None:
                state.pending_tasks.pop()


def apply_prefix(model: nn.Module, config: PrefixConfig, *, encoder: Optional[PrefixEncoder] = None) -> nn.Module:
    """Add a trainable prefix to every self-attention layer of ``model`` (in place); returns the model.

    With ``config.num_tasks > 1`` the model holds one prefix per task and its ``forward`` / ``generate``
    take ``task_ids`` [batch]. The modules of ``config.modules_to_save`` (by default the head of a
    classification / question-answering model) train next to the prefix; the rest is frozen.

    encoder: use this ``PrefixEncoder`` (e.g. one built over a PEFT model's own parameters) instead
        of a new one. It must have the model's layout and ``config``'s P and projection; it is not
        attached to the model as a submodule and no requires_grad flag is changed.

    Every check runs before the first change: a failed call leaves the model as it was.
    """
    dims, attn_modules = _check_model(model, config, encoder)
    limit, offset, roberta = _position_limits(model, config)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    try:
        resolve_backend(config.backend, device)
    except RuntimeError as e:
        raise ValueError(f"PrefixConfig.backend={config.backend!r} cannot run on this model: {e}") from None
    own = encoder is None
    if own and isinstance(getattr(model, ENCODER_ATTR, None), nn.Module):
        raise ValueError(f"{type(model).__name__} already has a {ENCODER_ATTR!r} module (a soft prompt?); remove it "
                         "first (ptune_rt.restore(model))")
    heads = trained_head_modules(model, config) if own else []
    encoder = _new_encoder(model, config, dims, device) if own else _checked_encoder(model, config, encoder, dims,
                                                                                     device)
    register_attention()
    attn_impls = _switch_attention(model)
    # Nothing below can fail on a validated model.
    changed, head_params = _freeze_around(model, heads) if own else ([], [])
    if own:
        model.add_module(ENCODER_ATTR, nn.ModuleDict({ADAPTER_NAME: encoder}))
        for p in encoder.parameters():
            p.requires_grad_(True)
    base = model.base_model
    state = PrefixState(config, encoder, base, attn_modules, attn_impls, changed, limit, offset, roberta)
    state.owns_encoder = own
    state.heads, state.head_params = heads, head_params
    if own:
        # forward / generate must accept task_ids, and transformers has no hook adding a keyword: the
        # instance's forward (never the class's) wraps the model's own
        model.__dict__["forward"] = PrefixForward(model, model.__dict__.get("forward"))
    for m, idx in attn_modules.values():
        m.__dict__[LAYER_ATTR] = idx
        m.__dict__[MODULE_STATE_ATTR] = state
    names = _positional_names(base.forward)
    state.handles.append(base.register_forward_pre_hook(functools.partial(_pre_hook, state, names),
                                                        with_kwargs=True))
    model_state.record(model, NAME, state)
    return model


def _check_model(model: nn.Module, config: PrefixConfig, encoder) -> tuple[tuple[int, int, int], dict]:
    """((layers, kv_heads, head_dim), the self-attention modules) of a model the prefix supports;
    raises naming what it does not support."""
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
    if encoder is not None and not isinstance(encoder, PrefixEncoder):
        raise TypeError(f"encoder must be None or a PrefixEncoder, got {type(encoder).__name__}")
    config.validate()
    try:
        from transformers import PreTrainedModel
    except Exception as e:  # pragma: no cover - transformers is a dependency
        raise RuntimeError(f"prefix tuning needs transformers, which cannot be imported: {e}") from None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (e.g. LlamaForCausalLM), got "
                        f"{type(model).__name__}")
    if has_prefix(model):
        raise ValueError("model already carries a ptune-rt prefix; call ptune_rt.restore(model) first")
    check_model_dtype(model)
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"prefix tuning supports decoder-only and encoder-only models; {type(model).__name__} "
                         f"(model_type {mtype!r}) is an encoder-decoder")
    if not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} (model_type {mtype!r}) does not route its attention through "
                         "transformers' AttentionInterface, so the fused prefix attention cannot be plugged in "
                         f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"prefix tuning does not support model_type {mtype!r} ({type(model).__name__}); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    dims = _model_dims(cfg)
    attn_modules = find_attention_modules(model, dims[0])
    if getattr(cfg, "is_causal", True) is False and any(getattr(m, "is_causal", False)
                                                          for m, _ in attn_modules.values()):
        raise ValueError(f"{type(model).__name__} has config.is_causal=False (bidirectional use of a causal "
                         "model), which prefix tuning does not support")
    fwd_params = inspect.signature(model.base_model.forward).parameters
    if "position_ids" not in fwd_params or not any(p.kind == inspect.Parameter.VAR_KEYWORD
                                                   for p in fwd_params.values()):
        raise ValueError(f"{type(model.base_model).__name__}.forward must take position_ids and **kwargs for "
                         "prefix tuning")
    return dims, attn_modules


def _position_limits(model: nn.Module, config: PrefixConfig) -> tuple[Optional[int], int, bool]:
    """(max_position_embeddings or None, the smallest position of a real token, RoBERTa-style
    padding-aware positions); raises when shift mode leaves no position for a token."""
    base = model.base_model
    roberta = hasattr(getattr(base, "embeddings", None), "create_position_ids_from_input_ids")
    offset = int(base.embeddings.padding_idx) + 1 if roberta else 0
    limit = getattr(model.config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    P = config.num_virtual_tokens
    if config.position_mode == "shift" and limit is not None and offset + P + 1 > limit:
        raise ValueError(f"PrefixConfig.num_virtual_tokens={P} leaves no room for a single token in shift mode: "
                         f"the model has max_position_embeddings={limit}")
    return limit, offset, roberta


def _new_encoder(model: nn.Module, config: PrefixConfig, dims, device) -> PrefixEncoder:
    layers, kv_heads, head_dim = dims
    encoder = PrefixEncoder(config.num_virtual_tokens, layers, kv_heads, head_dim, config.prefix_projection,
                            config.encoder_hidden_size, config.dropout, device=device, num_tasks=config.num_tasks)
    encoder.train(model.training)
    return encoder


def _checked_encoder(model: nn.Module, config: PrefixConfig, encoder: PrefixEncoder, dims, device) -> PrefixEncoder:
    """A given encoder, checked against the model's layout and ``config``."""
    got = (encoder.num_virtual_tokens, encoder.num_layers, encoder.num_kv_heads, encoder.head_dim,
           encoder.prefix_projection, encoder.num_tasks)
    want = (config.num_virtual_tokens, *dims, config.prefix_projection, config.num_tasks)
    if got != want:
        raise ValueError(f"encoder has (num_virtual_tokens, layers, kv_heads, head_dim, prefix_projection, "
                         f"num_tasks) = {got}; this {type(model).__name__} with {config!r} needs {want}")
    devices = {p.device for p in encoder.parameters()}
    if devices and devices != {torch.device(device)}:
        raise ValueError(f"encoder parameters are on {sorted(map(str, devices))}, the model on {device}; expected "
                         "one device")
    return encoder


def _switch_attention(model: nn.Module) -> list:
    """Switch every config of the model to the prefix attention; returns [(config, previous
    implementation)] (put back as they were if transformers refuses)."""
    from transformers import PreTrainedModel

    configs = {id(model.config): model.config}
    for m in model.modules():
        c = getattr(m, "config", None)
        if isinstance(m, PreTrainedModel) and c is not None:
            configs.setdefault(id(c), c)
    attn_impls = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs.values()]
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        for c, impl in attn_impls:
            c._attn_implementation_internal = impl
        raise
    return attn_impls


def _freeze_around(model: nn.Module, heads: list[str]) -> tuple[list, list]:
    """Freeze the base model, train the heads; returns ([(parameter, previous requires_grad)] for
    the changed ones, the heads' parameters). ``ptune_rt.apply`` keeps other methods' training."""
    head_params, head_ids = [], set()
    for name in heads:
        for p in model.get_submodule(name).parameters():
            if id(p) not in head_ids:
                head_ids.add(id(p))
                head_params.append(p)
    changed = []
    for p in model.parameters():
        want = id(p) in head_ids
        if p.requires_grad != want:
            changed.append((p, p.requires_grad))
            p.requires_grad_(want)
    return changed, head_params


def remove_prefix(model: nn.Module) -> nn.Module:
    """Undo ``apply_prefix``: remove the hook, the layer tags and the encoder, give back the previous
    attention implementation and the requires_grad flags ``apply_prefix`` changed."""
    state = prefix_state(model)
    for h in state.handles:
        h.remove()
    for m, _ in state.attn_modules.values():
        m.__dict__.pop(LAYER_ATTR, None)
        m.__dict__.pop(MODULE_STATE_ATTR, None)
    if state.owns_encoder and isinstance(getattr(model, ENCODER_ATTR, None), nn.ModuleDict):
        delattr(model, ENCODER_ATTR)
    fwd = model.__dict__.get("forward")
    if isinstance(fwd, PrefixForward):
        if fwd.prev is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = fwd.prev
    for c, impl in state.attn_impls:
        c._attn_implementation_internal = impl
    present = {id(p) for p in model.parameters()}
    for p, flag in state.changed_grad:
        if id(p) in present:
            p.requires_grad_(flag)
    model_state.forget(model, NAME)
    return model
