"""LoRA (Hu et al., 2021): a trainable low-rank update ``s B A`` beside each frozen target linear,
run by the fused LoRA op (the low-rank term added inside the frozen GEMM).

``config``: :class:`LoRAConfig`; ``layer``: the fused module :class:`LoRALinear`; ``inject``: into
and out of a model; ``adapters``: merge / unmerge / set_adapter / mixed_adapters; ``peft_bridge``:
``ptune_rt.accelerate`` of PEFT LoRA models; ``swiglu`` / ``groups``: the MLP recompute and the
shared-input projection groups; ``report``; ``checkpoint``: PEFT's and the own layout.
"""
from ptune_rt.methods.lora.config import LoRAConfig
from ptune_rt.methods.lora.layer import LoRALinear
from ptune_rt.methods.lora.method import METHOD

__all__ = ["LoRAConfig", "LoRALinear", "METHOD"]
