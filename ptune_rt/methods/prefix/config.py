"""Prefix tuning's hyper-parameters: :class:`PrefixConfig` (names follow PEFT's
``PrefixTuningConfig``), and the dtype check of a model it goes into."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch
from torch import nn

from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods._config import check_bool, check_choice, check_int, check_number
from ptune_rt.methods.config_base import MethodConfig
from ptune_rt.ops.backend import BACKENDS

POSITION_MODES = ("shift", "none")


@dataclasses.dataclass
class PrefixConfig(MethodConfig):
    """Hyper-parameters of a prefix (names follow PEFT's ``PrefixTuningConfig`` where they overlap).

    num_virtual_tokens: P, the number of prefix key/value positions every layer's attention sees.
    prefix_projection: train P token embeddings of width kv_heads * head_dim and a two-layer MLP
        (Linear, Tanh, Linear) that maps them to the prefix (PEFT's reparameterization), instead
        of the prefix itself.
    encoder_hidden_size: hidden width of that MLP; None takes kv_heads * head_dim (PEFT's default).
        Unused without ``prefix_projection``.
    position_mode: "shift" numbers the real tokens from P, as if the prefix were real tokens in
        front of them (PEFT's behaviour); "none" keeps the model's own numbering (ChatGLM's
        P-tuning v2).
    dropout: dropout rate on the prefix keys/values while training (ChatGLM style; PEFT has none).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch", for the fused
        prefix attention.
    num_tasks: T, the number of independent prefixes; with T > 1 every forward / generate call takes
        ``task_ids`` [batch] (each row's task) and a batch may mix tasks.
    modules_to_save: modules of the model trained next to the prefix (names of submodules, matched
        as a whole name or a dotted suffix, e.g. ``"classifier"``). None picks the task head of
        sequence / token classification and question answering models (``classifier``, ``score``,
        ``qa_outputs``, ..., as PEFT's task types do) and nothing elsewhere; ``[]`` trains the
        prefix alone.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    position_mode: str = "shift"
    dropout: float = 0.0
    backend: str = "auto"
    num_tasks: int = 1
    modules_to_save: Optional[list] = None

    METHOD: ClassVar[str] = "prefix"
    KIND: ClassVar[str] = "prefix config"

    def __post_init__(self):
        if isinstance(self.modules_to_save, (tuple, list)):
            self.modules_to_save = list(self.modules_to_save)
        super().__post_init__()

    def validate(self) -> None:
        check_int("PrefixConfig.num_virtual_tokens", self.num_virtual_tokens)
        check_bool("PrefixConfig.prefix_projection", self.prefix_projection)
        check_int("PrefixConfig.encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_choice("PrefixConfig.position_mode", self.position_mode, POSITION_MODES)
        check_number("PrefixConfig.dropout", self.dropout, 0.0, 1.0)
        check_choice("PrefixConfig.backend", self.backend, BACKENDS)
        check_int("PrefixConfig.num_tasks", self.num_tasks)
        check_modules_to_save("PrefixConfig", self.modules_to_save)


def check_model_dtype(model: nn.Module, what: str = "PrefixConfig") -> None:
    """The fused prefix attention runs float32, float16 and bfloat16 activations: refuse a model with
    floating-point parameters of another dtype (float64) before anything changes."""
    for n, p in model.named_parameters() if isinstance(model, nn.Module) else ():
        if p.is_floating_point() and p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{what}: parameter {n!r} of {type(model).__name__} is {p.dtype}; the fused prefix "
                             "attention runs float32, float16 and bfloat16 models: cast the model first (e.g. "
                             "model.float())")
