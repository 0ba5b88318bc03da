"""PEFT prefix-tuning / P-tuning v2 models on the fused prefix attention (``ptune_rt.accelerate``).

``accelerate_prefix(peft_model)`` gives the base model ptune-rt's prefix through a ``PrefixEncoder``
over PEFT's own encoder modules (no parameter created, renamed or re-flagged) and replaces the
PeftModel instance's ``forward`` (and ``prepare_inputs_for_generation`` for causal LMs) by one
that calls the base model directly instead of putting the prefix into ``past_key_values``, with
PEFT's argument meanings; ``restore_prefix`` undoes it. Logits, losses, gradients and generated
tokens are PEFT's (within fp32 rounding); the returned cache holds the real tokens only, and a
cache passed in is used (PEFT replaces it), so hand-written decoding loops work.
"""
from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Any, Optional

from torch import nn

from ptune_rt.methods.prefix import inject
from ptune_rt.methods.prefix.config import PrefixConfig, check_model_dtype
from ptune_rt.methods.prefix.encoder import PrefixEncoder
from ptune_rt.methods.method import PeftBridge
from ptune_rt.ops.backend import resolve_backend

#: PeftModel attribute recording what ``accelerate_prefix`` changed.
ACCELERATED_ATTR = "_ptune_rt_peft_prefix"
#: PEFT task classes this module accelerates, by PEFT task type.
SUPPORTED_TASKS = {"CAUSAL_LM": "PeftModelForCausalLM", "SEQ_CLS": "PeftModelForSequenceClassification",
                   "FEATURE_EXTRACTION": "PeftModelForFeatureExtraction"}
_MISSING = object()


@dataclasses.dataclass
class _Accelerated:
    adapter: str
    base: nn.Module
    replaced: dict  # instance attribute -> previous value in the instance __dict__ (or _MISSING)


def _peft_type(config) -> Optional[str]:
    t = getattr(config, "peft_type", None)
    return getattr(t, "value", t)


def is_peft_prefix_model(model: Any) -> bool:
    """True for a PEFT ``PeftModel`` holding a prefix-tuning adapter."""
    try:
        from peft import PeftModel
    except Exception:
        return False
    if not isinstance(model, PeftModel):
        return False
    configs = model.__dict__.get("_peft_config")  # prompt learning keeps its configs on the PeftModel itself
    return isinstance(configs, dict) and any(_peft_type(c) == "PREFIX_TUNING" for c in configs.values())


def is_accelerated(model: Any) -> bool:
    return isinstance(model, nn.Module) and isinstance(model.__dict__.get(ACCELERATED_ATTR), _Accelerated)


# ----------------------------------------------------------------------------------------
# the forwards that replace PEFT's (bound to the PeftModel instance)
# ----------------------------------------------------------------------------------------


def _drop_token_type_ids(kwargs: dict) -> None:
    """PEFT ignores token_type_ids for prefix tuning outside sequence classification; so does this."""
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are ignored by prefix tuning (as in PEFT); pass them only to sequence "
                      "classification models", UserWarning, stacklevel=3)
        kwargs["token_type_ids"] = None


def _causal_lm_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                       output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    _drop_token_type_ids(kwargs)
    kwargs.update(attention_mask=attention_mask, labels=labels, output_attentions=output_attentions,
                  output_hidden_states=output_hidden_states, return_dict=return_dict)
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


def _feature_extraction_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    _drop_token_type_ids(kwargs)
    kwargs.update(attention_mask=attention_mask, output_attentions=output_attentions,
                  output_hidden_states=output_hidden_states, return_dict=return_dict)
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


def _sequence_classification_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                                     output_attentions=None, output_hidden_states=None, return_dict=None,
                                     task_ids=None, **kwargs):
    if return_dict is None:  # PEFT's default, read from the model config
        cfg = self.base_model.config
        return_dict = getattr(cfg, "return_dict", True) and not getattr(cfg, "torchscript", False)
    kwargs.update(attention_mask=attention_mask, labels=labels, output_attentions=output_attentions,
                  output_hidden_states=output_hidden_states, return_dict=return_dict)
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


_FORWARDS = {"CAUSAL_LM": _causal_lm_forward, "SEQ_CLS": _sequence_classification_forward,
             "FEATURE_EXTRACTION": _feature_extraction_forward}


def _adapter_enabled(peft_model) -> bool:
    return not getattr(peft_model, "_adapters_disabled", False)


# ----------------------------------------------------------------------------------------
# accelerate / restore
# ----------------------------------------------------------------------------------------


def _task_of(peft_model) -> str:
    import peft

    for task, cls_name in SUPPORTED_TASKS.items():
        cls = getattr(peft, cls_name, None)
        if cls is not None and type(peft_model) is cls:
            return task
    raise ValueError(f"peft_model is a {type(peft_model).__name__}; ptune_rt.accelerate runs prefix tuning for "
                     f"{', '.join(SUPPORTED_TASKS.values())} (task_type {', '.join(SUPPORTED_TASKS)}); other PEFT "
                     "task classes are not supported")


