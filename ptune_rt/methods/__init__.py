"""PEFT methods: config dataclasses and the modules holding trainable parameters."""
from .lora import LoRAConfig, LoRALinear
from .prefix import PrefixConfig, PrefixEncoder
from .prompt import PromptTuningConfig, PTuningConfig, PTuningEncoder, SoftPromptEmbedding

__all__ = ["LoRAConfig", "LoRALinear"]
__all__ += ["PrefixConfig", "PrefixEncoder"]
__all__ += ["PromptTuningConfig", "PTuningConfig", "PTuningEncoder", "SoftPromptEmbedding"]
