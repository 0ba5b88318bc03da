"""How a soft prompt goes into a Hugging Face model and out again: ``apply_prompt`` /
``remove_prompt`` (the instance's forward and generate are replaced, never the class)."""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional

import torch
from torch import nn

from ptune_rt import state as model_state
from ptune_rt.heads import head_modules
from ptune_rt.methods.prompt.config import PromptTuningConfig, PTuningConfig
from ptune_rt.methods.prompt.encoders import PTuningEncoder, SoftPromptEmbedding
from ptune_rt.methods.prompt.forward import ADAPTER, MODULE_ATTR, PromptForward, PromptGenerate
from ptune_rt.methods.prompt.template import _encode, _resolve_tokenizer, parse_template, template_src
from ptune_rt.ops.backend import resolve_backend


def is_prompt_model(model: nn.Module) -> bool:
    """Whether ``model`` carries a soft prompt from ``apply_prompt``."""
    return isinstance(getattr(model, "__dict__", {}).get("forward"), PromptForward)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def occupied_message(model: nn.Module) -> str:
    """Why a model that already has a ``prompt_encoder`` attribute cannot take a soft prompt. A ptune-rt
    prefix keeps its ``PrefixEncoder`` there (recognised by class name: methods do not import each other)."""
    held = getattr(model, MODULE_ATTR, None)
    held = held[ADAPTER] if isinstance(held, nn.ModuleDict) and ADAPTER in held else held
    if type(held).__name__ == "PrefixEncoder":
        return (f"model already has a {MODULE_ATTR!r} module: the model already carries a ptune-rt prefix, and a soft "
                "prompt and a prefix do not combine on one model: ptune_rt.restore(model) first")
    return (f"model already has a {MODULE_ATTR!r} attribute (a PEFT prompt-learning model?); expected a plain "
            "Hugging Face model")


@dataclasses.dataclass
class PromptModelState:
    """What a model carrying a soft prompt records (``ptune_rt.state``, under the method's name): the
    config it was applied or loaded with, and the requires_grad flags from before ``apply_prompt``."""

    config: object
    requires_grad: dict


def prompt_state(model: nn.Module) -> Optional[PromptModelState]:
    if not is_prompt_model(model):
        return None
    return model_state.get(model, model.__dict__["forward"].method)


@dataclasses.dataclass
class _Layout:
    """A checked soft prompt for one model: the template's source map before / after the input,
    the token ids of a text init, and the modules trained beside the prompt."""

    before: list
    after: list
    init_ids: Optional[torch.Tensor]
    heads: list


def _check_model(model: nn.Module, config) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
    if not isinstance(config, (PromptTuningConfig, PTuningConfig)):
        raise TypeError(f"config must be a PromptTuningConfig or PTuningConfig, got {type(config).__name__}")
    config.validate()
    if is_prompt_model(model):
        raise ValueError("model already carries a ptune-rt soft prompt; call ptune_rt.methods.prompt.remove_prompt"
                         "(model) first")
    if hasattr(model, MODULE_ATTR):
        raise ValueError(occupied_message(model))
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; soft prompts at the input support "
                         "decoder-only and encoder-only models")
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); expected a "
                         "Hugging Face model")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no inputs_embeds; soft prompts need it")
    device = model.get_input_embeddings().weight.device
    try:
        resolve_backend(config.backend, device)
    except RuntimeError as e:
        raise ValueError(f"{type(config).__name__}.backend={config.backend!r} cannot run on {device}: {e}") from None


def _plan_layout(model: nn.Module, config) -> _Layout:
    """Everything ``apply_prompt`` needs that can fail (anchor text and a text init tokenized, the
    position limit, the heads), checked before any change."""
    V = model.get_input_embeddings().weight.shape[0]
    P = config.num_virtual_tokens
    if isinstance(config, PTuningConfig):
        pieces = parse_template(config.effective_template, P, config.anchors or {}, "PTuningConfig.template")
        tok = _resolve_tokenizer(config.tokenizer, "PTuningConfig.tokenizer") \
            if any(k == "text" for k, _ in pieces) else None
        before, after = template_src(pieces, tok)
    else:
        before, after = [-(v + 1) for v in range(P)], []
    bad = [t for t in before + after if t >= V]
    if bad:
        raise ValueError(f"the template's anchor text tokenizes to ids {bad} outside the model's vocabulary "
                         f"[0, {V}); expected the model's own tokenizer")
    E = len(before) + len(after)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and E >= limit:
        raise ValueError(f"the soft prompt / template takes {E} positions, leaving no room for input within the "
                         f"model's position limit max_position_embeddings={limit}; expected fewer virtual tokens")
    init_ids = None
    if isinstance(config, PromptTuningConfig) and config.init == "text":
        tok = _resolve_tokenizer(config.tokenizer, "PromptTuningConfig.tokenizer")
        ids = _encode(tok, config.init_text, True, "PromptTuningConfig.init_text")
        ids = (ids * math.ceil(P / len(ids)))[:P]  # repeated or cut to P tokens, as PEFT does
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"PromptTuningConfig.init_text tokenizes to ids {bad} outside the model's vocabulary "
                             f"[0, {V}); expected the model's own tokenizer")
        init_ids = torch.tensor(ids, dtype=torch.long)
    heads = head_modules(model, config.modules_to_save, type(config).__name__, MODULE_ATTR)
    return _Layout(before, after, init_ids, heads)


