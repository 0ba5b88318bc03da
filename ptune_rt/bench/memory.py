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
    """Tracks whether execution is inside a LoRA linear and, optionally, which module class runs
    innermost (a LoRA linear counts as one module: what runs inside it is its own).

    Global module hooks (``register_module_forward_pre_hook`` / ``..._forward_hook``), filtered to
    ``model``'s modules, not hooks on the modules themselves: a hook registered on a LoRA linear
    would change what runs (ptune-rt's SwiGLU recompute path steps aside for a hooked down
    projection), a global one does not. Under that path the down projection runs inside its MLP's
    call, so what it saves is counted under the MLP."""

    def __init__(self, model: nn.Module, track_modules: bool = False):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.depth = 0
        self.lora_calls = 0  # LoRA modules entered (a SwiGLU-recompute down projection is not)
        self.stack: list[str] = []
        self.track_modules = track_modules
        self.labels = {id(m): ("LoRA linear" if is_lora_module(m) else type(m).__name__) for m in model.modules()}
        self.lora_ids = {id(m) for m in model.modules() if is_lora_module(m)}
        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]

    def _pre(self, module, *_) -> None:  # hooks must return None (a value would replace the input)
        key = id(module)
        if key in self.lora_ids:
            self.depth += 1
            self.lora_calls += 1
        if self.track_modules and key in self.labels:
            self.stack.append(self.labels[key])

    def _post(self, module, *_) -> None:  # ... or the output
        key = id(module)
        if key in self.lora_ids:
            self.depth -= 1
        if self.track_modules and key in self.labels:
            self.stack.pop()

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
