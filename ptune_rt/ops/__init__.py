"""Fused ops: one file per op, each an autograd-aware torch custom op that dispatches to the
Triton kernel or to the torch path."""
from .lora_linear import lora_linear, resolve_backend

__all__ = ["lora_linear", "resolve_backend"]
