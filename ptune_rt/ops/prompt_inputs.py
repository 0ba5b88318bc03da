"""Soft-prompt input embeddings: token embeddings and each row's virtual tokens in one pass.

``build_inputs_embeds(src, embedding, prompts, task_ids)`` fills out[b, j] with
``embedding[src[b, j]]`` for token ids (src >= 0) and with ``prompts[task_ids[b], -src[b, j] - 1]``
for virtual tokens (src < 0). Registered as the custom op ``ptune_rt::build_inputs_embeds``; the
Triton backend is one gather kernel (no concatenation, no per-row loop), the torch backend one
embedding gather plus a scatter of the virtual rows. Gradients flow to the prompts (summed per
task) and, if it requires them, to the embedding table; both sums are PyTorch's embedding backward
(deterministic on CUDA: sorted or in-order segments, no float atomics, unlike ``index_add_``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend


def _virtual_index(src, task_ids):
    virt = src < 0
    rows, cols = virt.nonzero(as_tuple=True)
    v = -src[rows, cols] - 1
    t = task_ids.long()[rows] if task_ids is not None else torch.zeros_like(v)
    return virt, rows, cols, t, v


@torch.library.custom_op("ptune_rt::build_inputs_embeds", mutates_args=())
def build_inputs_embeds_op(src: Tensor, embedding: Tensor, prompts: Tensor, task_ids: Optional[Tensor],
                           backend: str) -> Tensor:
    if backend == "triton":
        from ptune_rt.kernels.prompt_inputs import build_inputs_embeds as kernel
        return kernel(src, embedding, prompts, task_ids)
    out = F.embedding(src.clamp(min=0), embedding)
    virt, rows, cols, t, v = _virtual_index(src, task_ids)
    p3 = prompts.unsqueeze(0) if prompts.dim() == 2 else prompts
    out[rows, cols] = p3[t, v].to(out.dtype)
    return out


@build_inputs_embeds_op.register_fake
def _(src, embedding, prompts, task_ids, backend):
    return embedding.new_empty((src.shape[0], src.shape[1], embedding.shape[1]))


def _setup(ctx, inputs, output):
    src, embedding, prompts, task_ids, backend = inputs
    ctx.save_for_backward(src, task_ids)
    ctx.shapes = (tuple(embedding.shape), embedding.dtype, tuple(prompts.shape), prompts.dtype)


def _backward(ctx, dout):
    src, task_ids = ctx.saved_tensors
    emb_shape, emb_dtype, p_shape, p_dtype = ctx.shapes
    need_emb, need_prompts = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    demb = dprompts = None
    P = p_shape[-2]
    T = 1 if len(p_shape) == 2 else p_shape[0]
    if torch.compiler.is_compiling():
        # traced (torch.compile): no data-dependent shapes (nonzero, boolean indexing), so every slot of
        # dout goes in, the ones of the other kind to an extra row that is dropped; the same sums as the
        # eager path below, which reads only the slots it needs
        virt = src < 0
        flat = dout.reshape(-1, dout.shape[-1])
        if need_prompts:
            t = task_ids.long()[:, None] if task_ids is not None else 0
            index = torch.where(virt, t * P - src.long() - 1, T * P).reshape(-1)
            dprompts = _sum_rows_by_index(flat, index, T * P, skip_last=True).reshape(p_shape).to(p_dtype)
        if need_emb:
            index = torch.where(virt, emb_shape[0], src.long()).reshape(-1)
            demb = _sum_rows_by_index(flat, index, emb_shape[0], skip_last=True).to(emb_dtype)
        return None, demb, dprompts, None, None
    virt, rows, cols, t, v = _virtual_index(src, task_ids)
    if need_prompts:
        dprompts = _sum_rows_by_index(dout[rows, cols], t * P + v, T * P).reshape(p_shape).to(p_dtype)
    if need_emb:
        tok = ~virt
        demb = _sum_rows_by_index(dout[tok], src[tok], emb_shape[0]).to(emb_dtype)
    return None, demb, dprompts, None, None


def _sum_rows_by_index(rows: Tensor, index: Tensor, n: int, skip_last: bool = False) -> Tensor:
    """[n, H] fp32: out[i] = sum of the ``rows`` [N, H] whose ``index`` is i. PyTorch's embedding
    backward, deterministic on CUDA (``index_add_`` / ``index_put_(accumulate=True)`` are not
    guaranteed to be). ``skip_last``: ``index`` also holds ``n``, for rows that are left out (the
    embedding backward's padding index)."""
    if skip_last:
        return torch.ops.aten.embedding_dense_backward(rows.float(), index.long(), n + 1, n, False)[:n]
    return torch.ops.aten.embedding_dense_backward(rows.float(), index.long(), n, -1, False)


build_inputs_embeds_op.register_autograd(_backward, setup_context=_setup)


def build_inputs_embeds(src: Tensor, embedding: Tensor, prompts: Tensor, task_ids: Optional[Tensor] = None,
                        backend: str = "auto") -> Tensor:
    """Validated entry point; see the module docstring. ``prompts`` [P, H] or [T, P, H] with task_ids [B]
    (any integer dtype, converted to int32 for both backends)."""
    if src.dim() != 2 or src.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src must be an integer tensor [batch, length], got {tuple(src.shape)} {src.dtype}")
    if embedding.dim() != 2:
        raise ValueError(f"embedding must be [vocab, hidden], got {tuple(embedding.shape)}")
    V, H = embedding.shape
    if prompts.dim() not in (2, 3) or prompts.shape[-1] != H:
        raise ValueError(f"prompts must be [P, hidden={H}] or [tasks, P, hidden={H}], got {tuple(prompts.shape)}")
    if (prompts.dim() == 3) != (task_ids is not None):
        raise ValueError("pass task_ids together with a [tasks, P, hidden] prompt stack, and only then")
    for name, t in (("embedding", embedding), ("prompts", prompts), ("task_ids", task_ids)):
        if t is not None and t.device != src.device:
            raise ValueError(f"src is on {src.device} but {name} is on {t.device}")
    P = prompts.shape[-2]
    # the value checks read src and task_ids back: eager only, so a compiled caller has no graph break here
    checking = not torch.compiler.is_compiling()
    if checking and src.numel():
        lo, hi = int(src.min()), int(src.max())
        if hi >= V or lo < -P:
            raise ValueError(f"src values must be token ids in [0, {V}) or virtual tokens in [-{P}, -1], got "
                             f"values in [{lo}, {hi}]")
    if task_ids is not None:
        T = prompts.shape[0]
        if tuple(task_ids.shape) != (src.shape[0],) or not _is_integer(task_ids.dtype):
            raise ValueError(f"task_ids must be an integer tensor [batch={src.shape[0]}], got "
                             f"{tuple(task_ids.shape)} {task_ids.dtype}")
        wide = task_ids.to(torch.int64)  # uint16/32/64 have no min/max kernels
        if checking and wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= T):
            raise ValueError(f"task_ids must be in [0, {T}), got values in [{int(wide.min())}, {int(wide.max())}]")
        task_ids = task_ids.to(torch.int32)  # every integer dtype alike (int32 stays as it is, any stride)
    chosen, _ = resolve_backend(backend, src.device)
    return build_inputs_embeds_op(src, embedding, prompts.to(embedding.dtype), task_ids, chosen)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
