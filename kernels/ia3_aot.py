"""Ahead-of-time compile variants of IA3's launches of the fused GEMM, for ``ptune-rt compile-report``.

IA3 runs ``fused_lowrank_matmul`` at rank 0 with its scale flags (see ``ptune_rt.ops.ia3_linear``);
the launches are recorded from the op's real Triton path on ``meta`` tensors (see ``lora_aot``):

* output scale (keys, values; 7B-like k/v: K = N = 4096, with bias): forward (``COL_SCALE``,
  ``Z_OUT``, the pre-scaled bias) and backward dX (``IN_SCALE`` on dY, weight transposed);
* input scale (the FFN's down projection, 11008 -> 4096, no bias): forward (``IN_SCALE``) and
  backward dX (``COL_SCALE``, ``Z_OUT``, weight transposed);

M = 4093 tokens (not a multiple of 16), activations fp16 and bf16, the vectors fp32 (the dtype
IA3 keeps beside a half-precision base); the first of ``fused_configs(dtype)`` each, plus the
unaligned fallback build of the bf16 launches.
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import lora as L

TOKENS = 4093
#: (name, in_features, out_features, feedforward, bias)
LAYERS = (("k/v", 4096, 4096, False, True), ("down", 11008, 4096, True, False))
DTYPES = (torch.float16, torch.bfloat16)
FALLBACK_DTYPE = torch.bfloat16
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_PTX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _record(dtype: torch.dtype, K: int, N: int, feedforward: bool, bias: bool) -> list:
    """The (launch name, kernel, args, constexprs) of one IA3 layer's forward and backward dX."""
    from ptune_rt.ops import ia3_linear as op

    meta = dict(device="meta")
    x = torch.empty((TOKENS, K), dtype=dtype, **meta)
    w = torch.empty((N, K), dtype=dtype, **meta)
    b = torch.empty((N,), dtype=dtype, **meta) if bias else None
    scale = torch.empty((K if feedforward else N,), dtype=torch.float32, **meta)
    dy = torch.empty((TOKENS, N), dtype=dtype, **meta)
    with recorded_launches(L, "_check_backend") as fwd:
        _, saved = op._triton_forward(x, w, b, scale, feedforward)
    with recorded_launches(L, "_check_backend") as bwd:  # the vector's column sum runs on meta tensors
        op._triton_backward(dy, saved, x, w, b, scale, feedforward, True)
    if len(fwd) != 1 or len(bwd) != 1:
        raise RuntimeError(f"IA3's forward / dX launched {len(fwd)} / {len(bwd)} kernels, kernels/ia3_aot.py "
                           "expects one each")
    return [("fwd y", *fwd[0]), ("bwd dX", *bwd[0])]


def aot_variants(full: bool = False) -> list[AotVariant]:
    """One variant per (layer, launch, dtype) with the first shipped config (``full``: every config,
    every launch with an unaligned fallback)."""
    variants = []
    for dtype in DTYPES:
        configs = L.fused_configs(dtype)
        for layer, K, N, feedforward, bias in LAYERS:
            for name, kernel, args, flags in _record(dtype, K, N, feedforward, bias):
                by_name = dict(zip(kernel.arg_names, args))
                on = " ".join(f for f in ("IN_SCALE", "COL_SCALE", "Z_OUT", "HAS_BIAS") if flags.get(f))
                for config in (configs if full else configs[:1]):
                    wgmma = config.meta["BLOCK_M"] >= 64 and config.num_warps % 4 == 0
                    variants.append(launch_variant(
                        kernel.fn.__name__, kernel, by_name, {**flags, **config.meta}, num_warps=config.num_warps,
                        num_stages=config.num_stages, label=f"ia3 {_SHORT[dtype]} {layer} {name} {on}",
                        config=f"{config} R{flags['BLOCK_R']} g{config.meta['GROUP_M']}", mma_dtypes=(_PTX[dtype],),
                        wgmma_on_sm90=wgmma, fallback=full or dtype == FALLBACK_DTYPE))
    return variants
