"""Soft-prompt checkpoints (prompt tuning, P-tuning v1): what a model's soft prompt is on disk, and
how it goes back in.

PEFT's layout (``format="peft"``), as PEFT 0.21.2's ``save_pretrained`` writes it for a
``PromptTuningConfig`` / ``PromptEncoderConfig``::

    adapter_config.json        peft_type "PROMPT_TUNING" or "P_TUNING", num_virtual_tokens P,
                               token_dim (hidden size), num_transformer_submodules 1,
                               num_attention_heads, num_layers, inference_mode true, task_type,
                               modules_to_save; prompt tuning: prompt_tuning_init,
                               prompt_tuning_init_text, tokenizer_name_or_path, tokenizer_kwargs;
                               P-tuning: encoder_reparameterization_type ("MLP" / "LSTM"),
                               encoder_hidden_size, encoder_num_layers, encoder_dropout
    adapter_model.safetensors  prompt_embeddings [P, hidden]   the virtual tokens themselves
                               base_model.<head>.<param>       (modules_to_save, e.g. a classifier)

For P-tuning PEFT saves the encoder's *output* (``get_prompt_embedding_to_save``), not the
embedding table and MLP/LSTM weights, and loads such a file in inference mode as a plain table
that it uses as it is. So does this module: a PEFT checkpoint of either type loads as prompt
tuning (a table of P virtual tokens, method "prompt_tuning"), which gives the model exactly the
virtual tokens PEFT runs; a model whose soft prompt is computed by an encoder cannot take one.
PEFT has one prompt per adapter, placed before the input: a soft prompt with ``num_tasks > 1`` or
a P-tuning template other than ``"[P*n] {input}"`` cannot be written in PEFT's layout.

The own layout (``format="ptune"``) keeps every trainable parameter as it is (the embedding table,
the MLP / LSTM encoder weights, task-stacked ``[T, ...]`` for several tasks), so training can
resume, under ``prompt_encoder.<name>``; ``ptune_config.json`` holds the config (template and
anchors included) and a fingerprint of the base model: model type, hidden size, P, tasks, encoder
sizes, the template as token ids, and the ids of every text the config tokenizes, so loading
needs no tokenizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from ptune_rt.heads import head_modules
from ptune_rt.io import peft_config
from ptune_rt.io.common import (ENCODER_PREFIX, PROMPT_KEY, AdapterError, PromptLearningCheckpoint,
                                PromptLearningLoadPlan, check_loaded_tensors, collect_prompt_heads, config_from_ptune,
                                cpu_copy, flat_tensors_from_peft, int_field, model_class, model_type,
                                prompt_head_destinations, raise_problems, saved_model_and_heads,
                                with_checkpoint_heads)
from ptune_rt.methods.prompt import inject
from ptune_rt.methods.prompt.config import PromptTuningConfig, PTuningConfig, _tokenizer_to_dict
from ptune_rt.methods.prompt.encoders import PTuningEncoder, SoftPromptEmbedding
from ptune_rt.methods.prompt.forward import ADAPTER, MODULE_ATTR
from ptune_rt.methods.prompt.inject import is_prompt_model
from ptune_rt.methods.prompt.template import _encode, _resolve_tokenizer, parse_template, template_src

from ptune_rt.targets import module_view

#: own method name -> PEFT peft_type
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING"}
CONFIGS = {"prompt_tuning": PromptTuningConfig, "p_tuning": PTuningConfig}
#: Model attribute where ``apply_prompt`` keeps the config it applied.
_PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_PEFT_ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


# ----------------------------------------------------------------------------------------------
# Tokenized texts travel with the checkpoint
# ----------------------------------------------------------------------------------------------

class SavedTokens:
    """A stand-in tokenizer that knows the texts a soft-prompt config tokenized when its checkpoint
    was saved (template anchor text, the init text), so a loaded config works without the original
    tokenizer. ``name_or_path`` is the saved config's tokenizer name (or None)."""

    def __init__(self, name_or_path: Optional[str], entries: list[dict]):
        self.name_or_path = name_or_path
        self._ids = {(e["text"], bool(e["special"])): [int(i) for i in e["ids"]] for e in entries}

    def entries(self) -> list[dict]:
        return [{"text": t, "special": s, "ids": list(ids)} for (t, s), ids in self._ids.items()]

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        ids = self._ids.get((text, bool(add_special_tokens)))
        if ids is None:
            known = sorted({t for t, _ in self._ids})
            raise ValueError(f"the tokenizer restored from a checkpoint only knows the texts tokenized when it was "
                             f"saved ({known}), not {text!r} (add_special_tokens={add_special_tokens}); pass a real "
                             "tokenizer in the config")
        return {"input_ids": list(ids)}

    def __repr__(self) -> str:
        return f"SavedTokens(name_or_path={self.name_or_path!r}, texts={len(self._ids)})"


