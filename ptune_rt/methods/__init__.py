"""PEFT methods: config dataclasses and the modules holding trainable parameters."""
from .lora import LoRAConfig, LoRALinear

__all__ = ["LoRAConfig", "LoRALinear"]
