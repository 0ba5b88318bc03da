"""The prefix attention as a transformers attention function, and its mask function.

Registered under ``ATTN_NAME`` with ``AttentionInterface`` and ``AttentionMaskInterface``. The
prefix never enters ``past_key_values``: each call gets the cached and new sequence keys from the
model and the layer's prefix from ``E`` (handed down by the inject module's pre-hook), and
``ptune_rt.ops.prefix_attention`` attends over both without concatenating them. Every query sees
all P prefix keys; sequence keys follow the model's causal (bottom-right aligned) or bidirectional
pattern and the padding mask. A missing mask on a causal module means "causal, no padding"
(transformers skips the mask of unpadded causal batches).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_rt.methods.prefix.cache import joined_provider
from ptune_rt.ops.prefix_attention import prefix_attention, prefix_rows

#: Name under which the attention and mask functions are registered in transformers.
ATTN_NAME = "ptune_rt_prefix"
#: Keyword argument carrying the prefix ``E`` from the inner model's forward to the attention function.
PREFIX_KWARG = "ptune_rt_prefix"
#: Keyword argument carrying the per-row task index (int32 [batch], or None) down to the attention function.
TASKS_KWARG = "ptune_rt_prefix_tasks"
#: Attention module attributes: its layer index and the model's prefix state.
LAYER_ATTR = "_ptune_rt_prefix_layer"
MODULE_STATE_ATTR = "_ptune_rt_prefix_state"

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _kv_mask(attention_mask, key, value):
    """The 2D key mask (or None) and the keys/values it covers."""
    if attention_mask is None:
        return None, key, value
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(getattr(attention_mask, "shape", ()))
        raise NotImplementedError(
            f"prefix attention takes a 2D padding mask [batch, keys]; got an attention mask of shape {shape} "
            "(custom 4D masks are not supported with prefix tuning: pass a 2D attention_mask)")
    S = key.shape[2]
    m = attention_mask.to(device=key.device, dtype=torch.bool)
    if m.shape[1] > S:  # keep the last S positions, the ones the keys hold
        m = m[:, -S:]
    elif m.shape[1] < S:  # a pre-allocated cache: only the first positions hold keys
        key, value = key[:, :, :m.shape[1]], value[:, :, :m.shape[1]]
    return m, key, value


def _visibility(B, L, S, kv_mask, causal, device):
    """[B, 1, L, S] bool: which sequence keys each query sees."""
    vis = torch.ones((L, S), dtype=torch.bool, device=device)
    if causal:
        vis = torch.arange(S, device=device)[None, :] <= (S - L) + torch.arange(L, device=device)[:, None]
    vis = vis[None, None].expand(B, 1, L, S)
    if kv_mask is not None:
        vis = vis & kv_mask[:, None, None, :]
    return vis


def _sdpa_concat(q, k, v, pk, pv, kv_mask, causal, scale, dropout, task_ids=None):
    """Unfused attention over [prefix ; sequence] with torch SDPA: used only where the fused op has no
    counterpart (attention-probability dropout while training) and, without a prefix, for modules
    that carry none (cross-attention). ``pk``/``pv`` [Hkv, P, D], or [T, Hkv, P, D] with ``task_ids``."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    vis = _visibility(B, L, S, kv_mask, causal, q.device)
    if pk is not None:
        P = pk.shape[-2]
        # per-row prefixes (this unfused fallback gathers them) or one broadcast prefix
        rows_k, rows_v = prefix_rows(pk, task_ids, B), prefix_rows(pv, task_ids, B)
        k = torch.cat([rows_k.to(q.dtype), k], dim=2)
        v = torch.cat([rows_v.to(q.dtype), v], dim=2)
        vis = torch.cat([vis.new_ones((B, 1, L, P)), vis], dim=-1)
    else:  # a query that sees nothing attends everywhere (its output is padding anyway)
        vis = vis | ~vis.any(-1, keepdim=True)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=vis, dropout_p=dropout, scale=scale)


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] (cache included),
    attention_mask from ``prefix_padding_mask`` (2D or None). Returns ([B, L, Hq, D], None)."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} passes {name}=..., which prefix attention does not "
                                      "support")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    kv_mask, key, value = _kv_mask(attention_mask, key, value)
    layer = module.__dict__.get(LAYER_ATTR)
    state = module.__dict__.get(MODULE_STATE_ATTR)
    # not a prefixed module (e.g. cross-attention), or the prefix is switched off (PEFT's disable_adapter)
    if layer is None or state is None or not state.enabled():
        out = _sdpa_concat(query, key, value, None, None, kv_mask, causal, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None
    e = kwargs.get(PREFIX_KWARG)
    if e is None:  # called outside the model's forward, or the prefix is made per layer (see _pre_hook)
        e = state.encoder()
    pk, pv = state.encoder.layer_prefix(e, layer)  # [Hkv, P, D], or [T, Hkv, P, D] for T tasks
    tasks = None
    if pk.dim() == 4:
        tasks = kwargs.get(TASKS_KWARG)
        if tasks is None:
            raise ValueError(f"task_ids is required: this model has prefixes for num_tasks={pk.shape[0]} tasks; pass "
                             f"task_ids=[batch] integers in [0, {pk.shape[0]}) to the model's forward or generate")
    P = pk.shape[-2]
    window = kwargs.get("sliding_window")
    if window is not None and P + key.shape[2] > window:
        raise NotImplementedError(
            f"prefix ({P}) + sequence ({key.shape[2]}) keys exceed the sliding window ({window}) of layer {layer}; "
            "prefix attention supports sliding-window layers only while everything fits in the window")
    if pk.shape[-3] != key.shape[1] or pk.shape[-1] != key.shape[3]:
        raise ValueError(f"layer {layer}: the prefix has {pk.shape[-3]} kv heads of size {pk.shape[-1]} but the "
                         f"attention module produces {key.shape[1]} of size {key.shape[3]}")
    if tasks is not None and tasks.shape[0] != query.shape[0]:
        raise ValueError(f"task_ids has {tasks.shape[0]} entries but layer {layer} runs a batch of {query.shape[0]} "
                         "rows; expected one task id per row")
    if dropout and dropout > 0.0:
        out = _sdpa_concat(query, key, value, pk, pv, kv_mask, causal, scaling, dropout, tasks)
    else:
        # tasks come from check_task_ids (once per forward): the op skips its per-layer range check,
        # which reads the ids (a device synchronization per layer on a GPU)
        out = prefix_attention(query, key, value, pk, pv, kv_mask, tasks, causal, scaling, state.config.backend,
                               check_task_range=False, joined=joined_provider(key, value))
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------
# mask function
# ----------------------------------------------------------------------------------------


def _mask_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, device) -> str:
    """"causal" or "bidirectional": the pattern ``mask_function`` describes; anything else raises."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is causal_mask_function:
        return "causal"
    if mask_function is bidirectional_mask_function:
        return "bidirectional"
    q = torch.arange(q_length, device=device) + q_offset
    kv = torch.arange(kv_length, device=device) + kv_offset
    try:
        got = mask_function(torch.arange(batch_size, device=device)[:, None, None],
                            torch.zeros((), dtype=torch.long, device=device), q[None, :, None], kv[None, None, :])
        got = torch.as_tensor(got, device=device).to(torch.bool).expand(batch_size, q_length, kv_length)
    except Exception as e:  # a mask function that does not take index tensors
        raise NotImplementedError(f"prefix attention cannot evaluate the model's mask function "
                                  f"{getattr(mask_function, '__qualname__', mask_function)}: {e}") from None
    if bool(got.all()):
        return "bidirectional"
    if bool((got == (kv[None, :] <= q[:, None])[None]).all()):
        return "causal"
    raise NotImplementedError(
        "the model asks for an attention pattern other than plain causal or bidirectional (e.g. packed sequences, "
        "a sliding window shorter than the sequence, or image-token overlays), which prefix attention does not support")


def prefix_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: Optional[torch.Tensor] = None, device=None, **kwargs):
    """transformers mask function: the 2D boolean padding mask over the keys, or None when every key
    is real (the attention function adds causality and the always-visible prefix itself)."""
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    if device is None:
        device = attention_mask.device if attention_mask is not None else "cpu"
    pattern = _mask_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, device)
    visible = kv_length
    if pattern == "causal":
        end = int(q_offset) + q_length - int(kv_offset)  # a pre-allocated cache holds keys up to the last query
        visible = min(kv_length, max(end, 0))
    if attention_mask is None:
        if visible == kv_length:
            return None
        return torch.ones((batch_size, visible), dtype=torch.bool, device=device)
    m = attention_mask.to(torch.bool)
    if m.shape[-1] > kv_length:
        m = m[:, -kv_length:]
    if m.shape[-1] > visible:
        m = m[:, :visible]
    if m.shape[-1] == kv_length and not torch.compiler.is_compiling() and bool(m.all()):
        return None  # no padding: the unmasked path (eager only: reading the mask would break a compiled graph)
    return m


def register_attention() -> None:
    """Register the attention and mask functions under ``ATTN_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, prefix_padding_mask)


