"""Prefix-fused attention op: attention over [prefix ; sequence] keys without concatenating them.

Registered as the torch custom ops ``ptune_rt::prefix_attention_fwd`` / ``_bwd`` (fake impls and
an autograd formula, so ``torch.compile`` sees one op). Two backends:

* ``triton``: ``ptune_rt.kernels.prefix_attention`` (one online-softmax pass over prefix and
  sequence blocks; backward reduces the prefix gradient over rows and the GQA group in-kernel;
  single-token decode computes the shared prefix part once for the whole batch);
* ``torch``: two calls of PyTorch's fused CPU flash-attention kernel, merged by log-sum-exp: the
  sequence part (its causal fast path, no [L, P+L] mask, native GQA) and the prefix part (no mask
  at all: every query sees every prefix key; the single [Hkv, P, D] prefix broadcast over rows
  with stride 0, never copied). Backward calls the fused backward twice with the merged output
  and the joint LSE, which gives exactly the joint softmax's gradient for each key set; the
  prefix gradient comes out per row and is summed over the batch (or per task, by a
  deterministic float64 one-hot product: no ``index_add_`` atomics).

Both save only q, k, v, the prefix, the output and the LSE for backward: no attention matrix, no
mask, no concatenated K/V.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------


def _seq_mask(B, L, S, kv_mask, causal, dtype, device):
    """(additive mask or None, is_causal flag) for the fused kernel over the sequence keys only."""
    square_causal = causal and L == S
    if kv_mask is None and (square_causal or not causal or L == 1):
        return None, square_causal
    if square_causal:  # padding only: a broadcast [B, 1, 1, S] mask beside the causal fast path
        m = torch.zeros((B, 1, 1, S), dtype=dtype, device=device)
        return m.masked_fill_(~kv_mask.bool()[:, None, None, :], float("-inf")), True
    vis = torch.ones((L, S), dtype=torch.bool, device=device)
    if causal and L > 1:
        vis = torch.arange(S, device=device)[None, :] <= (S - L) + torch.arange(L, device=device)[:, None]
    vis = vis[None, None]
    if kv_mask is not None:
        vis = vis & kv_mask.bool()[:, None, None, :]
    return torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf")), False


def _rows_without_keys(B, L, S, kv_mask, causal, device):
    """[B, 1, L] True where a query sees no sequence key (e.g. left-padding queries)."""
    if kv_mask is None:
        if causal and S < L:
            return (torch.arange(L, device=device) + (S - L) < 0).expand(B, L)[:, None]
        return None
    real = kv_mask.to(torch.int32)
    if causal:
        seen = real.cumsum(1)  # keys 0..t that are real
        idx = (torch.arange(L, device=device) + (S - L)).clamp(min=-1)
        counts = torch.where(idx[None, :] >= 0, seen[:, idx.clamp(min=0)], torch.zeros_like(seen[:, :1]))
        return (counts == 0)[:, None]
    return (real.sum(1) == 0)[:, None, None].expand(B, 1, L)


def prefix_rows(prefix, task_ids, B):
    """[Hkv, P, D] -> [B, Hkv, P, D]: a stride-0 broadcast of the one prefix (no copy), or with
    tasks ([T, Hkv, P, D] and ``task_ids`` [B]) each row's task prefix."""
    if task_ids is not None:
        return prefix[task_ids.long()]
    return prefix.unsqueeze(0).expand(B, -1, -1, -1)