class _Recorder:
    """Wraps a tokenizer and records every text it tokenizes (as ``SavedTokens`` entries)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.entries: list[dict] = []

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        ids = _encode(self.tokenizer, text, add_special_tokens, "tokenizer text")
        entry = {"text": text, "special": bool(add_special_tokens), "ids": ids}
        if entry not in self.entries:
            self.entries.append(entry)
        return {"input_ids": ids}


def _template_src(config, tokenizer) -> list[int]:
    """The template (virtual token v as -(v + 1), anchor text as token ids) ``config`` gives."""
    if isinstance(config, PTuningConfig):
        pieces = parse_template(config.effective_template, config.num_virtual_tokens,
                                           config.anchors or {}, "PTuningConfig.template")
        before, after = template_src(pieces, tokenizer)
        return before + after
    return [-(v + 1) for v in range(config.num_virtual_tokens)]


def _has_text(config) -> bool:
    if isinstance(config, PTuningConfig):
        pieces = parse_template(config.effective_template, config.num_virtual_tokens,
                                           config.anchors or {}, "PTuningConfig.template")
        return any(kind == "text" for kind, _ in pieces)
    return False


# ----------------------------------------------------------------------------------------------
# The model's soft prompt
# ----------------------------------------------------------------------------------------------

def _forward(model: nn.Module):
    return model.__dict__["forward"]


def _encoder_dims(enc: nn.Module) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """(encoder kind, encoder hidden size, LSTM layers) of a soft-prompt module (None for a table)."""
    if not isinstance(enc, PTuningEncoder):
        return None, None, None
    if enc.encoder == "lstm":
        lstm = enc.lstm_head
        return "lstm", int(lstm.weight_hh_l0.shape[-1]), int(lstm.num_layers)
    return "mlp", int(enc.mlp_head[0].weight.shape[-2]), None


def _layout_of(model: nn.Module) -> dict[str, Any]:
    """What the model's soft prompt is: method, P, tasks, hidden size, encoder, template."""
    fwd = _forward(model)
    enc = fwd.encoder
    kind, h, layers = _encoder_dims(enc)
    weight = model.get_input_embeddings().weight
    return {"method": fwd.method, "num_virtual_tokens": enc.num_virtual_tokens, "num_tasks": fwd.num_tasks,
            "hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]), "encoder": kind,
            "encoder_hidden_size": h, "encoder_num_layers": layers,
            "template": [int(t) for t in enc.template_src.tolist()], "before_input": int(fwd.A)}


def _is_front(layout: dict) -> bool:
    """All virtual tokens before the input, in order, and nothing else: PEFT's placement."""
    P = layout["num_virtual_tokens"]
    return layout["before_input"] == P and layout["template"] == [-(v + 1) for v in range(P)]


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@dataclasses.dataclass(kw_only=True)
class PromptCheckpoint(PromptLearningCheckpoint):
    """A model's soft prompt, ready to be written. ``prompt_embeddings``: the virtual tokens [P, hidden]
    ([T, P, hidden] for T tasks)."""

    method: str
    config: Any                                 # PromptTuningConfig / PTuningConfig
    layout: dict                                # see _layout_of
    tokens: list[dict]                          # texts the config tokenizes, with their ids

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        lay = {k: v for k, v in self.layout.items() if k != "method"}
        return {"model": {"model_type": model_type(model), "class": model_class(model)},
                "prompt": {**lay, "tokens": self.tokens}, "modules_to_save": list(self.heads)}


