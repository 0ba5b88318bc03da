"""Bytes saved for backward by one training step.

Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``. We count
unique storages (a tensor saved twice, or two views of one buffer, cost one storage) and split them:

* ``parameters``: storages of the model's parameters and buffers. Autograd saves them by
  reference, so they cost nothing beyond the model itself; reported, never added to the cost.
* ``activations``: everything else, the memory a training step really holds until backward.
  Split further by where it was saved: inside a LoRA linear (PEFT's ``lora.Linear`` or
  ptune-rt's ``LoRALinear``) or in the rest of the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ptune_rt.bench.workload import is_lora_module


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())


class _Where:
    """Tracks (forward hooks) whether execution is inside a LoRA linear and, optionally, which
    module class runs innermost (a LoRA linear counts as one module: what runs inside it is its own)."""

    def __init__(self, model: nn.Module, track_modules: bool = False):
        self.depth = 0
        self.stack: list[str] = []
        self.handles = []
        for m in model.modules():
            lora = is_lora_module(m)
            if lora:
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))
            if track_modules:
                label = "LoRA linear" if lora else type(m).__name__
                self.handles.append(m.register_forward_pre_hook(lambda *_, label=label: self._push(label)))
                self.handles.append(m.register_forward_hook(self._pop))

    def _push(self, label: str) -> None:  # hooks must return None (a value would replace the input)
        self.stack.append(label)

    def _pop(self, *_) -> None:  # ... or the output
        self.stack.pop()

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def module(self) -> str:
        if self.depth > 0:
            return "LoRA linear"
        return self.stack[-1] if self.stack else "(outside any module)"

    def remove(self):
        for h in self.handles:
            h.remove()


def saved_for_backward(model: nn.Module, step) -> dict:
    """Run ``step()`` (forward + loss + backward) and account what autograd saved in between."""
    param_keys = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    seen: dict = {}
    counts = {"saved_tensors": 0}

    where = _Where(model, track_modules=True)
    by_module: dict = {}

    def pack(t):
        counts["saved_tensors"] += 1
        if t.device.type == "meta":
            return t
        key = _storage_key(t)
        if key not in seen:
            if key in param_keys:
                cat = "parameters"
            else:
                cat = "activations_lora" if where.depth > 0 else "activations_rest"
                mod = where.module()
                by_module[mod] = by_module.get(mod, 0) + key[3]
            seen[key] = (cat, key[3])
        return t

    def unpack(t):
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            step()
    finally:
        where.remove()
    by_cat = {"parameters": 0, "activations_lora": 0, "activations_rest": 0}
    n_by_cat = dict.fromkeys(by_cat, 0)
    for cat, nbytes in seen.values():
        by_cat[cat] += nbytes
        n_by_cat[cat] += 1
    return {
        "activation_bytes": by_cat["activations_lora"] + by_cat["activations_rest"],
        "activation_bytes_in_lora_linears": by_cat["activations_lora"],
        "activation_bytes_rest_of_model": by_cat["activations_rest"],
        "parameter_bytes_by_reference": by_cat["parameters"],
        "activation_bytes_by_module_type": dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
        "unique_storages": {k: v for k, v in n_by_cat.items()},
        "saved_tensor_count": counts["saved_tensors"],
    }
