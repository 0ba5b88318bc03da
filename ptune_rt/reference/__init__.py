"""Eager PyTorch references: the executable specification of every fused op."""
from .lora import lora_linear_reference

__all__ = ["lora_linear_reference"]
