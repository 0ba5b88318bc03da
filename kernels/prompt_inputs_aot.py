"""Ahead-of-time compile variants of the soft-prompt input builder, for ``ptune-rt compile-report``.

The launch is recorded from the real wrapper on ``meta`` tensors (see ``lora_aot``): a 7B-class
embedding table (32000 x 4096), a batch of 8 rows of 4096 + 20 positions (20 virtual tokens),
one task or a stack of 8 tasks, embeddings in fp16, bf16 and fp32; every shipped config, sm_80
and sm_90, with an unaligned fallback build for the bf16 task-stack launch.
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import prompt_inputs as PI

B, L_OUT, V, H, P, T = 8, 4116, 32000, 4096, 20, 8
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_variants(full: bool = False) -> list[AotVariant]:
    variants = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tasks in (False, True):
            src = torch.empty(B, L_OUT, device="meta", dtype=torch.int64)
            emb = torch.empty(V, H, device="meta", dtype=dtype)
            prompts = torch.empty(*((T,) if tasks else ()), P, H, device="meta", dtype=dtype)
            tid = torch.empty(B, device="meta", dtype=torch.int32) if tasks else None
            with recorded_launches(PI, "_check_device") as rec:
                PI.build_inputs_embeds(src, emb, prompts, tid)
            (kernel, args, flags), = rec
            by_name = dict(zip(kernel.arg_names, args))
            for cfg in PI.CONFIGS:
                variants.append(launch_variant(
                    kernel.fn.__name__, kernel, by_name, {**flags, **cfg.meta}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, label=f"{_SHORT[dtype]} {'tasks' if tasks else 'one task'}",
                    config=str(cfg), fallback=full or (dtype == torch.bfloat16 and tasks)))
    return variants
