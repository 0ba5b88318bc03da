"""IA3's hyper-parameters: :class:`IA3Config` (names and defaults follow PEFT's ``IA3Config``)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence, Union

from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods._config import check_bool, check_choice, check_module_names
from ptune_rt.methods.config_base import MethodConfig
from ptune_rt.ops.backend import BACKENDS

#: Targets per model type when ``target_modules`` is None: the keys, the values and the FFN's output
#: projection (the same choice PEFT makes; GPT-2's fused ``c_attn`` is scaled whole, q included).
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"], "opt": ["q_proj", "k_proj", "fc2"], "phi": ["q_proj", "v_proj", "fc2"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "bart": ["q_proj", "v_proj", "fc2"],
}
#: The targets whose input (not output) is scaled when ``feedforward_modules`` is None.
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "qwen2": ["down_proj"],
    "qwen3": ["down_proj"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"], "opt": ["fc2"], "phi": ["fc2"],
    "gpt_neox": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"], "bloom": ["mlp.dense_4h_to_h"],
    "bart": ["fc2"],
}


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """Hyper-parameters of an IA3 adapter (PEFT's ``IA3Config`` names and meanings).

    target_modules: module names (suffix match, e.g. ``"k_proj"``), a regex string matched against
        the full name, or ``"all-linear"``; None picks the model type's default (keys, values and
        the FFN's output projection, as PEFT does).
    feedforward_modules: the targets whose input is scaled (``y = (x * l) W^T + b``, l over
        in_features) rather than their output (``y = (x W^T + b) * l``). A list matches as PEFT's
        does: a module whose name ends with an entry (no dot boundary); a string is a regex
        matched against the full name; None takes the model type's default. A list must be a
        subset of a list ``target_modules``, as in PEFT.
    exclude_modules: module names (suffix match) or a regex never to target.
    init_ia3_weights: start every vector at 1 (the identity), as PEFT; False draws N(0, 1) values.
    modules_to_save: modules trained whole next to the vectors and saved with them (PEFT's
        ``modules_to_save``): None picks the task head of classification / QA models, ``[]``
        none, a list names modules (a whole name or a dotted suffix).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """

    target_modules: Optional[Union[Sequence[str], str]] = None
    feedforward_modules: Optional[Union[Sequence[str], str]] = None
    exclude_modules: Optional[Union[Sequence[str], str]] = None
    init_ia3_weights: bool = True
    modules_to_save: Optional[list] = None
    backend: str = "auto"

    METHOD: ClassVar[str] = "ia3"
    KIND: ClassVar[str] = "IA3 config"

    def __post_init__(self):
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set, frozenset)):
                setattr(self, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        super().__post_init__()

    def validate(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, name)
            if not (name == "feedforward_modules" and value == []):  # []: every vector scales an output
                check_module_names(f"IA3Config.{name}", value)
        check_bool("IA3Config.init_ia3_weights", self.init_ia3_weights)
        check_modules_to_save("IA3Config", self.modules_to_save)
        check_choice("IA3Config.backend", self.backend, BACKENDS)
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(tm, list) and not set(ff) <= set(tm):
            raise ValueError(f"IA3Config.feedforward_modules must be a subset of target_modules (as in PEFT): "
                             f"{sorted(set(ff) - set(tm))} are not in target_modules={tm!r}")