def _plan(peft_model, backend: str):
    """Validate everything; returns (task, adapter, base, PrefixConfig, PrefixEncoder over PEFT's modules)."""
    where = f"peft_model ({type(peft_model).__name__})"
    if is_accelerated(peft_model):
        raise ValueError(f"{where} is already accelerated by ptune_rt; call ptune_rt.restore(peft_model) first")
    task = _task_of(peft_model)
    configs = peft_model.peft_config
    if len(configs) != 1:
        raise ValueError(f"{where} holds the adapters {sorted(configs)}; ptune_rt.accelerate supports a single "
                         "prefix-tuning adapter: delete the others (peft_model.delete_adapter(name))")
    adapter = peft_model.active_adapter
    if adapter not in configs:
        raise ValueError(f"{where}: the active adapter {adapter!r} is not one of {sorted(configs)}")
    cfg = configs[adapter]
    if _peft_type(cfg) != "PREFIX_TUNING":
        raise ValueError(f"{where}: adapter {adapter!r} is {_peft_type(cfg)}; expected PREFIX_TUNING")
    if getattr(peft_model, "_adapters_disabled", False):
        raise ValueError(f"{where} has its adapter disabled; leave peft_model.disable_adapter() first")
    replaced = [n for n in ("forward", "prepare_inputs_for_generation") if n in peft_model.__dict__]
    if replaced:
        raise ValueError(f"{where} has {replaced} set on the instance (by a running disable_adapter() or a patch); "
                         "expected PEFT's own methods")
    submodules = getattr(cfg, "num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules={submodules} (an encoder-decoder prefix) is not "
                         "supported; expected 1")
    base = peft_model.base_model
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel):
        raise ValueError(f"{where}: the base model is a {type(base).__name__}; expected a transformers "
                         "PreTrainedModel")
    if inject.has_prefix(base):
        raise ValueError(f"{where}: its base model already carries a ptune-rt prefix; call "
                         "ptune_rt.restore(base_model) first")
    layers, kv_heads, head_dim = inject._model_dims(base.config)
    token_dim, out_dim = kv_heads * head_dim, 2 * layers * kv_heads * head_dim
    P = cfg.num_virtual_tokens
    found = (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim)
    if found != (layers, kv_heads, token_dim):
        raise ValueError(
            f"{where}: PrefixTuningConfig has num_layers={cfg.num_layers}, "
            f"num_attention_heads={cfg.num_attention_heads}, token_dim={cfg.token_dim}; the fused attention needs "
            f"the prefix split [P, 2*L*Hkv*D] of this "
            f"{type(base).__name__}: num_layers={layers}, num_attention_heads={kv_heads} (kv heads), "
            f"token_dim={token_dim} ({kv_heads} x head_dim {head_dim})")

    encoders = getattr(peft_model, "prompt_encoder", None)
    pe = encoders[adapter] if isinstance(encoders, nn.ModuleDict) and adapter in encoders else None
    emb = getattr(pe, "embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{where}: prompt_encoder[{adapter!r}].embedding must be an nn.Embedding, got "
                         f"{type(emb).__name__}")
    # PEFT's get_prompt: inference mode reads embedding.weight as the prefix, training mode runs the encoder.
    projection = bool(cfg.prefix_projection) and not cfg.inference_mode
    hidden = None
    enc_name = f"prompt_encoder[{adapter!r}]"
    if projection:
        t = getattr(pe, "transform", None)
        ok = (isinstance(t, nn.Sequential) and len(t) == 3 and isinstance(t[0], nn.Linear)
              and isinstance(t[1], nn.Tanh) and isinstance(t[2], nn.Linear))
        if not ok:
            raise ValueError(f"{where}: {enc_name}.transform must be Sequential(Linear, Tanh, Linear) with "
                             f"prefix_projection=True, got {type(t).__name__}")
        hidden = t[0].out_features
        want = {"embedding.weight": (P, token_dim), "transform.0.weight": (hidden, token_dim),
                "transform.2.weight": (out_dim, hidden)}
    else:
        want = {"embedding.weight": (P, out_dim)}
    for name, shape in want.items():
        got = tuple(pe.get_parameter(name).shape)
        if got != shape:
            raise ValueError(f"{where}: {enc_name}.{name} has shape {list(got)}; expected {list(shape)} "
                             f"(P={P}, L={layers}, Hkv={kv_heads}, D={head_dim}"
                             f"{f', encoder_hidden_size={hidden}' if hidden else ''})")
    if emb.max_norm is not None:
        raise ValueError(f"{where}: {enc_name}.embedding has max_norm={emb.max_norm}; expected None")
    try:
        config = PrefixConfig(P, prefix_projection=projection, encoder_hidden_size=hidden, position_mode="shift",
                              dropout=0.0, backend=backend)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    encoder = PrefixEncoder(P, layers, kv_heads, head_dim, prefix_projection=projection, encoder_hidden_size=hidden,
                            device="meta")
    encoder.embedding = emb  # PEFT's own modules: the very Parameter objects
    if projection:
        encoder.transform = pe.transform
    encoder.train(pe.training)
    return task, adapter, base, config, encoder


