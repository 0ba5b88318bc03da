"""LayerNorm tuning's config (PEFT's ``LNTuningConfig`` names)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from ptune_rt.methods._config import check_module_names
from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods.config_base import MethodConfig

#: PEFT's default norm modules per model type (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
}


@dataclasses.dataclass
class LNTuningConfig(MethodConfig):
    """target_modules: norm modules to train (suffix names or a regex, as PEFT); None takes PEFT's
    default for the model type (Llama: input_layernorm, post_attention_layernorm, norm), else every
    LayerNorm / RMSNorm-like module. modules_to_save: modules trained whole beside them: None picks
    a classification / QA model's task head, as PEFT; ``[]`` none."""

    METHOD = "ln_tuning"

    target_modules: Optional[Union[Sequence[str], str]] = None
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        for field in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, field), tuple):
                setattr(self, field, list(getattr(self, field)))
        super().__post_init__()

    def validate(self) -> None:
        check_module_names("LNTuningConfig.target_modules", self.target_modules)
        check_modules_to_save("LNTuningConfig", self.modules_to_save)