def _record_tokens(config, layout: dict) -> list[dict]:
    """Every text ``config`` tokenizes, with its ids, checked against the model's template."""
    needs_template = _has_text(config)
    needs_init = isinstance(config, PromptTuningConfig) and config.init == "text"
    if not (needs_template or needs_init):
        return []
    what = f"{type(config).__name__}.tokenizer"
    try:
        recorder = _Recorder(_resolve_tokenizer(config.tokenizer, what))
    except ValueError as e:
        if needs_template:
            raise AdapterError(f"cannot record the token ids of the template's anchor text: {e}") from None
        return []  # the init text only mattered for initialisation: the weights are saved
    if needs_template:
        try:
            got = _template_src(config, recorder)
        except ValueError as e:
            raise AdapterError(f"cannot record the token ids of the template's anchor text: {e}") from None
        if got != layout["template"]:
            raise AdapterError(f"the template's anchor text tokenizes to {got} with {what} now, but the model's "
                               f"soft prompt was built as {layout['template']}; expected the tokenizer the prompt "
                               "was applied with")
    if needs_init:
        try:
            recorder(config.init_text, True)
        except ValueError:
            pass
    return recorder.entries


def make_handler(method: str):
    """The checkpoint hooks of one soft-prompt method (see ``ptune_rt.io.adapters``)."""
    return _Handler(method)


class _Handler:
    def __init__(self, method: str):
        self.METHOD, self.PEFT_TYPE = method, PEFT_TYPES[method]

    def has_adapter(self, model: nn.Module) -> bool:
        return is_prompt_model(model) and _forward(model).method == self.METHOD

    def collect(self, model, adapter_name, head_names, heads_required, hint=None) -> PromptCheckpoint:
        return collect(model, adapter_name, head_names, heads_required)

    def to_peft(self, state, model, task_type):
        return to_peft(state, model, task_type)

    def spec_from_peft(self, d, source, backend):
        return spec_from_peft(d, source, backend, self.PEFT_TYPE)

    def tensors_from_peft(self, raw, weights_file):
        return flat_tensors_from_peft(raw, weights_file, self.PEFT_TYPE.lower().replace("_", "-"))

    def spec_from_ptune(self, d, source, backend):
        return spec_from_ptune(d, source, backend, self.METHOD)

    def refuse_peft_model(self, model):
        refuse_peft_model(model)

    def plan_load(self, model, spec, tensors, *, adapter_name, file_key, weights_file, hint=None):
        return plan_load(model, spec, tensors, adapter_name=adapter_name, file_key=file_key,
                         weights_file=weights_file)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def collect(model: nn.Module, adapter_name: Optional[str], head_names: list[str], heads_required: bool
            ) -> PromptCheckpoint:
    """The soft prompt of ``model`` (and its heads), validated."""
    if adapter_name not in (None, ADAPTER):
        raise AdapterError(f"adapter_name={adapter_name!r}: a soft prompt has one adapter ({ADAPTER!r}); pass None")
    fwd = _forward(model)
    st = inject.prompt_state(model)
    config = st.config if st is not None else None
    if not isinstance(config, CONFIGS[fwd.method]):
        raise AdapterError(f"{model_class(model)} carries a {fwd.method} soft prompt but not the config it was applied "
                           "with; expected a model from ptune_rt.apply")
    layout = _layout_of(model)
    enc = fwd.encoder
    with torch.no_grad():
        if isinstance(enc, PTuningEncoder):
            with _eval_mode(enc):  # the encoder's output as inference computes it (no dropout)
                e = enc.encode()
        else:
            e = enc.prompts()
        prompt = cpu_copy(e)
    if not heads_required:  # "auto": the task heads, and the modules the config trains whole
        trained = head_modules(model, config.modules_to_save, type(config).__name__, MODULE_ATTR)
        head_names = list(dict.fromkeys(list(head_names) + trained))
    heads, used, head_tensors = collect_prompt_heads(model, module_view(model), head_names, heads_required)
    return PromptCheckpoint(method=fwd.method, config=config, layout=layout, tokens=_record_tokens(config, layout),
                            encoder_tensors=PromptCheckpoint.encoder_copies(enc), prompt_embeddings=prompt,
                            heads=heads, head_names=used, head_tensors=head_tensors)