def _build_prompt_module(model: nn.Module, config, layout: _Layout) -> nn.Module:
    """The soft prompt's module, initialised as ``config`` says, with its template source map."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    V, H = weight.shape
    T, P = config.num_tasks, config.num_virtual_tokens
    kw = dict(device=weight.device, dtype=_adapter_dtype(weight))
    if isinstance(config, PromptTuningConfig):
        module = SoftPromptEmbedding(T, P, H, **kw)
        with torch.no_grad():
            if config.init == "vocab":
                sample = torch.randint(0, V, (T * P,), dtype=torch.long).to(weight.device)
                module.embedding.weight.copy_(emb(sample).detach().reshape(module.embedding.weight.shape))
            elif config.init == "text":
                rows = emb(layout.init_ids.to(weight.device)).detach()
                module.embedding.stacked().copy_(rows.unsqueeze(0).expand(T, P, H))
    else:
        module = PTuningEncoder(T, P, H, config.encoder, config.encoder_hidden_size or H, config.encoder_num_layers,
                                config.encoder_dropout, **kw)
    module.register_buffer("template_src", torch.tensor(layout.before + layout.after, dtype=torch.long,
                                                        device=weight.device), persistent=False)
    module.train(model.training)
    return module


def apply_prompt(model: nn.Module, config) -> nn.Module:
    """Give ``model`` (in place) the soft prompt of ``config``, freeze everything else, return it.

    Afterwards exactly the prompt parameters (``prompt_encoder.default.*``) and the modules of
    ``config.modules_to_save`` (by default a classification / QA model's task head) train. Every
    check runs before the first change; the previous requires_grad flags are kept for ``remove_prompt``.
    """
    _check_model(model, config)
    layout = _plan_layout(model, config)
    module = _build_prompt_module(model, config, layout)
    # nothing below can fail on a validated model
    A, E = len(layout.before), len(layout.before) + len(layout.after)
    fwd = PromptForward(model, model.__dict__.get("forward"), config.METHOD, config.backend, A, E, config.num_tasks,
                        has_text=any(t >= 0 for t in layout.before + layout.after),
                        peft_placement=config.placement == "peft")
    gen = PromptGenerate(model, model.__dict__.get("generate")) if callable(getattr(model, "generate", None)) \
        else None
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in layout.heads:  # the task head trains with the prompt, as PEFT's modules_to_save
        model.get_submodule(name).requires_grad_(True)
    setattr(model, MODULE_ATTR, nn.ModuleDict({ADAPTER: module}))
    model_state.record(model, config.METHOD, PromptModelState(config, before_flags))
    # input_ids become inputs_embeds (and masks, positions, labels are laid out) before the model runs,
    # with task_ids accepted: no transformers hook rewrites a forward's arguments, so the instance's
    # forward wraps the model's own (the class is untouched)
    model.__dict__["forward"] = fwd
    if gen is not None:
        model.__dict__["generate"] = gen
    return model


def remove_prompt(model: nn.Module) -> nn.Module:
    """Undo ``apply_prompt``: the model's own forward comes back, the prompt module goes, and the
    previous requires_grad flags return. Returns the model."""
    if not is_prompt_model(model):
        raise ValueError(f"{type(model).__name__} carries no ptune-rt soft prompt; expected a model from "
                         "ptune_rt.apply(model, PromptTuningConfig(...) or PTuningConfig(...))")
    st = prompt_state(model)
    method = model.__dict__["forward"].method
    for name, wrapper_type in (("forward", PromptForward), ("generate", PromptGenerate)):
        wrapper = model.__dict__.get(name)
        if isinstance(wrapper, wrapper_type):
            if wrapper.prev is None:
                del model.__dict__[name]
            else:
                model.__dict__[name] = wrapper.prev
    delattr(model, MODULE_ATTR)
    flags = st.requires_grad if st is not None else {}
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    model_state.forget(model, method)
    return model


def prompt_report(model: nn.Module) -> dict:
    """What the soft prompt of ``model`` is and which backend builds its inputs, and why."""
    if not is_prompt_model(model):
        raise ValueError(f"{type(model).__name__} carries no ptune-rt soft prompt")
    fwd = model.__dict__["forward"]
    enc = fwd.encoder
    backend, why = resolve_backend(fwd.backend, model.get_input_embeddings().weight.device)
    return {"method": fwd.method, "num_virtual_tokens": enc.num_virtual_tokens, "num_tasks": fwd.num_tasks,
            "template_tokens": fwd.E, "before_input": fwd.A,
            "encoder": getattr(enc, "encoder", None), "backend": backend, "why": why,
            "trainable_parameters": sum(p.numel() for p in enc.parameters() if p.requires_grad)}


