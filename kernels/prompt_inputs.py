"""Input embeddings with soft prompts: one Triton pass that gathers token embeddings and inserts
each row's virtual-token rows.

The layout of every output row is an index map ``src`` [B, L_out] (int32/int64):
``src[b, j] >= 0`` is a token id whose embedding row is copied, ``src[b, j] < 0`` is virtual token
``v = -src[b, j] - 1`` of row b's task, read from ``prompts[task_ids[b], v]``. Any placement
(front, template with anchors, per-row tasks) is an index map, so the kernel never concatenates
and never loops over rows in Python.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import KernelConfig, interpreting, launch


@triton.jit
def _build_inputs_kernel(
    SRC, EMB, PROMPTS, TASK, OUT,
    L_out, H, V, NV,
    stride_sb, stride_sl, stride_ev, stride_eh, stride_pt, stride_pv, stride_ph, stride_task,
    stride_ob, stride_ol, stride_oh,
    HAS_TASKS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program fills a BLOCK_L x BLOCK_H tile of one row's output embeddings.

    Grid: (rows, position blocks, hidden blocks): rows are unbounded, so they take axis 0. Every
    index that multiplies a stride is 64-bit (an embedding table or a batch of outputs easily spans
    more than 2**31 elements).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    l_in = offs_l < L_out
    h_in = offs_h < H
    src = tl.load(SRC + b * stride_sb + offs_l * stride_sl, mask=l_in, other=0).to(tl.int64)
    if HAS_TASKS:
        task = tl.load(TASK + b * stride_task).to(tl.int64)
    else:
        task = 0
    is_tok = src >= 0
    tok = tl.where(is_tok, src, 0)
    virt = tl.where(is_tok, 0, -src - 1)
    tok_vals = tl.load(EMB + tok[:, None] * stride_ev + offs_h[None, :] * stride_eh,
                       mask=(l_in & is_tok)[:, None] & h_in[None, :], other=0.0)
    virt_vals = tl.load(PROMPTS + task * stride_pt + virt[:, None] * stride_pv + offs_h[None, :] * stride_ph,
                        mask=(l_in & ~is_tok)[:, None] & h_in[None, :], other=0.0)
    vals = tl.where(is_tok[:, None], tok_vals.to(OUT.dtype.element_ty), virt_vals.to(OUT.dtype.element_ty))
    tl.store(OUT + b * stride_ob + offs_l[:, None] * stride_ol + offs_h[None, :] * stride_oh, vals,
             mask=l_in[:, None] & h_in[None, :])


CONFIGS = [KernelConfig({"BLOCK_L": 16, "BLOCK_H": 256}, 4, 1), KernelConfig({"BLOCK_L": 32, "BLOCK_H": 128}, 4, 1)]
DEFAULT_CONFIG = CONFIGS[0]
INTERPRET_CONFIG = KernelConfig({"BLOCK_L": 16, "BLOCK_H": 64}, 4, 1)


def _check_device(dev) -> None:
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton input kernel needs CUDA tensors (got {dev}); on CPU it runs only under "
                           "TRITON_INTERPRET=1")


def _task_index(task_ids: torch.Tensor) -> torch.Tensor:
    """task_ids as the kernel reads them: int32 or int64 kept (any stride; the stride is passed),
    other integer dtypes converted to int32."""
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    return task_ids if task_ids.dtype in (torch.int32, torch.int64) else task_ids.to(torch.int32)


def build_inputs_embeds(src: torch.Tensor, embedding: torch.Tensor, prompts: torch.Tensor,
                        task_ids: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        config: KernelConfig | None = None) -> torch.Tensor:
    """out [B, L_out, H]: ``embedding[src]`` where src >= 0, ``prompts[task, -src-1]`` where src < 0.

    ``prompts`` is [P, H] (one task) or [T, P, H] with ``task_ids`` [B] (any integer dtype and
    stride). Ids are not range-checked here (the op layer validates them before launching).
    """
    dev = src.device
    _check_device(dev)
    p3 = prompts.unsqueeze(0) if prompts.dim() == 2 else prompts
    B, L_out = src.shape
    V, H = embedding.shape
    out = torch.empty((B, L_out, H), device=dev, dtype=out_dtype or embedding.dtype)
    tasks = src.new_zeros((1,)) if task_ids is None else _task_index(task_ids)
    cfg = config or (DEFAULT_CONFIG if dev.type == "cuda" else INTERPRET_CONFIG)
    grid = (B, triton.cdiv(L_out, cfg.meta["BLOCK_L"]), triton.cdiv(H, cfg.meta["BLOCK_H"]))
    launch(_build_inputs_kernel, grid, cfg, src, embedding, p3, tasks, out, L_out, H, V, p3.shape[1],
           *src.stride(), *embedding.stride(), *p3.stride(), tasks.stride(0), *out.stride(),
           HAS_TASKS=task_ids is not None)
    return out
