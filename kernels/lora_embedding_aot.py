"""Ahead-of-time compile variants of the LoRA embedding kernels, for ``ptune-rt compile-report``.

The launches are recorded from the real wrappers on ``meta`` tensors (see ``lora_aot``): a
LLaMA-7B table (32000 x 4096), 4096 tokens of int64 ids, fp32 adapters (PEFT's default) beside an
fp16, bf16 or fp32 table, torch's default fp32 matmul precision (3xTF32 low-rank dots beside a half
table, IEEE fp32 beside an fp32 one). What is built, on sm_80 and sm_90:

* the forward kernel with every shipped config, at ranks 16 and 32 (one rank tile of each
  ``BLOCK_RS`` value) and 64 (the rank walked in chunks: any larger rank differs from it only in
  values Triton does not specialize on), recorded once per config (the column chunk depends on the
  tile); unaligned fallbacks for the bf16 launches (``--full``: all);
* the backward's two skinny launches (G = s dY B and dB = s dY^T A^T[ids]) at rank 16 with every
  shipped skinny config, named ``_skinny_matmul_kernel (lora_embedding)`` so that
  ``--kernel lora_embedding`` selects them with the forward.
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import lora as L
from . import lora_embedding as LE

NUM_EMBEDDINGS, EMBEDDING_DIM, TOKENS = 32000, 4096, 4096
TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ADAPTER_DTYPE = torch.float32
FORWARD_RANKS = (16, 32, 64)
BACKWARD_RANK = 16
SCALE = 2.0
#: Unaligned fallbacks are built for the launches of this table dtype (``--full``: for all).
FALLBACK_DTYPE = torch.bfloat16
BACKWARD_KERNEL_NAME = "_skinny_matmul_kernel (lora_embedding)"
_BACKWARD_LAUNCHES = ("bwd G", "bwd dB")
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _tensors(dtype: torch.dtype, rank: int):
    meta = dict(device="meta")
    ids = torch.empty((TOKENS,), dtype=torch.int64, **meta)
    weight = torch.empty((NUM_EMBEDDINGS, EMBEDDING_DIM), dtype=dtype, **meta)
    lora_a = torch.empty((rank, NUM_EMBEDDINGS), dtype=ADAPTER_DTYPE, **meta)
    lora_b = torch.empty((EMBEDDING_DIM, rank), dtype=ADAPTER_DTYPE, **meta)
    return ids, weight, lora_a, lora_b


def _mma(dtype: torch.dtype, flags: dict) -> tuple:
    """The fp32 dots run on TF32 tensor cores when their precision flag asks for (3x)TF32."""
    precision = flags.get("LR_PRECISION", flags.get("INPUT_PRECISION"))
    return ("tf32",) if precision in ("tf32", "tf32x3") else ()


def _forward_variants(dtype: torch.dtype, full: bool) -> list[AotVariant]:
    variants = []
    for rank in FORWARD_RANKS:
        ids, weight, lora_a, lora_b = _tensors(dtype, rank)
        for config in LE.FWD_CONFIGS:
            with recorded_launches(LE, "_check_backend") as rec:
                LE.lora_embedding_forward(ids, weight, lora_a, lora_b, SCALE, config=config)
            (kernel, args, flags), = rec
            chunked = "" if flags["ONE_RANK_TILE"] else " rank chunks"
            variants.append(launch_variant(
                kernel.fn.__name__, kernel, dict(zip(kernel.arg_names, args)), {**flags, **config.meta},
                num_warps=config.num_warps, num_stages=config.num_stages,
                label=f"{_SHORT[dtype]} fwd r={rank}{chunked}", config=f"{config} R{flags['BLOCK_R']}",
                mma_dtypes=_mma(dtype, flags), fallback=full or dtype == FALLBACK_DTYPE))
    return variants


def _backward_variants(dtype: torch.dtype, full: bool) -> list[AotVariant]:
    ids, _, lora_a, lora_b = _tensors(dtype, BACKWARD_RANK)
    dy = torch.empty((TOKENS, EMBEDDING_DIM), dtype=dtype, device="meta")
    with recorded_launches(LE, "_check_backend"), recorded_launches(L, "_check_backend") as rec:
        LE.lora_embedding_backward(dy, ids, lora_a, lora_b, SCALE)
    if len(rec) != len(_BACKWARD_LAUNCHES):
        raise RuntimeError(f"lora_embedding_backward launched {len(rec)} kernels, kernels/lora_embedding_aot.py "
                           f"expects {len(_BACKWARD_LAUNCHES)} ({', '.join(_BACKWARD_LAUNCHES)})")
    variants = []
    for name, (kernel, args, flags) in zip(_BACKWARD_LAUNCHES, rec):
        for config in L.SKINNY_CONFIGS:
            variants.append(launch_variant(
                BACKWARD_KERNEL_NAME, kernel, dict(zip(kernel.arg_names, args)), {**flags, **config.meta},
                num_warps=config.num_warps, num_stages=config.num_stages,
                label=f"{_SHORT[dtype]} {name} r={BACKWARD_RANK}", config=f"{config} R{flags['BLOCK_R']}",
                mma_dtypes=_mma(dtype, flags), fallback=full))
    return variants


def aot_variants(full: bool = False) -> list[AotVariant]:
    """The (launch, shipped config) variants of the LoRA embedding kernels; see the module docstring."""
    variants = []
    for dtype in TABLE_DTYPES:
        variants += _forward_variants(dtype, full) + _backward_variants(dtype, full)
    return variants