def _model_counts(model: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(num_attention_heads, num_layers) as PEFT reads them from the model config."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*names):
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None
    return first("num_attention_heads", "n_head", "num_heads"), first("num_hidden_layers", "num_layers", "n_layer")


def to_peft(state: PromptCheckpoint, model: nn.Module, task_type: Optional[str]) -> tuple[dict, dict]:
    """(``adapter_config.json`` contents, ``adapter_model.safetensors`` tensors) as PEFT writes them."""
    lay, cfg = state.layout, state.config
    peft_type = PEFT_TYPES[state.method]
    if lay["num_tasks"] > 1:
        raise AdapterError(f"the soft prompt has num_tasks={lay['num_tasks']} task prompts, but PEFT's {peft_type} "
                           "holds one prompt per adapter, so it cannot be written in PEFT's layout; save it with "
                           "format='ptune'")
    if not _is_front(lay):
        raise AdapterError(f"the P-tuning template {cfg.effective_template!r} places virtual tokens or anchor text "
                           "elsewhere than all before the input, but PEFT always puts the prompt first "
                           "('[P*n] {input}'), so it cannot be written in PEFT's layout; save it with format='ptune'")
    heads_n, layers_n = _model_counts(model)
    if state.method == "prompt_tuning":
        # PEFT's config insists on a tokenizer name with TEXT; without one the (spent) init is written as RANDOM
        tok_name = _tokenizer_to_dict(cfg.tokenizer) if cfg.init == "text" else None
        init = _PEFT_INITS[cfg.init] if cfg.init != "text" or tok_name else "RANDOM"
        fields = {"prompt_tuning_init": init, "prompt_tuning_init_text": cfg.init_text if init == "TEXT" else None,
                  "tokenizer_name_or_path": tok_name if init == "TEXT" else None, "tokenizer_kwargs": None}
    else:
        fields = {"encoder_reparameterization_type": _PEFT_ENCODERS[lay["encoder"]],
                  "encoder_hidden_size": lay["encoder_hidden_size"],
                  "encoder_num_layers": int(cfg.encoder_num_layers), "encoder_dropout": float(cfg.encoder_dropout)}
    return peft_config.peft_prompt_learning_export(
        model, peft_type, task_type, num_virtual_tokens=lay["num_virtual_tokens"], token_dim=lay["hidden_size"],
        num_attention_heads=heads_n, num_layers=layers_n, head_names=state.head_names,
        prompt_embeddings=state.prompt_embeddings, head_tensors=state.head_tensors, **fields)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PromptSpec:
    """A soft-prompt checkpoint's description, whatever the file format."""

    source: str                            # the config file (for messages)
    method: str                            # the method the model gets ("prompt_tuning" / "p_tuning")
    config: Any                            # the config a model without a soft prompt gets
    flat: bool                             # PEFT's layout: one prompt_embeddings table [P, hidden]
    peft_type: Optional[str] = None        # PEFT format: the file's peft_type
    hidden: Optional[int] = None           # declared hidden size (PEFT's token_dim / the fingerprint)
    layout: Optional[dict] = None          # own format: the saved model's _layout_of
    model_type: Optional[str] = None
    model_class: Optional[str] = None
    heads: list[str] = dataclasses.field(default_factory=list)
    heads_exact: bool = False              # heads are exact module names (own format), not PEFT suffixes


def spec_from_peft(d: dict, source: str, backend: Optional[str], peft_type: str) -> PromptSpec:
    """A PromptSpec from PEFT's ``adapter_config.json`` dict for PROMPT_TUNING / P_TUNING."""
    P = int_field(d, "num_virtual_tokens", source)
    submodules = d.get("num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise AdapterError(f"{source}: num_transformer_submodules={submodules!r} (an encoder-decoder prompt) is not "
                           "supported; expected 1")
    hidden = int_field(d, "token_dim", source, required=False)
    task = d.get("task_type")
    if task is not None and task not in peft_config.TASK_TYPES:
        raise AdapterError(f"{source}: task_type {task!r} is not one of {peft_config.TASK_TYPES}")
    if peft_type == "P_TUNING":
        kind = d.get("encoder_reparameterization_type", "MLP")
        if kind not in _PEFT_ENCODERS.values():
            raise AdapterError(f"{source}: encoder_reparameterization_type {kind!r} is not one of "
                               f"{tuple(_PEFT_ENCODERS.values())}")
    try:
        config = PromptTuningConfig(P, backend=backend or "auto")
    except ValueError as e:
        raise AdapterError(f"{source}: {e}") from None
    return PromptSpec(source=source, method="prompt_tuning", config=config, flat=True, peft_type=peft_type,
                      hidden=hidden, heads=peft_config.peft_task_heads(d, source))


def _int_list(v, what: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise AdapterError(f"{what} must be a list of integers, got {v!r}")
    return list(v)


def spec_from_ptune(d: dict, source: str, backend: Optional[str], method: str) -> PromptSpec:
    """A PromptSpec from the own format's ``ptune_config.json`` dict."""
    cls = CONFIGS[method]
    fp = d.get("prompt")
    if not isinstance(fp, dict):
        raise AdapterError(f"{source}: 'prompt' must be an object {{num_virtual_tokens, num_tasks, hidden_size, "
                           f"vocab_size, encoder, encoder_hidden_size, encoder_num_layers, template, before_input, "
                           f"tokens}}, got {fp!r}")
    where = f"{source}: prompt"
    tokens = fp.get("tokens", [])
    if not isinstance(tokens, list) or not all(
            isinstance(e, dict) and isinstance(e.get("text"), str) and isinstance(e.get("special"), bool)
            for e in tokens):
        raise AdapterError(f"{where}.tokens must be a list of {{text, special, ids}} objects, got {tokens!r}")
    for e in tokens:
        _int_list(e.get("ids"), f"{where}.tokens[{e['text']!r}].ids")
    cfg = d.get("config")
    name = cfg.get("tokenizer") if isinstance(cfg, dict) else None
    tokenizer = SavedTokens(name if isinstance(name, str) else None, tokens) if tokens or name is not None else None
    config = config_from_ptune(d, source, backend, cls, method, lambda c: cls.from_dict(c, tokenizer=tokenizer))
    layout = {"method": method,
              "num_virtual_tokens": int_field(fp, "num_virtual_tokens", where),
              "num_tasks": int_field(fp, "num_tasks", where),
              "hidden_size": int_field(fp, "hidden_size", where),
              "vocab_size": int_field(fp, "vocab_size", where, required=False),
              "encoder": fp.get("encoder"),
              "encoder_hidden_size": int_field(fp, "encoder_hidden_size", where, required=method == "p_tuning"),
              "encoder_num_layers": int_field(fp, "encoder_num_layers", where, required=False),
              "template": _int_list(fp.get("template"), f"{where}.template"),
              "before_input": int_field(fp, "before_input", where, minimum=0)}
    want_kind = config.encoder if method == "p_tuning" else None
    if layout["encoder"] != want_kind:
        raise AdapterError(f"{where}.encoder is {layout['encoder']!r}, but config.encoder is {want_kind!r}")
    for key in ("num_virtual_tokens", "num_tasks"):
        if layout[key] != getattr(config, key):
            raise AdapterError(f"{where}.{key}={layout[key]} but config.{key}={getattr(config, key)}")
    if method == "p_tuning":
        h = config.encoder_hidden_size or layout["hidden_size"]
        if layout["encoder_hidden_size"] != h:
            raise AdapterError(f"{where}.encoder_hidden_size={layout['encoder_hidden_size']} but the config gives "
                               f"{h} (config.encoder_hidden_size={config.encoder_hidden_size}, hidden_size="
                               f"{layout['hidden_size']})")
        if config.encoder == "lstm" and layout["encoder_num_layers"] != config.encoder_num_layers:
            raise AdapterError(f"{where}.encoder_num_layers={layout['encoder_num_layers']} but "
                               f"config.encoder_num_layers={config.encoder_num_layers}")
    try:
        template = _template_src(config, tokenizer)
    except ValueError as e:
        raise AdapterError(f"{source}: cannot rebuild the template from the saved token ids: {e}") from None
    if template != layout["template"] or not 0 <= layout["before_input"] <= len(template):
        raise AdapterError(f"{where}.template={layout['template']} (before_input={layout['before_input']}) does not "
                           f"match the template the config gives with the saved token ids ({template})")
    mtype, mclass, heads = saved_model_and_heads(d, source)
    return PromptSpec(source=source, method=method, config=config, flat=False, hidden=layout["hidden_size"],
                      layout=layout, model_type=mtype, model_class=mclass, heads=heads,
                      heads_exact=True)


def _describe(lay: dict) -> str:
    s = f"P={lay['num_virtual_tokens']}, num_tasks={lay['num_tasks']}, hidden size {lay['hidden_size']}"
    if lay.get("encoder"):
        s += f", {lay['encoder']} encoder_hidden_size={lay['encoder_hidden_size']}"
    return s


def _shape_encoder(spec: PromptSpec, hidden: int, dtype: torch.dtype) -> nn.Module:
    """A parameter-free (meta) encoder of the spec's shapes: the names and shapes a fresh model gets."""
    cfg = spec.config
    if spec.method == "prompt_tuning":
        return SoftPromptEmbedding(cfg.num_tasks, cfg.num_virtual_tokens, hidden, device="meta", dtype=dtype)
    return PTuningEncoder(cfg.num_tasks, cfg.num_virtual_tokens, hidden, cfg.encoder,
                          cfg.encoder_hidden_size or hidden, cfg.encoder_num_layers, cfg.encoder_dropout,
                          device="meta", dtype=dtype)


def _model_problems(model: nn.Module, spec: PromptSpec, existing: Optional[dict], V: int, H: int) -> list[str]:
    """What keeps the checkpoint out of this model: another base model's sizes or vocabulary, or a
    soft prompt already there that the checkpoint does not match."""
    cls = model_class(model)
    P, T = spec.config.num_virtual_tokens, spec.config.num_tasks
    problems: list[str] = []
    if spec.hidden is not None and spec.hidden != H:
        declared = "token_dim" if spec.flat else "hidden_size in its fingerprint"
        problems.append(f"hidden size mismatch: the checkpoint's virtual tokens are {spec.hidden} wide ({declared}="
                        f"{spec.hidden}), this {cls}'s input embeddings are {H} wide: the adapter was made for another "
                        "base model")
    if spec.layout is not None:
        bad = sorted({t for t in spec.layout["template"] if t >= V})
        if bad:
            problems.append(f"the template's anchor text has token ids {bad} outside this {cls}'s vocabulary [0, {V}): "
                            "the adapter was made for another base model")
    if existing is not None:
        restore = "; ptune_rt.restore(model) first to load it fresh"
        if existing["method"] != spec.method:
            if spec.flat:
                problems.append(f"the checkpoint ({spec.peft_type}) holds the virtual tokens themselves (PEFT's "
                                "prompt_embeddings), but this model computes its virtual tokens with a P-tuning "
                                "encoder; ptune_rt.restore(model) first to load them as a plain prompt table")
            else:
                problems.append(f"the checkpoint is a {spec.method} soft prompt, the model carries a "
                                f"{existing['method']} one{restore}")
        else:
            if existing["num_virtual_tokens"] != P:
                problems.append(f"the checkpoint has num_virtual_tokens={P}, the model's soft prompt has "
                                f"{existing['num_virtual_tokens']}{restore}")
            if existing["num_tasks"] != T:
                problems.append(f"the checkpoint has num_tasks={T}, the model's soft prompt has "
                                f"{existing['num_tasks']}{restore}")
            if spec.layout is not None and (existing["template"], existing["before_input"]) != \
                    (spec.layout["template"], spec.layout["before_input"]):
                problems.append(f"the checkpoint's template is {spec.layout['template']} (before_input="
                                f"{spec.layout['before_input']}), the model's {existing['template']} (before_input="
                                f"{existing['before_input']}){restore}")
            if spec.layout is not None and existing["encoder"] != spec.layout["encoder"]:
                problems.append(f"the checkpoint's encoder is {spec.layout['encoder']!r}, the model's "
                                f"{existing['encoder']!r}{restore}")
            elif spec.layout is not None and existing["encoder_hidden_size"] != spec.layout["encoder_hidden_size"]:
                problems.append(f"the checkpoint's encoder has encoder_hidden_size="
                                f"{spec.layout['encoder_hidden_size']}, the model's "
                                f"{existing['encoder_hidden_size']}{restore}")
    elif hasattr(model, MODULE_ATTR):
        problems.append(inject.occupied_message(model))
    return problems


def plan_load(model: nn.Module, spec: PromptSpec, tensors: dict[str, torch.Tensor], *, adapter_name: Optional[str],
              file_key: Callable[[str], str], weights_file: str) -> PromptLearningLoadPlan:
    """Check ``tensors`` and ``spec`` against ``model``; raise AdapterError naming every problem, or
    return the plan that loads them."""
    cls = model_class(model)
    header = f"cannot load the soft prompt of {spec.source} into this {cls}:"
    if adapter_name not in (None, ADAPTER):
        raise AdapterError(f"{header} adapter_name={adapter_name!r}: a soft prompt has one adapter; pass None")
    mtype = model_type(model)
    if spec.model_type is not None and mtype is not None and spec.model_type != mtype:
        raise AdapterError(f"{spec.source}: the adapter was saved for model_type {spec.model_type!r} "
                           f"({spec.model_class}), this model is {mtype!r} ({cls})")
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
        raise AdapterError(f"{header} {cls} has no input embeddings (get_input_embeddings()); expected a Hugging "
                           "Face model")
    V, H = (int(n) for n in emb.weight.shape)
    cfg = spec.config
    P, T = cfg.num_virtual_tokens, cfg.num_tasks
    existing = _layout_of(model) if is_prompt_model(model) else None
    raise_problems(header, _model_problems(model, spec, existing, V, H))

    # The keys: the table (PEFT) or the encoder's parameters (own format), and whole heads.
    if existing is not None:
        shaper = _forward(model).encoder
        what = f"(this model's soft prompt: {_describe(existing)})"
    else:
        shaper = _shape_encoder(spec, H, inject._adapter_dtype(emb.weight))
        what = f"({_describe(spec.layout or {'num_virtual_tokens': P, 'num_tasks': T, 'hidden_size': H})})"
    expected: dict[str, tuple[int, ...]] = {}
    why: dict[str, str] = {}
    encoder_keys: dict[str, str] = {}
    if spec.flat:
        expected[PROMPT_KEY] = (P, H)
        why[PROMPT_KEY] = f"[P, hidden] = [{P}, {H}]"
        encoder_keys[PROMPT_KEY] = "embedding.weight"
    else:
        for name, p in shaper.named_parameters():
            expected[ENCODER_PREFIX + name] = tuple(p.shape)
            why[ENCODER_PREFIX + name] = what
            encoder_keys[ENCODER_PREFIX + name] = name

    view = module_view(model)
    problems: list[str] = []
    destinations = prompt_head_destinations(view, spec.heads, spec.heads_exact, tensors, cls, problems)
    for k, t in destinations.items():
        expected[k] = tuple(t.shape)
        why[k] = "(this model's tensor)"
    check_loaded_tensors(expected, why, tensors, view, cls, file_key, problems)
    raise_problems(f"cannot load {weights_file} into this {cls}:", problems)

    apply_config = final_config = None
    if existing is None:
        if not spec.heads_exact:  # PEFT's file: its modules_to_save train (the own format's config says)
            cfg = with_checkpoint_heads(cfg, view, spec.heads, False)
        final_config = cfg
        apply_config = dataclasses.replace(cfg, init="random", init_text=None) \
            if isinstance(cfg, PromptTuningConfig) and cfg.init == "text" else cfg
    apply = None if apply_config is None else functools.partial(_apply_for_load, apply_config=apply_config,
                                                                final_config=final_config)
    return PromptLearningLoadPlan(model, "soft prompt", spec.source, apply, is_prompt_model, inject.remove_prompt,
                                  lambda m: _forward(m).encoder,
                                  [(name, tensors[k]) for k, name in encoder_keys.items()],
                                  [(dst, tensors[k]) for k, dst in destinations.items()])


def _apply_for_load(model: nn.Module, apply_config, final_config) -> None:
    """The soft prompt a fresh load puts in; the model records the checkpoint's own config."""
    with torch.random.fork_rng(devices=[]):  # parameters overwritten by the load: leave the caller's RNG alone
        inject.apply_prompt(model, apply_config)
    inject.prompt_state(model).config = final_config


__all__ = ["PEFT_TYPES", "PromptCheckpoint", "PromptSpec", "SavedTokens", "make_handler"]


def refuse_peft_model(model: nn.Module) -> None:
    """A PEFT soft-prompt model runs its prompt through PEFT's own forward, out of ptune_rt's reach."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and callable(getattr(model, "get_base_model", None)):
        for cfg in configs.values():
            kind = getattr(cfg, "peft_type", None)
            kind = str(getattr(kind, "value", kind))
            if kind in PEFT_TYPES.values():
                raise AdapterError(f"{model_class(model)} is a PEFT {kind} model that PEFT runs itself: use its "
                                   "save_pretrained / from_pretrained; to run the soft prompt with ptune-rt, load "
                                   "its checkpoint into the plain base model: ptune_rt.load_adapter(base_model, path)")
