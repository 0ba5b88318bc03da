"""Ahead-of-time compile variants of Child-tuning's masked AdamW step, for ``ptune-rt compile-report``.

The launches are recorded from the real wrappers on ``meta`` tensors (see ``lora_aot``): the
parameter of a 7B-class MLP projection (11008 x 4096, 45M elements) in fp32, fp16 and bf16 with fp32
moments, in each kernel mode (plain AdamW, F: Philox mask in the kernel, D: packed child bits), with
every shipped config, sm_80 and sm_90; and the keep-mask kernel the wrapper optimizer and the
reference use on CUDA. The unaligned fallback is built for the bf16 mode D launch (every launch
with ``full``).
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import child_adamw as CA

ROWS, COLS = 11008, 4096
SEED = 1234567
STREAM = 5
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _record_step(dtype: torch.dtype, mode) -> tuple:
    param = torch.empty(ROWS, COLS, device="meta", dtype=dtype)
    moments = [torch.empty(ROWS, COLS, device="meta", dtype=torch.float32) for _ in range(2)]
    bits = torch.empty((param.numel() + 7) // 8, device="meta", dtype=torch.uint8) if mode == "D" else None
    with recorded_launches(CA, "_check_backend") as rec:
        CA.child_adamw_step(param, torch.empty_like(param), *moments, step=10, lr=2e-5, beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.01, mode=mode, reserve_p=0.3, seed=SEED, stream=STREAM,
                            child_bits=bits, config=CA.DEFAULT_CONFIG)
    (launch,) = rec
    return launch


def _record_mask() -> tuple:
    with recorded_launches(CA, "_check_backend") as rec:
        saved = CA._default_config
        CA._default_config = lambda: CA.DEFAULT_CONFIG
        try:
            CA.child_keep_mask(ROWS * COLS, 0.3, SEED, STREAM, "meta")
        finally:
            CA._default_config = saved
    (launch,) = rec
    return launch


def aot_variants(full: bool = False) -> list[AotVariant]:
    variants = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode in (None, "F", "D"):
            kernel, args, flags = _record_step(dtype, mode)
            by_name = dict(zip(kernel.arg_names, args))
            for cfg in CA.CONFIGS:
                variants.append(launch_variant(
                    kernel.fn.__name__, kernel, by_name, {**flags, **cfg.meta}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, label=f"{_SHORT[dtype]} mode {mode or 'plain'}", config=str(cfg),
                    fallback=full or (dtype == torch.bfloat16 and mode == "D")))
    kernel, args, flags = _record_mask()
    by_name = dict(zip(kernel.arg_names, args))
    for cfg in CA.CONFIGS:
        variants.append(launch_variant(kernel.fn.__name__, kernel, by_name, {**flags, **cfg.meta},
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, label="keep mask",
                                       config=str(cfg), fallback=full))
    return variants
