"""Counting dispatched ops with a ``TorchDispatchMode``.

The mode sees every op that reaches the Python dispatch key, i.e. after autograd and after
composite ops (``aten::linear``) have been decomposed, which is what eager mode really executes.
Counts are split by kind and by place:

* ``all``: every dispatched op, metadata-only ones included (views such as ``t``/``view``/``expand``,
  ``detach``, a ``.to`` that returns its input).
* ``compute``: ops that touch data (each is at least one kernel launch in eager mode).
* ``in_lora``: dispatched while a LoRA linear's forward runs (PEFT's ``lora.Linear`` or ptune-rt's
  ``LoRALinear``; the frozen base linear inside it included).

ptune-rt's fused op is a torch custom op (``ptune_rt::lora_linear_fwd``) and is dispatched as
one op. With ``descend=True`` the mode also enters it (redispatching to its backend kernel with
the mode still active) so the ops *inside* it on the torch path are counted too; the custom op
itself is then still counted once and its contents are reported separately as ``inside_custom``.
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ptune_rt.bench.memory import _Where

OWN_NAMESPACE = "ptune_rt"


def _storages(x) -> set:
    if isinstance(x, torch.Tensor):
        try:
            ptr = x.untyped_storage().data_ptr()
        except Exception:  # tensors without storage (e.g. some subclasses)
            return set()
        return {ptr} if ptr else set()
    if isinstance(x, (list, tuple)):
        return set().union(*(_storages(y) for y in x)) if x else set()
    return set()


def _is_metadata_only(func, args, out) -> bool:
    """True for ops that move no data: views, detach, ``_unsafe_view``, a ``.to`` returning its input.

    In-place and out= ops (which alias their output to an input too) are compute.
    """
    if func._schema.is_mutable:
        return False
    if getattr(func, "is_view", False) or func.__name__.split(".")[0] in ("detach", "alias", "lift_fresh"):
        return True
    out_s = _storages(out)
    return bool(out_s) and out_s <= _storages(list(args))


class OpCounter(TorchDispatchMode):
    def __init__(self, model=None, descend: bool = False):
        super().__init__()
        self.descend = descend
        self.where = _Where(model) if model is not None else None
        self.inside_custom = 0
        self.counts = collections.Counter()
        self.names = collections.Counter()
        self.lora_names = collections.Counter()  # (op, "compute" | "metadata") inside LoRA linears

    def _record(self, func, args, out, custom_depth: int):
        name = f"{func.namespace}::{func.__name__.split('.')[0]}"
        meta = _is_metadata_only(func, args, out) and func.namespace != OWN_NAMESPACE
        # ptune-rt's own ops count as LoRA-linear ops wherever they run: under the SwiGLU recompute
        # path the down projection's op runs inside its MLP's call, not inside the LoRA module's
        in_lora = (self.where is not None and self.where.depth > 0) or func.namespace == OWN_NAMESPACE
        if custom_depth:
            self.counts["inside_custom_all"] += 1
            if not meta:
                self.counts["inside_custom_compute"] += 1
            return
        self.names[name] += 1
        self.counts["all"] += 1
        if not meta:
            self.counts["compute"] += 1
        if in_lora:
            self.lora_names[(name, "metadata" if meta else "compute")] += 1
            self.counts["in_lora_all"] += 1
            if not meta:
                self.counts["in_lora_compute"] += 1
        if func.namespace == OWN_NAMESPACE:
            self.counts["custom"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        depth = self.inside_custom
        if self.descend and func.namespace == OWN_NAMESPACE:
            key = torch._C.DispatchKey.CUDA if any(
                isinstance(a, torch.Tensor) and a.is_cuda for a in args) else torch._C.DispatchKey.CPU
            self.inside_custom += 1
            try:
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
            finally:
                self.inside_custom -= 1
        else:
            out = func(*args, **kwargs)
        self._record(func, args, out, depth)
        return out

    def close(self):
        if self.where is not None:
            self.where.remove()

    def result(self, n_lora: int) -> dict:
        c = self.counts
        res = {k: int(c.get(k, 0)) for k in ("all", "compute", "in_lora_all", "in_lora_compute", "custom",
                                             "inside_custom_all", "inside_custom_compute")}
        # per LoRA linear that ran as a module (the forward hooks saw it); under the SwiGLU recompute
        # path a down projection runs inside its MLP instead, so it is left out of the average
        calls = getattr(self.where, "lora_calls", 0)  # prefix counting swaps in its own scope tracker
        res["lora_module_calls"] = calls
        n = max(1, calls if 0 < calls < n_lora else n_lora)
        res["per_lora_linear_all"] = res["in_lora_all"] / n
        res["per_lora_linear_compute"] = res["in_lora_compute"] / n
        # the custom op replaced by what it runs inside (torch path); equal to the plain count when
        # nothing was descended into
        expanded_lora = res["in_lora_compute"] - (res["custom"] if self.descend else 0) + res["inside_custom_compute"]
        res["per_lora_linear_compute_expanded"] = expanded_lora / n
        res["compute_expanded"] = res["compute"] - (res["custom"] if self.descend else 0) + res["inside_custom_compute"]
        res["top_ops"] = dict(self.names.most_common(12))
        res["per_lora_linear_ops"] = {f"{op} ({kind})": c / n for (op, kind), c in sorted(
            self.lora_names.items(), key=lambda kv: (kv[0][1], -kv[1]))}
        return res


def count_ops(model, fn, n_lora: int, descend: bool) -> dict:
    counter = OpCounter(model, descend=descend)
    try:
        with counter:
            fn()
    finally:
        counter.close()
    return counter.result(n_lora)