def _torch_forward(q, k, v, pk, pv, kv_mask, task_ids, causal, scale):
    B, Hq, L, D = q.shape
    S = k.shape[2]
    mask, is_causal = _seq_mask(B, L, S, kv_mask, causal, q.dtype, q.device)
    o_s, lse_s = _flash_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    empty = _rows_without_keys(B, L, S, kv_mask, causal, q.device)
    if empty is not None:
        lse_s = lse_s.masked_fill(empty, float("-inf"))
    # The prefix part: every query sees every prefix key, so the same fused kernel with no mask.
    o_p, lse_p = _flash_cpu(q, prefix_rows(pk, task_ids, B), prefix_rows(pv, task_ids, B), 0.0, False,
                            scale=scale)
    lse = torch.logaddexp(lse_p, lse_s)
    w_s = torch.exp(lse_s - lse).unsqueeze(-1).to(q.dtype)
    w_p = torch.exp(lse_p - lse).unsqueeze(-1).to(q.dtype)
    if empty is not None:  # a row without sequence keys: its sequence part is 0 * (possibly NaN)
        o_s = o_s.masked_fill(empty.unsqueeze(-1), 0.0)
    o = torch.addcmul(o_p * w_p, o_s, w_s)
    return o, lse


def _torch_backward(do, q, k, v, pk, pv, o, lse, kv_mask, task_ids, causal, scale, num_tasks):
    if q.dtype in (torch.float16, torch.bfloat16):
        # The CPU flash backward runs in its inputs' dtype and forms rowsum(dO * O) from the output as
        # saved: in half precision its gradients miss the tolerance rule on short key sets (dq 3.3e-3
        # from float64 against a 2.7e-3 bound, fp16 with two keys). Half attention on CPU is rare: redo
        # the forward in fp32 for an unrounded O and LSE, run the backward in fp32, round once.
        do32, q32, k32, v32, pk32, pv32 = (t.float() for t in (do, q, k, v, pk, pv))
        o32, lse32 = _torch_forward(q32, k32, v32, pk32, pv32, kv_mask, task_ids, causal, scale)
        grads = _torch_backward(do32, q32, k32, v32, pk32, pv32, o32, lse32, kv_mask, task_ids, causal, scale,
                                num_tasks)
        return tuple(g.to(t.dtype) if g is not None else None for g, t in zip(grads, (q, k, v, pk, pv)))
    B, Hq, L, D = q.shape
    S = k.shape[2]
    mask, is_causal = _seq_mask(B, L, S, kv_mask, causal, q.dtype, q.device)
    # With the merged output and the joint LSE the fused backward yields exactly the joint
    # softmax's gradient restricted to the keys it is given: once for the sequence keys, once
    # for the prefix keys (GQA reduced in-kernel), and the two dq parts add up.
    lse = lse.to(torch.float32)
    dq, dk, dv = _flash_cpu_bwd(do, q, k, v, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    dq_p, dpk_rows, dpv_rows = _flash_cpu_bwd(do, q, prefix_rows(pk, task_ids, B), prefix_rows(pv, task_ids, B),
                                              o, lse, 0.0, False, scale=scale)
    dq = dq.add_(dq_p)
    if task_ids is None:
        dpk, dpv = dpk_rows.float().sum(0), dpv_rows.float().sum(0)
    else:
        dpk = sum_rows_per_task(dpk_rows, task_ids, num_tasks)
        dpv = sum_rows_per_task(dpv_rows, task_ids, num_tasks)
    return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)


