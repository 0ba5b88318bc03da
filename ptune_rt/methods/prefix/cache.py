"""A KV-cache layer that keeps P free rows in front of the cached keys, for prefix decode.

On the torch path a decode step attends one query over ``[prefix ; cache]`` with a single SDPA
call, which wants the two in one tensor. Built per step that is a concatenation of the whole
cache per layer (plus the one ``DynamicLayer.update`` already does): O(P + T) copies per layer
per token. :class:`PrefixedDynamicLayer` removes both. It is a ``transformers`` ``DynamicLayer``
whose keys and values live in one buffer ``[B, H, P + capacity, D]`` per side:

* the model sees only the cached part: ``layer.keys`` is the view ``buf[:, :, P:P + n]``, so
  everything transformers does with a dynamic layer (lengths, masks, ``crop``, beam reordering,
  batch selection, offloading) works unchanged, and the prefix stays out of the cache;
* ``update`` appends new tokens in place (a full buffer regrows with a quarter spare, at least 256
  slots: amortized O(1) per token, where ``DynamicLayer`` copies the whole cache at every step);
* the prefix attention function (:func:`joined_provider`) writes each row's prefix into the
  front rows once, stamped by the prefix tensors and task ids it came from (object identity,
  data pointer and version counter, so new prefix weights or other task ids are written again),
  and attends over ``buf[:, :, :P + n]`` directly.

Any assignment of ``keys`` / ``values`` that is not a shortening of the layer's own view (beam
reordering, batch selection, offloading, ``reset``) rebuilds the buffer from the assigned tensor
and marks the prefix rows stale. A grad-enabled update with inputs that require grad turns the
layer back into a plain ``DynamicLayer`` (in-place writes would not carry gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptune_rt.ops.prefix_attention import prefix_rows

#: Attribute put on the views the layer hands out, naming the layer that owns their buffer.
OWNER_ATTR = "_ptune_rt_prefixed_layer"
#: Spare token slots a buffer gets beyond what it holds: at least this many ...
_MIN_SPARE = 256
#: ... and at least this fraction of what it holds (memory stays within 1.25x of the cache's own,
#: and a long generation regrows the buffer only every quarter of its length)
_SPARE_FRACTION = 0.25


def _capacity(n: int) -> int:
    return n + max(_MIN_SPARE, int(n * _SPARE_FRACTION))


def _dynamic_layer_class():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _Side:
    """One of keys / values: the buffer, the number of cached tokens in it."""

    __slots__ = ("buf", "n")

    def __init__(self):
        self.buf: Optional[Tensor] = None
        self.n = 0


def _make_class():
    DynamicLayer = _dynamic_layer_class()

    class PrefixedDynamicLayer(DynamicLayer):
        def _side(self, name: str) -> _Side:
            return self.__dict__[f"_ptune_rt_{name}"]

        def _view(self, name: str) -> Optional[Tensor]:
            s = self._side(name)
            if s.buf is None:
                return self.__dict__.get(f"_ptune_rt_{name}_raw")
            P = self._ptune_rt_P
            out = s.buf[:, :, P:P + s.n]
            setattr(out, OWNER_ATTR, self)
            return out

        def _assign(self, name: str, value) -> None:
            s = self._side(name)
            raw = f"_ptune_rt_{name}_raw"
            P = self._ptune_rt_P
            if value is None or not isinstance(value, Tensor) or value.dim() != 4:
                # None (reset) or DynamicLayer's empty placeholder: no buffer until the first update
                s.buf, s.n = None, 0
                self.__dict__[raw] = value
                self._ptune_rt_stamp = None
                return
            buf = s.buf
            if (buf is not None and value._base is buf and value.shape[:2] == buf.shape[:2]
                    and value.shape[3] == buf.shape[3] and value.stride() == buf.stride()
                    and value.storage_offset() == buf.storage_offset() + P * buf.stride(2)
                    and value.shape[2] <= buf.shape[2] - P):
                s.n = value.shape[2]  # a shortening of our own view (crop): nothing to copy
                return
            n = value.shape[2]
            self._fresh(name, value, n)[:, :, P:P + n].copy_(value)  # prefix rows stale until written
            s.n = n

        def _fresh(self, name: str, like: Tensor, n: int) -> Tensor:
            """A new empty buffer for side ``name`` with room for ``n`` tokens, shaped like ``like``
            [B, H, *, D]; its prefix rows are not written yet (the stamp is cleared)."""
            B, H, _, D = like.shape
            s = self._side(name)
            s.buf, s.n = like.new_empty((B, H, self._ptune_rt_P + _capacity(n), D)), 0
            self.__dict__.pop(f"_ptune_rt_{name}_raw", None)
            self._ptune_rt_stamp = None
            return s.buf

        keys = property(lambda self: self._view("keys"), lambda self, v: self._assign("keys", v))
        values = property(lambda self: self._view("values"), lambda self, v: self._assign("values", v))

        def _append(self, name: str, states: Tensor) -> None:
            s = self._side(name)
            P, L = self._ptune_rt_P, states.shape[2]
            buf = s.buf
            if buf is None or buf.shape[:2] != states.shape[:2] or buf.shape[3] != states.shape[3] or \
                    buf.dtype != states.dtype or buf.device != states.device:
                if buf is not None and s.n:  # a batch or dtype change: DynamicLayer's cat would fail too
                    raise RuntimeError(f"cache update of shape {tuple(states.shape)} {states.dtype} does not match the "
                                       f"cached {tuple(buf[:, :, P:P + s.n].shape)} {buf.dtype}")
                buf = self._fresh(name, states, L)
            elif P + s.n + L > buf.shape[2]:
                grown = buf.new_empty((*buf.shape[:2], P + _capacity(s.n + L), buf.shape[3]))
                grown[:, :, :P + s.n].copy_(buf[:, :, :P + s.n])  # prefix rows included: the stamp holds
                s.buf = buf = grown
            buf[:, :, P + s.n:P + s.n + L].copy_(states)
            s.n += L

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
                release(self)  # in-place appends would not carry gradients: back to concatenation
                return self.update(key_states, value_states, *args, **kwargs)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._append("keys", key_states)
            self._append("values", value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            if not self.is_initialized:
                return 0
            return self._side("keys").n

        def joined(self, prefix_k: Tensor, prefix_v: Tensor, task_ids: Optional[Tensor]):
            """``(keys, values)`` [B, H, P + n, D]: every row's prefix (``prefix_k``/``prefix_v`` [H, P, D],
            or [T, H, P, D] picked by ``task_ids``) in front of the cached tokens, written into the
            front rows only when the prefix or the task ids differ from the last ones written."""
            ks, vs = self._side("keys"), self._side("values")
            P = self._ptune_rt_P
            if ks.buf is None or vs.buf is None or ks.n != vs.n or prefix_k.shape[-2] != P:
                return None
            stamp = (_tensor_stamp(prefix_k), _tensor_stamp(prefix_v),
                     None if task_ids is None else _tensor_stamp(task_ids))
            if not _same_stamp(stamp, self._ptune_rt_stamp):
                B = ks.buf.shape[0]
                for side, pre in ((ks, prefix_k), (vs, prefix_v)):
                    side.buf[:, :, :P].copy_(prefix_rows(pre, task_ids, B))
                self._ptune_rt_stamp = stamp
            return ks.buf[:, :, :P + ks.n], vs.buf[:, :, :P + vs.n]

    PrefixedDynamicLayer.__doc__ = "A ``DynamicLayer`` with P free rows in front of its keys and values (see " \
        "``ptune_rt.methods.prefix.cache``)."
    return PrefixedDynamicLayer


def _tensor_stamp(t: Tensor):
    """What identifies a tensor's contents while the stamp holds it: the tensor it views (the
    prefix arrives as fresh views of one cached tensor at every step), the region, the version."""
    return (t._base if t._base is not None else t, t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype)


def _same_stamp(a, b) -> bool:
    """Stamps of :func:`_tensor_stamp` (or None) pairwise equal, tensors compared by identity."""
    if a is None or b is None:
        return False
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is not None and (x[0] is not y[0] or x[1:] != y[1:]):
            return False
    return True


_CLASS = None


def prefixed_layer_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def adopt(layer, num_virtual_tokens: int) -> bool:
    """Turn a plain ``DynamicLayer`` (exactly that class, nothing derived) into a
    :class:`PrefixedDynamicLayer` with ``num_virtual_tokens`` front rows, keeping what it holds.
    Returns whether the layer is (now) such a layer for this P."""
    cls = prefixed_layer_class()
    if type(layer) is cls:
        return layer._ptune_rt_P == num_virtual_tokens
    if type(layer) is not _dynamic_layer_class():
        return False
    d = layer.__dict__
    keys, values = d.pop("keys", None), d.pop("values", None)
    d["_ptune_rt_keys"], d["_ptune_rt_values"] = _Side(), _Side()
    d["_ptune_rt_P"] = int(num_virtual_tokens)
    d["_ptune_rt_stamp"] = None
    # transformers' cache builds its DynamicLayer objects itself (no factory to pass): the layer
    # becomes the prefixed subclass in place, keeping every attribute the cache reads
    layer.__class__ = cls
    layer.keys, layer.values = keys, values
    return True


def release(layer) -> None:
    """Turn a :class:`PrefixedDynamicLayer` back into a plain ``DynamicLayer`` holding the same cache."""
    if type(layer) is not prefixed_layer_class():
        return
    keys, values = layer.keys, layer.values
    if isinstance(keys, Tensor) and keys.dim() == 4:
        keys, values = keys.contiguous(), values.contiguous()
    for name in ("_ptune_rt_keys", "_ptune_rt_values", "_ptune_rt_P", "_ptune_rt_stamp", "_ptune_rt_keys_raw",
                 "_ptune_rt_values_raw"):
        layer.__dict__.pop(name, None)
    layer.__class__ = _dynamic_layer_class()
    layer.keys, layer.values = keys, values


def adopt_cache(cache, num_virtual_tokens: int, layers) -> None:
    """Adopt the plain dynamic layers ``layers`` (indices) of a transformers cache; anything else
    (static, sliding-window, quantized, offloaded or legacy caches) is left as it is."""
    cache_layers = getattr(cache, "layers", None)
    if not isinstance(cache_layers, list) or getattr(cache, "offloading", False):
        return
    for i in layers:
        if 0 <= i < len(cache_layers):
            adopt(cache_layers[i], num_virtual_tokens)


def joined_provider(key: Tensor, value: Tensor):
    """For a key/value pair handed out by a :class:`PrefixedDynamicLayer` (its current views), a
    callable ``(prefix_k, prefix_v, task_ids) -> (keys, values) or None``; otherwise None."""
    layer = getattr(key, OWNER_ATTR, None)
    if layer is None or getattr(value, OWNER_ATTR, None) is not layer:
        return None
    P = layer._ptune_rt_P
    for t, s in ((key, layer._side("keys")), (value, layer._side("values"))):
        if s.buf is None or t.shape[2] != s.n or \
                t.data_ptr() != s.buf.data_ptr() + P * s.buf.stride(2) * s.buf.element_size():
            return None  # an older view: the layer has moved on
    return layer.joined
