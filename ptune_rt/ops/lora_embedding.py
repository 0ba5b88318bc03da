"""The fused LoRA embedding op: ``y = E[ids] + scale * A^T[ids] @ B^T`` (PEFT's LoRA ``Embedding``).

A gather plus a low-rank gather, never a one-hot matmul. Two backends behind one
``autograd.Function`` (``_LoRAEmbedding``):

* ``triton``: ``ptune_rt.kernels.lora_embedding``: one kernel gathers the table rows and the rank-r
  adapter rows of a tile of tokens and writes ``E[ids] + scale * A^T[ids] B^T`` once (fp32 sum,
  rounded once to the table's dtype); the backward's two skinny products (G = scale * dY B and dB)
  run on the LoRA linear's skinny kernel;
* ``torch``: ``F.embedding`` of the table and of A^T, then one ``addmm_`` of the [M, r] x [r, D]
  low-rank product into the gathered rows (in the promoted dtype of table and adapters, as PEFT adds
  them), and two small GEMMs in backward.

On both backends dA is scattered from G [M, r] by PyTorch's embedding backward
(``aten.embedding_dense_backward``): it applies ``padding_idx`` and ``scale_grad_by_freq`` exactly as
``F.embedding``'s own gradient does, and it is deterministic on CUDA (sorted segments, no float
atomics), which matters more here than the speed of an atomic scatter over M x r values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend

#: Dtypes the Triton kernel takes for the table and the adapters.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------


def _torch_forward(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float):
    """(out [M, D] in weight's dtype, A^T[ids] [M, r] in the adapter dtype, kept for dB)."""
    sum_dtype = torch.promote_types(weight.dtype, lora_b.dtype)
    rows = F.embedding(ids, weight)
    after_a = F.embedding(ids, lora_a.t())
    rows = rows if rows.dtype == sum_dtype else rows.to(sum_dtype)
    rows.addmm_(after_a.to(sum_dtype), lora_b.t().to(sum_dtype), alpha=scale)  # the one r x D product
    return rows.to(weight.dtype), after_a


def _torch_backward(dy: Tensor, after_a: Tensor, lora_b: Tensor, scale: float, need_g: bool, need_db: bool):
    """(G = scale * dY B [M, r], dB = scale * dY^T A^T[ids] [D, r]) in the promoted dtype, or None."""
    dy = dy.to(torch.promote_types(dy.dtype, lora_b.dtype))
    G = (dy @ lora_b.to(dy.dtype)).mul_(scale) if need_g else None
    db = (after_a.to(dy.dtype).t() @ dy).mul_(scale).t() if need_db else None
    return G, db


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------


def _sum_rows_by_id(rows: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int,
                    scale_grad_by_freq: bool) -> Tensor:
    """[num_embeddings, C]: row v is the sum of the ``rows`` [M, C] of the tokens with id v, F.embedding's
    gradient (``padding_idx`` row left at zero, ``scale_grad_by_freq`` dividing by each id's count)."""
    return torch.ops.aten.embedding_dense_backward(rows, ids, num_embeddings, padding_idx, scale_grad_by_freq)


class _LoRAEmbedding(torch.autograd.Function):
    """Flat ids [M] in, [M, D] out; gradients for the table (if it requires them), A and B."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, padding_idx: int,
                scale_grad_by_freq: bool, backend: str) -> Tensor:
        if backend == "triton":
            from ptune_rt.kernels.lora_embedding import lora_embedding_forward
            out, after_a = lora_embedding_forward(ids, weight, lora_a, lora_b, scale), None
        else:
            out, after_a = _torch_forward(ids, weight, lora_a, lora_b, scale)
        ctx.save_for_backward(ids, lora_a, lora_b, after_a)
        ctx.options = (weight.shape[0], weight.dtype, scale, padding_idx, scale_grad_by_freq, backend)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        ids, lora_a, lora_b, after_a = ctx.saved_tensors
        num_embeddings, weight_dtype, scale, padding_idx, scale_grad_by_freq, backend = ctx.options
        need_weight, need_a, need_b = ctx.needs_input_grad[1:4]
        if backend == "triton":
            from ptune_rt.kernels.lora_embedding import lora_embedding_backward
            G, db = lora_embedding_backward(dout, ids, lora_a, lora_b, scale, need_g=need_a, need_db=need_b)
        else:
            G, db = _torch_backward(dout, after_a, lora_b, scale, need_a, need_b)
        dweight = da = None
        if need_weight:
            dweight = _sum_rows_by_id(dout, ids, num_embeddings, padding_idx, scale_grad_by_freq).to(weight_dtype)
        if need_a:  # dA^T [V, r] scattered from G, laid out [r, V] like lora_a
            da = _sum_rows_by_id(G, ids, num_embeddings, padding_idx, scale_grad_by_freq).t()
            da = da.to(lora_a.dtype).contiguous()
        if need_b:
            db = db.to(lora_b.dtype).contiguous()
        return None, dweight, da, db, None, None, None, None


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def lora_embedding(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                   padding_idx: Optional[int] = None, backend: str = "auto", *, max_norm: Optional[float] = None,
                   norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """LoRA on an embedding table, as PEFT's LoRA ``Embedding`` computes it (one adapter, no dropout:
    PEFT applies none to embeddings).

    ``out[..., :] = weight[ids] + scale * lora_a.T[ids] @ lora_b.T``

    * ``ids`` [...]: int32 or int64 token ids in ``[0, V)``; ``weight`` [V, D] the frozen table
      (``num_embeddings`` V, ``embedding_dim`` D); ``lora_a`` [r, V] (PEFT's ``lora_embedding_A``) and
      ``lora_b`` [D, r] (``lora_embedding_B``), of one floating dtype; all on one device.
    * Returns [..., D] in ``weight``'s dtype. The low-rank term is added to the gathered rows in the
      promoted dtype of table and adapters (fp32 for PEFT's default fp32 adapters beside a half table)
      and the sum rounded once; the Triton kernel always forms it in fp32.
    * ``padding_idx`` (as in ``nn.Embedding``, negative values count from the end) changes only the
      gradients, as in ``F.embedding``: the row ``padding_idx`` of the table and the column
      ``padding_idx`` of ``lora_a`` get no gradient; its forward values are gathered like any other.
      ``scale_grad_by_freq`` divides each id's gradient by its count in ``ids``, for both, as PEFT's
      gather passes the base layer's option to both.
    * Gradients: ``lora_a`` [r, V] and ``lora_b`` [D, r] in their dtype; ``weight`` too when it
      requires grad (a frozen table gets none).
    * ``max_norm`` (which renormalizes the table's rows, and A's columns, in place) and ``sparse``
      gradients are not supported and raise ``NotImplementedError``; ``norm_type`` matters only with
      ``max_norm``.
    * ``backend``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` (CUDA, or CPU under
      ``TRITON_INTERPRET=1``) or ``"torch"``; see ``ptune_rt.ops.backend.resolve_backend``.

    Not covered: embeddings that scale their output (Gemma's ``embed_scale``, which PEFT also
    applies to the adapter's term), and several adapters at once.
    """
    del norm_type  # read by F.embedding only together with max_norm, which is refused below
    if max_norm is not None:
        raise NotImplementedError("lora_embedding does not support max_norm: F.embedding would renormalize the "
                                  "table's rows and lora_a's columns in place; pass max_norm=None")
    if sparse:
        raise NotImplementedError("lora_embedding computes dense gradients only; pass sparse=False")
    padding = _check_inputs(ids, weight, lora_a, lora_b, scale, padding_idx)
    chosen, _ = resolve_backend(backend, weight.device)
    if chosen == "triton":
        for name, t in (("weight", weight), ("lora_a", lora_a)):
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(f"the Triton backend takes {name} in float16, bfloat16 or float32, got {t.dtype}; "
                                "use backend='torch'")
    flat = ids.reshape(-1)
    out = _LoRAEmbedding.apply(flat, weight, lora_a, lora_b, float(scale), padding, bool(scale_grad_by_freq), chosen)
    return out.view(*ids.shape, weight.shape[1])


def _check_inputs(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale, padding_idx) -> int:
    """Raise a clear error naming the argument that is wrong; returns padding_idx as F.embedding's
    gradient takes it (in [0, V), or -1 for none)."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"ids must be an int32 or int64 tensor of token ids, got {got}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating [num_embeddings, embedding_dim] table, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    V, D = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != V or lora_a.shape[0] == 0:
        raise ValueError(f"lora_a must be [r, num_embeddings={V}] with r >= 1, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (D, r):
        raise ValueError(f"lora_b must be [embedding_dim={D}, r={r}], got {tuple(lora_b.shape)}")
    if not lora_a.dtype.is_floating_point or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_a and lora_b must share one floating dtype, got {lora_a.dtype} and {lora_b.dtype}")
    for name, t in (("ids", ids), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != weight.device:
            raise ValueError(f"weight is on {weight.device} but {name} is on {t.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    # reads ids back: eager only, so a compiled caller has no graph break here
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"ids must be in [0, num_embeddings={V}), got values in [{lo}, {hi}]")
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -V <= padding_idx < V:
        raise ValueError(f"padding_idx must be an int in [-{V}, {V}) (num_embeddings={V}) or None, got {padding_idx!r}")
    return padding_idx % V
