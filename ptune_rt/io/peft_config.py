"""PEFT's ``adapter_config.json``: the fields every method shares (task type, base model, heads)
and the prompt-learning export; each method's own fields live in its package's checkpoint code.

PEFT itself is not imported: the JSON is written and read field by field, so checkpoints work
with or without PEFT installed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_rt.io.common import PEFT_HEAD_PREFIX, PROMPT_KEY, name_list, unsharded_class

#: Prefix of every tuner-layer key in a PEFT checkpoint (the PeftModel -> LoraModel -> base model path).
PEFT_KEY_PREFIX = "base_model.model."
#: PEFT types this package loads (each maps to one of its methods).
SUPPORTED_PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: Heads PEFT's task wrappers always train and save (``modules_to_save``) for these task types.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}

_SUFFIX_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                 ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                 ("ForQuestionAnswering", "QUESTION_ANS"))


def infer_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type for a transformers model class, or None when there is none."""
    cls = unsharded_class(model).__name__
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


def auto_mapping(model: nn.Module, task_type: Optional[str]) -> Optional[dict[str, str]]:
    """PEFT's ``auto_mapping`` field: the base model class, written only without a task type."""
    if task_type is not None:
        return None
    cls = unsharded_class(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def peft_task_heads(d: dict, source: str) -> list[str]:
    """``modules_to_save`` of a PEFT config plus the heads its task wrapper adds."""
    heads = name_list(d, "modules_to_save", source)
    for h in TASK_HEADS.get(d.get("task_type"), []):
        if h not in heads:
            heads.append(h)
    return heads


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
