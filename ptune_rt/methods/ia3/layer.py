"""The module that replaces a frozen linear layer: :class:`IA3Linear`.

It keeps PEFT's attribute layout (``base_layer``, ``ia3_l[adapter]`` of shape [out, 1], or [1, in]
for a feedforward layer) so parameter names, state dicts and optimizers line up with PEFT's, and
runs forward through the fused op ``ptune_rt.ops.ia3_linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_rt.ops.backend import BACKENDS, resolve_backend
from ptune_rt.ops.ia3_linear import ia3_linear, scale_channels
from ptune_rt.targets import linear_shape


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so -0.0 != 0.0 and NaN payloads compare exactly)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.contiguous().view(ints[t.element_size()])


class _Patch:
    """What restores one merged tensor bit for bit: the flat positions where undoing the scale
    (``cast(merged / l)``) does not give the original back, with the original values there; or
    ``index=None`` and ``values`` a full copy when that is smaller."""

    __slots__ = ("index", "values")

    def __init__(self, original: torch.Tensor, undone: torch.Tensor):
        index = (_bits(undone) != _bits(original)).view(-1).nonzero().squeeze(1)
        if original.numel() < 2**31:
            index = index.to(torch.int32)
        if index.numel() * (index.element_size() + original.element_size()) >= original.numel() * original.element_size():
            self.index, self.values = None, original.detach().clone()
        else:
            self.index, self.values = index, original.detach().contiguous().view(-1)[index.long()]

    def apply(self, undone: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return self.values.to(undone.device)
        undone = undone.contiguous()
        undone.view(-1)[self.index.to(device=undone.device, dtype=torch.long)] = self.values.to(undone.device)
        return undone

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.values) if t is not None)


class _MergeRecord:
    """A snapshot of the merged vector and the patches of the weight and bias (see ``IA3Linear.merge``)."""

    __slots__ = ("adapter", "scale", "weight", "bias")

    def __init__(self, adapter, scale, weight, bias):
        self.adapter, self.scale, self.weight, self.bias = adapter, scale, weight, bias

    def extra_bytes(self) -> int:
        own = self.scale.numel() * self.scale.element_size()
        return own + sum(p.extra_bytes() for p in (self.weight, self.bias) if p is not None)


class IA3Linear(nn.Module):
    """A frozen nn.Linear / GPT-2 Conv1D whose output channels (or, with ``is_feedforward``, input
    channels) a trainable vector scales, run by the fused op.

    ``merge()`` folds the active vector into the base weight (and, for an output scale, the bias);
    ``unmerge()`` gives back the original weight and bias bit for bit.
    """

    WRAPS_LAYER = True  # stands in for its base layer (see ptune_rt.targets.module_view)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, backend: str = "auto",
                 adapter_name: str = "default", init_ia3_weights: bool = True):
        super().__init__()
        self._init_base(base_layer, is_feedforward, backend, adapter_name)
        self.ia3_l = nn.ParameterDict()
        self.add_adapter(adapter_name, init_ia3_weights)

    def _init_base(self, base_layer: nn.Module, is_feedforward: bool, backend: str, adapter_name: str) -> None:
        in_f, out_f = linear_shape(base_layer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(is_feedforward, bool):
            raise TypeError(f"is_feedforward must be True or False, got {is_feedforward!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.backend = backend
        self.active_adapter = adapter_name
        self.merged = False
        self.disabled = False
        self._merge_record: Optional[_MergeRecord] = None
        self._rows: Optional[tuple] = None  # per-row vectors of a mixed batch: see _mixed_forward

    @classmethod
    def from_vectors(cls, base_layer: nn.Module, ia3_l: nn.ParameterDict, is_feedforward: bool, *,
                     adapter_name: str, backend: str = "auto") -> "IA3Linear":
        """Wrap existing modules without copying: ``ia3_l`` (PEFT's ParameterDict) becomes
        ``self.ia3_l``, the very same object, so its Parameters (and an optimizer holding them)
        carry over."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_base(base_layer, is_feedforward, backend, adapter_name)
        if not isinstance(ia3_l, nn.ParameterDict):
            raise TypeError(f"ia3_l must be an nn.ParameterDict, got {type(ia3_l).__name__}")
        for name, p in ia3_l.items():
            if tuple(p.shape) != self.vector_shape():
                raise ValueError(f"ia3_l[{name!r}] must have shape {list(self.vector_shape())} "
                                 f"({'feedforward' if is_feedforward else 'output'} scale), got {list(p.shape)}")
        self.ia3_l = ia3_l
        return self

    def vector_shape(self) -> tuple[int, int]:
        """PEFT's shape of a vector: [out, 1] (output scale) or [1, in] (feedforward)."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add_adapter(self, name: str, init_ia3_weights: bool = True) -> None:
        """A new vector ``name``: ones (the identity) or, without ``init_ia3_weights``, N(0, 1)
        values; fp32 on a half-precision base (PEFT's autocast_adapter_dtype), else the base dtype."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists in this IA3Linear (has {list(self.ia3_l)})")
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        shape = self.vector_shape()
        value = (torch.ones(shape, dtype=dtype, device=w.device) if init_ia3_weights
                 else torch.randn(shape, dtype=dtype).to(w.device))
        self.ia3_l[name] = nn.Parameter(value)

    def delete_adapter(self, name: str) -> None:
        if name not in self.ia3_l:
            raise KeyError(f"{name!r} is not an adapter of this module (has {list(self.ia3_l)})")
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is the active adapter: activate another one first")
        del self.ia3_l[name]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def base_weight_nk(self) -> torch.Tensor:
        """The frozen weight as an [out, in] view (no copy for Conv1D's [in, out] layout)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def backend_choice(self) -> tuple[str, str]:
        return resolve_backend(self.backend, self.base_layer.weight.device)

    # ------------------------------------------------------------------------------------
    # merge / unmerge
    # ------------------------------------------------------------------------------------

    def _weight_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply the base weight in its own layout: ``diag(l) W`` for an
        output scale, ``W diag(l)`` for an input scale (Conv1D's [in, out] layout transposes both)."""
        along_out = not self.is_feedforward
        rows = along_out != self.fan_in_fan_out  # the scale runs along the weight's first dimension
        flat = scale.reshape(-1)
        return flat[:, None] if rows else flat[None, :]

    def held_adapters(self) -> list[str]:
        """The names of the adapters this module holds."""
        return list(self.ia3_l)

    def set_adapters_trainable(self, flag: bool) -> None:
        for p in self.ia3_l.values():
            p.requires_grad_(flag)

    def merge(self) -> None:
        """Fold the active vector into the base weight: ``W <- cast(diag(l) W)`` and
        ``b <- cast(b * l)`` for an output scale, ``W <- cast(W diag(l))`` for an input scale
        (products in the wider of the two dtypes, rounded once, as PEFT's merge).

        Exact unmerge: dividing by l does not always give W back (rounding, and l = 0). ``merge``
        therefore computes ``cast(merged / l)`` right away and records the flat positions where it
        differs from W (bit patterns) with W's values there, plus a copy of l; ``unmerge``
        recomputes the division and patches those positions, so weight and bias come back bit
        for bit. Extra memory while merged: the vector plus (4 + itemsize) bytes per patched
        element, capped at one copy of W (a plain copy is kept when that is smaller; see
        ``merge_extra_bytes``). Refuses (changing nothing) when the merged weight would not be
        finite."""
        if self.merged:
            return
        name = self.active_adapter
        if self.disabled:
            raise RuntimeError("cannot merge: the adapter of this IA3Linear is disabled (disabled=True)")
        if name not in self.ia3_l:
            raise KeyError(f"active_adapter {name!r} is not an adapter of this module (has {list(self.ia3_l)})")
        w, b = self.base_layer.weight, self.base_layer.bias
        if w.is_meta or self.ia3_l[name].is_meta:
            raise ValueError(META_MERGE)
        with torch.no_grad():
            scale = self.ia3_l[name].detach().clone()
            merged_w, patch_w = self._merged(w, self._weight_scale(scale))
            merged_b = patch_b = None
            if b is not None and not self.is_feedforward:
                merged_b, patch_b = self._merged(b, scale.reshape(-1))
            if not bool(torch.isfinite(merged_w).all()) and bool(torch.isfinite(w).all()):
                raise ValueError(f"merging adapter {name!r} would make the {w.dtype} base weight non-finite; the "
                                 "weight was left unchanged")
            w.copy_(merged_w)
            if merged_b is not None:
                b.copy_(merged_b)
        self._merge_record = _MergeRecord(name, scale, patch_w, patch_b)
        self.merged = True

    @staticmethod
    def _merged(t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, _Patch]:
        cdt = torch.promote_types(t.dtype, scale.dtype)
        merged = (t.detach().to(cdt) * scale.to(cdt)).to(t.dtype)
        return merged, _Patch(t.detach(), (merged.to(cdt) / scale.to(cdt)).to(t.dtype))

    def unmerge(self) -> None:
        """Take the merged vector out of the base weight (and bias) again, bit for bit (see ``merge``).
        A no-op when not merged."""
        if not self.merged:
            return
        rec = self._merge_record
        w, b = self.base_layer.weight, self.base_layer.bias
        with torch.no_grad():
            scale = rec.scale.to(w.device)
            w.copy_(self._undone(w, self._weight_scale(scale), rec.weight))
            if rec.bias is not None:
                b.copy_(self._undone(b, scale.reshape(-1), rec.bias))
        self._merge_record = None
        self.merged = False

    @staticmethod
    def _undone(t: torch.Tensor, scale: torch.Tensor, patch: _Patch) -> torch.Tensor:
        cdt = torch.promote_types(t.dtype, scale.dtype)
        return patch.apply((t.detach().to(cdt) / scale.to(cdt)).to(t.dtype))

    def merge_extra_bytes(self) -> int:
        """Bytes held while merged to make ``unmerge`` exact (0 when not merged)."""
        return self._merge_record.extra_bytes() if self._merge_record is not None else 0

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            return self._mixed_forward(x)
        name = self.active_adapter
        if self.merged or self.disabled or name not in self.ia3_l:
            return self._merged_guard(self.base_layer(x))
        return ia3_linear(x, self.base_weight_nk(), self.base_layer.bias, self.ia3_l[name].view(-1),
                          self.is_feedforward, self.backend)

    def _merged_guard(self, y: torch.Tensor) -> torch.Tensor:
        """``y``, tied to the merged vector while training it so that backward raises a clear error
        (a merged vector gets no gradient) instead of leaving it silently untrained."""
        name = self.active_adapter
        if not (self.merged and self.training and torch.is_grad_enabled() and name in self.ia3_l):
            return y
        v = self.ia3_l[name]
        return _MergedVectorGuard.apply(y, v) if v.requires_grad else y

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch whose rows use different adapters' vectors (``mixed_adapters``), inference only.

        Torch path: one base GEMM for the whole batch and one multiply by the per-row vectors (the
        vectors gathered per row, [batch, 1.., features]), on the output or, feedforward, on the
        input. Triton path: one fused launch per adapter on the rows that use it (the kernel's
        scales are per column, shared by the rows of a launch)."""
        batch, groups, stacked, index = self._rows
        if torch.is_grad_enabled():
            raise RuntimeError("a mixed-adapter batch (mixed_adapters) runs inference only: call the model under "
                               "torch.no_grad() (generate() does)")
        if x.dim() < 2 or x.shape[0] != batch:
            raise ValueError(f"mixed_adapters was given {batch} adapter names, one per row, but this layer got a "
                             f"batch of {x.shape[0] if x.dim() else 0} rows (input {tuple(x.shape)}); pass one name "
                             "per row of the batch the model runs")
        w, bias = self.base_weight_nk(), self.base_layer.bias
        if self.backend_choice()[0] == "triton":
            y = x.new_empty((*x.shape[:-1], self.out_features))
            for name, rows in groups:
                rows = rows.to(x.device)
                scale = self.ia3_l[name].view(-1) if name is not None else None
                xr = x.index_select(0, rows)
                yr = (ia3_linear(xr, w, bias, scale, self.is_feedforward, self.backend) if scale is not None
                      else self.base_layer(xr))
                y.index_copy_(0, rows, yr)
            return y
        per_row = stacked.to(x.device)[index.to(x.device)][:, None, :]  # [batch, 1, features]
        x3 = x.reshape(batch, -1, x.shape[-1])
        if self.is_feedforward:
            y = self._linear_rows(scale_channels(x3, per_row), w, bias)
        else:
            y = scale_channels(self._linear_rows(x3, w, bias), per_row)
        return y.reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _linear_rows(x3: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The base layer on [batch, tokens, in] as the op's torch path runs it (one 2D GEMM)."""
        x2 = x3.reshape(-1, x3.shape[-1])
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        return y.view(x3.shape[0], x3.shape[1], w.shape[0])

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, feedforward={self.is_feedforward}, "
                f"backend={self.backend}, merged={self.merged}")


#: The error of merging on the meta device, where there are no weights to merge.
META_MERGE = ("cannot merge: the weights are on the meta device (they hold no data); load the real weights first")


class _MergedVectorGuard(torch.autograd.Function):
    """Identity on a merged layer's output tied to its vector, so that backward raises a clear error."""

    @staticmethod
    def forward(ctx, y, v):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        raise RuntimeError("an IA3 layer has its vector merged into the base weight, so the vector gets no "
                           "gradient: unmerge the model before training it (or freeze its ia3_l with "
                           "requires_grad_(False) to train other parameters)")