def accelerate_prefix(peft_model, backend: str = "auto") -> list[dict]:
    """Run a PEFT prefix-tuning model through the fused prefix attention, in place; returns one report
    row. Every check runs before the first change.

    Takes a ``PeftModelForCausalLM``, ``PeftModelForSequenceClassification`` or
    ``PeftModelForFeatureExtraction`` whose adapter is a ``PrefixTuningConfig``. ``named_parameters()``
    stays as it was, an optimizer built before the call trains the same tensors, and PEFT's
    ``save_pretrained`` / ``get_peft_model_state_dict`` keep working (they read PEFT's encoder).
    ``position_ids`` are numbered after the P virtual tokens, ``token_type_ids`` are dropped with a
    warning except for sequence classification, ``task_ids`` is ignored, ``generate`` numbers
    positions ``P + cumsum(mask) - 1``. ``peft_model.disable_adapter()`` still runs the plain base
    model. The PEFT encoder is read as PEFT reads it: in inference mode (``PeftModel.from_pretrained``)
    the prefix is ``embedding.weight`` itself; while training with ``prefix_projection`` it is
    ``transform(embedding.weight)``."""
    check_model_dtype(peft_model, "ptune_rt.accelerate")
    task, adapter, base, config, encoder = _plan(peft_model, backend)
    inject.apply_prefix(base, config, encoder=encoder)  # validates the base model before changing it
    # Nothing below can fail.
    state = inject.prefix_state(base)
    state.gate = types.MethodType(_adapter_enabled, peft_model)
    new = {"forward": types.MethodType(_FORWARDS[task], peft_model)}
    if task == "CAUSAL_LM":
        # PEFT's generate installs peft_model.prepare_inputs_for_generation on the base model; the base
        # model's own one (which PEFT keeps) leaves the prefix out of the cache.
        new["prepare_inputs_for_generation"] = peft_model.__dict__.get("base_model_prepare_inputs_for_generation",
                                                                       base.prepare_inputs_for_generation)
    # PEFT's forward puts the prefix into past_key_values and offers no hook to route it elsewhere:
    # the PeftModel instance gets its own forward (its class untouched; restore_prefix puts PEFT's back)
    replaced = {}
    for name, value in new.items():
        replaced[name] = peft_model.__dict__.get(name, _MISSING)
        peft_model.__dict__[name] = value
    peft_model.__dict__[ACCELERATED_ATTR] = _Accelerated(adapter, base, replaced)
    return report(peft_model)


def restore_prefix(peft_model) -> nn.Module:
    """Undo ``accelerate_prefix``: PEFT's forward (prefix in ``past_key_values``) runs again, on the
    same (possibly trained) parameters."""
    if not is_accelerated(peft_model):
        raise ValueError(f"{type(peft_model).__name__} is not a PEFT prefix model accelerated by ptune_rt")
    if getattr(peft_model, "_adapters_disabled", False):
        raise ValueError("peft_model is inside disable_adapter(); leave it before ptune_rt.restore(peft_model)")
    rec = peft_model.__dict__.pop(ACCELERATED_ATTR)
    for name, old in rec.replaced.items():
        if old is _MISSING:
            peft_model.__dict__.pop(name, None)
        else:
            peft_model.__dict__[name] = old
    inject.remove_prefix(rec.base)
    return peft_model


def report(peft_model) -> list[dict]:
    """One row describing the accelerated prefix (columns shared with ``ptune_rt.report``)."""
    rec = peft_model.__dict__[ACCELERATED_ATTR]
    state = inject.prefix_state(rec.base)
    enc = state.encoder
    w = enc.embedding.weight
    backend, why = resolve_backend(state.config.backend, w.device)
    return [{"module": f"prompt_encoder.{rec.adapter}", "method": "prefix", "source": "peft", "adapter": rec.adapter,
             "in_features": w.shape[1], "out_features": enc.output_dim, "r": None, "scaling": None, "dropout": 0.0,
             "num_virtual_tokens": enc.num_virtual_tokens, "num_layers": enc.num_layers,
             "kv_heads": enc.num_kv_heads, "head_dim": enc.head_dim, "prefix_projection": enc.prefix_projection,
             "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device), "backend": backend, "why": why,
             "merged": False}]


BRIDGE = PeftBridge(kind="PEFT prefix-tuning / P-tuning v2 adapter", claims=is_peft_prefix_model,
                    accelerate=accelerate_prefix, is_accelerated=is_accelerated, restore=restore_prefix)
