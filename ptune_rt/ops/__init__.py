"""Fused ops: one file per op, each an autograd-aware torch custom op that dispatches to the
Triton kernel or to the torch path."""
from .backend import resolve_backend
from .lora_linear import lora_linear

__all__ = ["lora_linear", "resolve_backend"]