def sum_rows_per_task(rows: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor:
    """[T, ...] fp32 sums of the [B, ...] per-row ``rows`` by task, deterministically: a float64
    one-hot product over the rows (``index_add_`` uses atomics on CUDA, so its sums change from run
    to run; float64 also keeps a TF32 matmul setting from rounding the gradients). The kernels'
    wrapper sums its per-row partials the same way."""
    onehot = task_ids.long()[None, :] == torch.arange(num_tasks, device=rows.device)[:, None]
    sums = onehot.to(torch.float64) @ rows.reshape(rows.shape[0], -1).to(torch.float64)
    return sums.to(torch.float32).reshape((num_tasks,) + tuple(rows.shape[1:]))


# ----------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------


def _triton_forward(q, k, v, pk, pv, kv_mask, task_ids, causal, scale):
    from ptune_rt.kernels import prefix_attention as K
    if q.shape[2] == 1 and task_ids is None:
        return K.prefix_attention_decode(q, k, v, pk, pv, kv_mask, sm_scale=scale)
    return K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, task_ids, causal, scale)


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("ptune_rt::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         kv_mask: Optional[Tensor], task_ids: Optional[Tensor], causal: bool, scale: float,
                         backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        o, lse = _triton_forward(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal, scale)
    else:
        o, lse = _torch_forward(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal, scale)
    return o.contiguous(), lse.contiguous()


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, causal, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ptune_rt::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         o: Tensor, lse: Tensor, kv_mask: Optional[Tensor], task_ids: Optional[Tensor],
                         causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tasks = prefix_k.shape[0] if task_ids is not None else 1
    if backend == "triton":
        from ptune_rt.kernels import prefix_attention as K
        return K.prefix_attention_backward(do, q, k, v, prefix_k, prefix_v, o, lse, kv_mask, task_ids, causal,
                                           scale, num_tasks=num_tasks)
    return _torch_backward(do, q, k, v, prefix_k, prefix_v, o, lse, kv_mask, task_ids, causal, scale, num_tasks)


@prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, o, lse, kv_mask, task_ids, causal, scale, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, pk, pv, kv_mask, task_ids, causal, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, pk, pv, o, lse, kv_mask, task_ids)
    ctx.args = (causal, scale, backend)


def _backward(ctx, do, _dlse):
    q, k, v, pk, pv, o, lse, kv_mask, task_ids = ctx.saved_tensors
    causal, scale, backend = ctx.args
    grads = prefix_attention_bwd(do.contiguous(), q, k, v, pk, pv, o, lse, kv_mask, task_ids, causal, scale,
                                 backend)
    return (*grads, None, None, None, None, None)


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------


def _check_task_range(task_ids: Tensor, num_tasks: int) -> None:
    """Every task id in [0, num_tasks). Reads the values (a device synchronization on a GPU), so the
    prefix-tuned model validates its task_ids once per forward and its layers skip this."""
    wide = task_ids.to(torch.int64)  # uint16/32/64 have no min/max kernels
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= num_tasks):
        raise ValueError(f"task_ids must be in [0, {num_tasks}), got values in [{int(wide.min())}, "
                         f"{int(wide.max())}]")


