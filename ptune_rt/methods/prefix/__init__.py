"""Prefix tuning / P-tuning v2 (Li & Liang, 2021; Liu et al., 2022): trainable key/value prefixes in
every self-attention layer, attended by the fused prefix attention without entering the KV cache.

``config``: :class:`PrefixConfig`; ``encoder``: :class:`PrefixEncoder` (PEFT's parameter names; T
tasks stacked for mixed-task batches); ``inject``: into and out of a model; ``attention``: the
transformers attention and mask functions; ``cache``: the KV-cache layer with P free rows for
decode; ``peft_bridge``: ``ptune_rt.accelerate`` of PEFT prefix models; ``report``; ``checkpoint``.
"""
from ptune_rt.methods.prefix.config import PrefixConfig, check_model_dtype
from ptune_rt.methods.prefix.encoder import PrefixEncoder
from ptune_rt.methods.prefix.method import METHOD

__all__ = ["METHOD", "PrefixConfig", "PrefixEncoder", "check_model_dtype"]
