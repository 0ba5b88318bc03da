"""Eager PyTorch references: the executable specification of every fused op."""
from .dora import dora_linear_reference
from .lora import lora_linear_reference
from .lora_embedding import lora_embedding_reference
from .prefix_attention import prefix_attention_mask, prefix_attention_reference

__all__ = ["dora_linear_reference", "lora_embedding_reference", "lora_linear_reference", "prefix_attention_mask",
           "prefix_attention_reference"]