def _is_integer(dtype: torch.dtype) -> bool:
    """Any signed or unsigned integer dtype (task ids of every integer dtype are accepted alike)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def resolve_attention_backend(backend: str, device, head_dim: int) -> tuple[str, str]:
    """``(backend, reason)`` for prefix attention of ``head_dim`` on ``device``: the common backend
    choice, and a clear error where it picks the Triton kernels for a head dim they do not support
    (above 128; the torch path runs on CPU tensors only, so there is nothing to fall back to on CUDA)."""
    chosen, why = resolve_backend(backend, device)
    if chosen == "triton":
        from ptune_rt.kernels import prefix_attention as K
        try:
            K.check_head_dim(head_dim)
        except ValueError as e:
            raise ValueError(f"prefix_attention: backend={backend!r} takes the Triton kernels ({why}), but {e}; "
                             "backend='torch' runs any head dim on CPU tensors") from None
    return chosen, why


def _check(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, check_task_range=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4D tensor [batch, heads, seq, head_dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    B, Hq, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [batch={B}, kv_heads, keys, head_dim={D}], got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    want = (Hkv, None, D)
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dim() not in (3, 4) or t.shape[-3] != Hkv or t.shape[-1] != D or t.shape[-2] < 1:
            raise ValueError(f"{name} must be [kv_heads={Hkv}, P>=1, head_dim={D}] (or [tasks, ...] with "
                             f"task_ids), got {tuple(t.shape)}")
        if (t.dim() == 4) != (task_ids is not None):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: pass a [tasks, kv_heads, P, head_dim] "
                             "prefix together with task_ids, or a 3D prefix without them")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} differ")
    del want
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("kv_mask", kv_mask),
                    ("task_ids", task_ids)):
        if t is not None and t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
    if kv_mask is not None and tuple(kv_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"kv_mask must be [batch={B}, keys={k.shape[2]}], got {tuple(kv_mask.shape)}")
    if task_ids is not None:
        if tuple(task_ids.shape) != (B,) or not _is_integer(task_ids.dtype):
            raise ValueError(f"task_ids must be an integer tensor [batch={B}], got {tuple(task_ids.shape)} "
                             f"{task_ids.dtype}")
        if check_task_range:
            _check_task_range(task_ids, prefix_k.shape[0])


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     kv_mask: Optional[Tensor] = None, task_ids: Optional[Tensor] = None, causal: bool = True,
                     sm_scale: Optional[float] = None, backend: str = "auto", *, check_task_range: bool = True,
                     joined=None) -> Tensor:
    """Attention of q [B, Hq, L, D] over [prefix ; k/v [B, Hkv, S, D]] with one softmax.

    prefix_k/v: [Hkv, P, D] shared by every row (cast to q's dtype here, so gradients flow into
    fp32 parameters), or [T, Hkv, P, D] with ``task_ids`` [B] (any integer dtype). ``kv_mask``
    [B, S]: 1 for real keys, 0 for padding. Causal masking is bottom-right aligned (query i sees key
    t iff t <= S - L + i); every query sees the whole prefix. The Triton backend takes head dims up
    to 128 (a larger one is a ValueError naming it: :func:`resolve_attention_backend`).

    ``check_task_range=False``: ``task_ids`` are already validated against this prefix stack (the
    model glue checks them once per forward, not once per layer). ``joined``: for a torch-path
    decode step, an optional ``(prefix_k, prefix_v, task_ids) -> (keys, values) or None`` giving
    ``[every row's prefix ; k]`` / ``[... ; v]`` already laid out in one tensor
    (``ptune_rt.methods.prefix.cache`` keeps the cache that way), so the step needs no concatenation.
    """
    _check(q, k, v, prefix_k, prefix_v, kv_mask, task_ids, check_task_range)
    chosen, _ = resolve_attention_backend(backend, q.device, q.shape[-1])
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if task_ids is not None:
        task_ids = task_ids.to(torch.int32)  # every integer dtype alike (int32 stays as it is, any stride)
    if kv_mask is not None:
        kv_mask = kv_mask.to(torch.bool)
    pk, pv = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    if chosen == "torch" and q.shape[2] == 1 and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v))):
        kv = joined(prefix_k, prefix_v, task_ids) if joined is not None else None
        return _torch_decode_step(q, k, v, pk, pv, kv_mask, task_ids, scale, kv)
    o, _ = prefix_attention_fwd(q, k, v, pk, pv, kv_mask, task_ids, bool(causal), scale, chosen)
    return o


def _torch_decode_step(q, k, v, pk, pv, kv_mask, task_ids, scale, joined_kv=None):
    """One decode token on the torch path, outside autograd: the single query sees every prefix and
    cache key, so one fused SDPA call over [prefix ; cache] (a [P, D] block per kv head in front of
    the cache) beats the two-part LSE merge, whose half-dozen small ops dominate at this size.
    ``joined_kv``: that [prefix ; cache] pair when the cache already holds it (else it is built here)."""
    B = q.shape[0]
    if joined_kv is not None:
        keys, values = joined_kv
    else:
        keys = torch.cat([prefix_rows(pk, task_ids, B), k], dim=2)
        values = torch.cat([prefix_rows(pv, task_ids, B), v], dim=2)
    mask = None
    if kv_mask is not None:
        mask = torch.cat([kv_mask.new_ones((B, pk.shape[-2])), kv_mask], dim=1)[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                                            enable_gqa=keys.shape[1] != q.shape[1])
