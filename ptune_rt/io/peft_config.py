"""PEFT's ``adapter_config.json``: the fields shared by every method, and LoRA's (writing one PEFT
loads, reading one into a LoRA spec). Prefix tuning's fields live in ``ptune_rt.io.prefix``, prompt
tuning's and P-tuning's in ``ptune_rt.io.prompt``.

PEFT itself is not imported: the JSON is written and read here, field by field, so checkpoints
work with or without PEFT installed. Written fields are those of PEFT's ``LoraConfig`` (present
since PEFT 0.14), with the values PEFT's own ``save_pretrained`` writes for the same adapter.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ptune_rt.methods._config import check_bool, check_int, check_number, check_regex
from ptune_rt.methods.lora import LoRAConfig

from .common import PEFT_HEAD_PREFIX, PROMPT_KEY, AdapterError, name_list

#: Prefix of every LoRA key in a PEFT checkpoint (the PeftModel -> LoraModel -> base model path).
PEFT_KEY_PREFIX = "base_model.model."
#: PEFT types this package loads (each maps to one of its methods).
SUPPORTED_PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: Heads PEFT's task wrappers always train and save (``modules_to_save``) for these task types.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}

#: LoRA init modes that change the base weights (PiSSA, OLoRA, CorDA, LoftQ): such an adapter only
#: fits the base model as modified at init, which is not what a user loads it into.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

_SUFFIX_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                 ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                 ("ForQuestionAnswering", "QUESTION_ANS"))


def infer_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type for a transformers model class, or None when there is none."""
    cls = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto as auto
        tables = (("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                  ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                  ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                  ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
                  ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
                  ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"))
        for task, table in tables:
            for value in getattr(auto, table, {}).values():
                if cls == value or isinstance(value, (tuple, list)) and cls in value:
                    return task
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for suffix, task in _SUFFIX_TASKS:
        if cls.endswith(suffix):
            return task
    return None


def name_or_path(model: nn.Module) -> Optional[str]:
    value = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(value) if value else None


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def auto_mapping(model: nn.Module, task_type: Optional[str]) -> Optional[dict[str, str]]:
    """PEFT's ``auto_mapping`` field: the base model class, written only without a task type."""
    if task_type is not None:
        return None
    cls = type(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def lora_to_peft(config: LoRAConfig, model: nn.Module, task_type: Optional[str], fan_in_fan_out: bool,
                 modules_to_save: Optional[list[str]]) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT writes for this LoRA adapter."""
    init = {"default": True, "gaussian": "gaussian"}.get(config.init, True)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": auto_mapping(model, task_type),
        "base_model_name_or_path": name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": config.target_modules,
        "exclude_modules": None,
        "bias": config.bias,
        "use_rslora": bool(config.use_rslora),
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "init_lora_weights": init,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }


def _unsupported_features(d: dict) -> list[str]:
    """Settings of a PEFT LoraConfig this package's LoRA cannot reproduce (empty: all fine)."""
    out = []

    def set_(key, ok=lambda v: not v):
        if key in d and not ok(d[key]):
            out.append(f"{key}={d[key]!r}")

    set_("use_dora")
    set_("lora_bias")
    set_("rank_pattern")
    set_("alpha_pattern")
    set_("layers_to_transform", lambda v: v is None)
    set_("layers_pattern", lambda v: v is None or v == [] or v == "")
    set_("layer_replication", lambda v: v is None)
    set_("target_parameters")
    set_("trainable_token_indices", lambda v: v is None)
    set_("use_qalora")
    set_("alora_invocation_tokens", lambda v: v is None)
    set_("use_bdlora")
    set_("arrow_config", lambda v: v is None)
    set_("megatron_config", lambda v: v is None)
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        out.append(f"init_lora_weights={init!r} (the adapter only fits the base weights as modified at init; "
                   "convert it to a plain LoRA adapter with PEFT's save_pretrained("
                   "path_initial_model_for_weight_conversion=...) first)")
    return out


def peft_task_heads(d: dict, source: str) -> list[str]:
    """``modules_to_save`` of a PEFT config plus the heads its task wrapper adds."""
    heads = name_list(d, "modules_to_save", source)
    for h in TASK_HEADS.get(d.get("task_type"), []):
        if h not in heads:
            heads.append(h)
    return heads


def read_lora_config(d: dict, source: str, backend: str) -> tuple[LoRAConfig, Any]:
    """(LoRAConfig, exclude_modules) from a PEFT LoRA ``adapter_config.json`` dict."""
    bad = _unsupported_features(d)
    if bad:
        raise AdapterError(f"{source}: this PEFT LoRA adapter uses settings ptune_rt's LoRA does not support: "
                           f"{', '.join(bad)}")
    tm = d.get("target_modules")
    if isinstance(tm, (list, tuple, set)):
        tm = sorted(tm) if isinstance(tm, set) else list(tm)
    elif tm is not None and not isinstance(tm, str):
        raise AdapterError(f"{source}: target_modules must be a list of names, a regex string or null, got {tm!r}")
    exclude = d.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or isinstance(exclude, (list, tuple)) and all(
            isinstance(e, str) and e for e in exclude)):
        raise AdapterError(f"{source}: exclude_modules must be a list of names, a regex string or null, "
                           f"got {exclude!r}")
    _check_lora_fields(d, source, tm, exclude)
    init = d.get("init_lora_weights", True)
    try:
        config = LoRAConfig(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                            target_modules=tm, bias=d.get("bias", "none"), use_rslora=d.get("use_rslora", False),
                            init="gaussian" if init == "gaussian" else "default", backend=backend)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: not a valid LoRA config for ptune_rt: {e}") from e
    return config, (list(exclude) if isinstance(exclude, tuple) else exclude)


def _check_lora_fields(d: dict, source: str, target_modules, exclude_modules) -> None:
    """PEFT's LoRA fields by their names in the file: types, finite numbers, regexes that compile."""
    try:
        check_int(f"{source}: r", d.get("r", 8))
        check_number(f"{source}: lora_alpha", d.get("lora_alpha", 8), 0.0, low_open=True)
        check_number(f"{source}: lora_dropout", d.get("lora_dropout", 0.0), 0.0, 1.0)
        check_bool(f"{source}: use_rslora", d.get("use_rslora", False))
        for key, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if isinstance(value, str):
                check_regex(f"{source}: {key}", value)
    except ValueError as e:
        raise AdapterError(str(e)) from None


def peft_prompt_learning_export(model: nn.Module, peft_type: str, task_type: Optional[str], *, num_virtual_tokens: int,
                                token_dim: int, num_attention_heads: int, num_layers: int, head_names,
                                prompt_embeddings: torch.Tensor, head_tensors: dict, **method_fields) -> tuple[dict, dict]:
    """(``adapter_config.json`` contents, tensors) of a PEFT prompt-learning checkpoint (prefix
    tuning, prompt tuning, P-tuning): the fields they all write, ``method_fields`` for the rest;
    the one ``prompt_embeddings`` tensor and the heads under PEFT's key prefix."""
    config = {
        "peft_type": peft_type,
        "task_type": task_type,
        "auto_mapping": auto_mapping(model, task_type),
        "base_model_name_or_path": name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "modules_to_save": list(head_names) if head_names else None,
        **method_fields,
    }
    tensors = {PROMPT_KEY: prompt_embeddings}
    tensors.update({PEFT_HEAD_PREFIX + k: t for k, t in head_tensors.items()})
    return config, tensors
