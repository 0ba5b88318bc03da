"""IA3 (Liu et al., 2022, "(IA)^3"): trainable vectors that rescale the keys, the values and the
input of the FFN's output projection of a frozen model, PEFT's ``IA3Config`` semantics.

Design: a target linear is swapped for :class:`IA3Linear` (PEFT's layout: ``base_layer``,
``ia3_l[adapter]``), whose forward is the fused op :func:`ptune_rt.ops.ia3_linear.ia3_linear`:
on the Triton path the scale lives inside the frozen GEMM (the fused LoRA kernel at rank 0): an
output scale in its epilogue (``y = l * (x W^T) + l * b``), an input scale applied to each x tile
as it loads (never an M x K scaled copy), and backward is one GEMM per layer as well (dY's columns
scaled as they load, or ``dX = (dY W) * l`` with ``dY W`` kept for the vector's gradient).

``config``: :class:`IA3Config`; ``layer``: :class:`IA3Linear` (merge / unmerge exact to the bit);
``inject``: into and out of a model; ``adapters``: ``merge`` / ``unmerge`` / ``set_adapter`` /
``mixed_adapters`` (rows of one batch with different tasks' vectors) / ``merge_and_unload``;
``peft_bridge``: ``ptune_rt.accelerate`` of PEFT IA3 models; ``checkpoint``: PEFT's and the own
layout; ``report``.
"""
from ptune_rt.methods.ia3.adapters import merge, mixed_adapters, set_adapter, unmerge
from ptune_rt.methods.ia3.config import IA3Config
from ptune_rt.methods.ia3.layer import IA3Linear
from ptune_rt.methods.ia3.method import METHOD

__all__ = ["IA3Config", "IA3Linear", "METHOD", "merge", "mixed_adapters", "set_adapter", "unmerge"]
