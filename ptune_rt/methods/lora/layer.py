"""The fused module that replaces a frozen linear layer: :class:`LoRALinear`.

``LoRALinear`` keeps PEFT's attribute layout (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``scaling[name]``) so parameter names, state dicts and optimizers line up with PEFT's, and runs
forward through the fused op ``ptune_rt.ops.lora_linear``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ptune_rt.ops.dora_linear import dora_linear, row_norms_sq, weight_norm
from ptune_rt.ops.lora_dispatch import (InferencePlan, LoRAArgs, lora_forward, plan_inference, run_inference,
                                        stacked_lora_linear, takes_plain_ops)
from ptune_rt.ops.backend import BACKENDS, resolve_backend
from ptune_rt.ops.lora_linear import OP_DTYPES, lora_linear_group, lora_linear_swiglu
from ptune_rt.methods._config import check_bool, check_choice, check_int, check_number
from ptune_rt.methods.lora.config import INIT_MODES
from ptune_rt.methods.lora.inits import FROZEN_B, initial_adapter
from ptune_rt.targets import linear_shape


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so -0.0 != 0.0 and NaN payloads compare exactly)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.contiguous().view(ints[t.element_size()])


class _MergeRecord:
    """What ``LoRALinear.unmerge`` needs to give back the exact pre-merge weight.

    ``a``, ``b``, ``scale``: a snapshot of the merged adapter (r * (in + out) numbers, small), so the
    delta subtracted is the one that was added even if the live adapter changes meanwhile.
    ``index``, ``values``: the flat positions where ``cast(cast(W + d) - d)`` is not W bit for bit,
    and W's original values there (usually a small fraction of the elements); or ``index=None``
    and ``values`` a full copy of W when that is smaller.
    """

    __slots__ = ("adapter", "a", "b", "scale", "index", "values", "bias")

    def __init__(self, adapter, a, b, scale, index, values, bias=None):
        self.adapter, self.a, self.b, self.scale, self.index, self.values = adapter, a, b, scale, index, values
        self.bias = bias  # the base bias before a lora_bias was folded in (None: untouched)

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.index, self.values, self.bias)
                   if t is not None)


class DoRAMagnitude(nn.Module):
    """A DoRA adapter's trainable magnitude ``weight`` [out_features] (PEFT's ``lora_magnitude_vector``
    entries hold it the same way, so parameter names match)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)


class LoRALinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus a LoRA adapter, run by the fused op.

    An adapter added with ``use_dora=True`` is a DoRA adapter (``lora_magnitude_vector[name]``
    holds its magnitude): forward runs ``ptune_rt.ops.dora_linear`` (its norm without an N x K
    temporary, the rescale inside the fused GEMM).

    ``merge()`` folds ``scale * B @ A`` into the base weight (forward then only calls the base
    layer); ``unmerge()`` takes it out again and gives back the original weight bit for bit.
    """

    WRAPS_LAYER = True  # stands in for its base layer (see ptune_rt.targets.module_view)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", backend: str = "auto",
                 adapter_name: str = "default", use_dora: bool = False, lora_bias: bool = False):
        super().__init__()
        self._init_base(base_layer, backend, adapter_name)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init, use_dora, lora_bias)

    def _init_base(self, base_layer: nn.Module, backend: str, adapter_name: str) -> None:
        in_f, out_f = self.layer_shape(base_layer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.backend = backend
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes
        self._dora_cache: dict = {}  # see _dora_norm
        self.frozen_b: set = set()  # adapters whose lora_B stays frozen (MiCA)
        self._base_before_init: Optional[torch.Tensor] = None  # see _init_from_weight
        self._init_offsets: dict = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged = False
        self.disabled = False
        self._merge_record: Optional[_MergeRecord] = None
        self._inference_cache: Optional[InferencePlan] = None  # see _inference_forward
        self._group: Optional[tuple] = None  # sibling projections of one input: see _grouped_forward
        self._stash: Optional[tuple] = None  # (input, output) a sibling computed for this layer
        self._rows: Optional[tuple] = None  # per-row adapters of a mixed batch: see _mixed_forward
        self._rows_stack: Optional[tuple] = None  # its decode-step operands: see _mixed_stack

    #: Where the adapter's A and B go in a checkpoint, after the module's path (PEFT's file keys).
    CHECKPOINT_KEYS = ("lora_A.weight", "lora_B.weight")
    #: The attributes PEFT's tuner-layer code finds the adapters under (its ``adapter_layer_names``).
    PEFT_ADAPTER_LAYER_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector")

    @staticmethod
    def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
        return linear_shape(base_layer)

    @classmethod
    def from_adapter_modules(cls, base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, *,
                             scaling: float, alpha: Optional[float] = None, dropout: float = 0.0,
                             backend: str = "auto", adapter_name: str = "default",
                             magnitude: Optional[nn.Module] = None) -> "LoRALinear":
        """Wrap existing modules without copying: ``lora_A`` / ``lora_B`` (bias-free nn.Linear,
        weights [r, in] and [out, r]) become ``self.lora_A[adapter_name]`` / ``self.lora_B[...]``,
        the very same objects, so their Parameters (and an optimizer holding them) carry over;
        ``magnitude`` (a module whose ``weight`` is [out], e.g. PEFT's DoRA layer) makes it a DoRA
        adapter, the same object again."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_base(base_layer, backend, adapter_name)
        for what, m in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(m, nn.Module) or not isinstance(getattr(m, "weight", None), torch.Tensor):
                raise TypeError(f"{what} must be an nn.Linear (a module with a weight), got {type(m).__name__}")
        if getattr(lora_A, "bias", None) is not None:
            raise ValueError("lora_A must have no bias (PEFT's lora_bias puts the bias on lora_B)")
        r = lora_A.weight.shape[0]
        if tuple(lora_A.weight.shape) != (r, self.in_features):
            raise ValueError(f"lora_A.weight must be [r, in_features={self.in_features}], "
                             f"got {tuple(lora_A.weight.shape)}")
        if tuple(lora_B.weight.shape) != (self.out_features, r):
            raise ValueError(f"lora_B.weight must be [out_features={self.out_features}, r={r}], "
                             f"got {tuple(lora_B.weight.shape)}")
        if lora_A.weight.dtype != lora_B.weight.dtype:
            raise TypeError(f"lora_A and lora_B weights must share one dtype, got {lora_A.weight.dtype} and "
                            f"{lora_B.weight.dtype}")
        check_number("dropout", dropout, 0.0, 1.0)
        for name, v in (("scaling", scaling), ("alpha", alpha)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(alpha) if alpha is not None else float(scaling) * r
        self.scaling[adapter_name] = float(scaling)
        self.lora_dropout_p[adapter_name] = float(dropout)
        if magnitude is not None:
            mw = getattr(magnitude, "weight", None)
            if not isinstance(mw, torch.Tensor) or tuple(mw.shape) != (self.out_features,):
                raise ValueError(f"magnitude.weight must be [out_features={self.out_features}], got "
                                 f"{None if mw is None else tuple(mw.shape)}")
            self.lora_magnitude_vector[adapter_name] = magnitude
        return self

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "default", use_dora: bool = False, lora_bias: bool = False) -> None:
        """Add adapter ``name``. ``lora_bias`` (PEFT's): lora_B has a trainable bias (zero at init), so
        the layer adds ``scale * b`` to its output."""
        self._check_adapter_args(name, r, alpha, dropout, use_rslora, init)
        check_bool("use_dora", use_dora)
        check_bool("lora_bias", lora_bias)
        if use_dora and lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (PEFT does not combine them either)")
        w = self.base_layer.weight
        # Adapter weights live in fp32 on a half-precision base (PEFT's default autocast_adapter_dtype).
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=lora_bias, device=w.device, dtype=dtype)
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
            elif init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
                nn.init.zeros_(b.weight)
            else:
                self._init_from_weight(name, init, a.weight, b.weight, r, scale)
            if lora_bias:
                nn.init.zeros_(b.bias)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = scale
        self.lora_dropout_p[name] = float(dropout)
        if init in FROZEN_B:
            self.freeze_b(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        if use_dora:  # m starts at the adapted weight's row norms (PEFT): the layer starts as the base
            norm = weight_norm(self.base_weight_nk(), a.weight, b.weight, self.scaling[name])
            self.lora_magnitude_vector[name] = DoRAMagnitude(norm.to(dtype))

    def _init_from_weight(self, name: str, init: str, a: torch.Tensor, b: torch.Tensor, r: int, scale: float) -> None:
        """An initialization computed from the base weight (see ``inits``). One that changes the base
        keeps the original weight (``restore`` puts it back) and the initial adapter (``init_offset``)."""
        a0, b0, residual = initial_adapter(init, self.base_weight_nk(), r, scale)
        a.copy_(a0)
        b.copy_(b0)
        if residual is None:
            return
        if self._base_before_init is not None:
            raise ValueError(f"init={init!r} changes the base weight, which an earlier adapter's init already "
                             "changed; add this adapter with another init")
        w = self.base_layer.weight
        self._base_before_init = w.detach().clone()
        w.copy_(residual.t() if self.fan_in_fan_out else residual)
        self._init_offsets[name] = (a.detach().clone(), b.detach().clone())

    def freeze_b(self, name: str) -> None:
        """Keep adapter ``name``'s lora_B frozen from now on (MiCA trains A only); ``set_adapter`` respects it."""
        self.frozen_b.add(name)
        self.lora_B[name].requires_grad_(False)

    def init_offset(self, name: str) -> Optional[tuple]:
        """(A0, B0) of an adapter whose init changed the base weight to ``W - s B0 A0`` (PiSSA, OLoRA),
        else None: the adapter against the original base is ``s (B A - B0 A0)``."""
        return self._init_offsets.get(name)

    def restore_base_weight(self) -> None:
        """Give the base layer back the weight it had before a base-modifying init (no-op without one)."""
        if self._base_before_init is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._base_before_init)
            self._base_before_init = None
            self._init_offsets.clear()

    def held_adapters(self) -> list[str]:
        """The names of the adapters this module holds."""
        return list(self.lora_A)

    def set_adapters_trainable(self, flag: bool, names: Optional[list] = None) -> None:
        """Make the parameters of adapters ``names`` (default: all) trainable (``flag``) or frozen; a frozen
        B (MiCA) stays frozen."""
        for name in self.held_adapters() if names is None else names:
            for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
                if name in d:
                    d[name].requires_grad_(flag and not (d is self.lora_B and name in self.frozen_b))

    def is_dora(self, name: Optional[str] = None) -> bool:
        """Whether adapter ``name`` (default: the active one) is a DoRA adapter."""
        return (name or self.active_adapter) in self.lora_magnitude_vector

    def _check_adapter_args(self, name, r, alpha, dropout, use_rslora, init) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        check_int("r", r)
        in_f, out_f = self.in_features, self.out_features
        if r > min(in_f, out_f):
            raise ValueError(f"rank r={r} must be between 1 and min(in_features={in_f}, out_features={out_f})")
        check_number("alpha", alpha, 0.0, low_open=True)
        check_number("dropout", dropout, 0.0, 1.0)
        check_bool("use_rslora", use_rslora)
        check_choice("init", init, INIT_MODES)

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter ``name`` (not the active one, nor one merged into the base weight)."""
        if name not in self.lora_A:
            raise KeyError(f"{name!r} is not an adapter of this module (has {list(self.lora_A)})")
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is the active adapter: activate another one first")
        for d in (self.lora_A, self.lora_B):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p):
            del d[name]
        self._inference_cache = None

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

    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        """scale * B @ A as [out, in] in fp32."""
        name = name or self.active_adapter
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def backend_choice(self) -> tuple[str, str]:
        return resolve_backend(self.backend, self.base_layer.weight.device)

    def _delta_like_weight(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * B @ A in the base weight's layout ([out, in], or [in, out] for Conv1D), computed in
        fp32 (fp64 when the base or the adapter is fp64)."""
        w = self.base_layer.weight
        cdt = torch.promote_types(torch.promote_types(w.dtype, a.dtype), torch.float32)
        d = (b.to(cdt) @ a.to(cdt)).mul_(scale)
        return d.t() if self.fan_in_fan_out else d

    def merge(self) -> None:
        """Fold the active adapter into the base weight: ``W <- cast(W + s * B @ A)``.

        The delta is computed in fp32 (fp64 for fp64 weights) and added to W upcast to that dtype,
        then rounded once to W's dtype, for fp32 and half-precision (fp16 / bf16) bases alike.
        Forward then only runs the base layer (zero overhead); the adapter gets no gradient while
        merged. Refuses (changing nothing) when the merged weight would not be finite.

        Exact unmerge: rounding makes ``U = cast(cast(W + d) - d)`` differ from W. With unit
        roundoffs u_w of W's dtype (2**-24 fp32, 2**-11 fp16, 2**-8 bf16) and u_c of the compute
        dtype (2**-24, or 2**-53 for fp64), elementwise, to first order in u:

            |U - W| <= (u_w + u_c) * (2 |W| + 3 |d|)

        and U == W wherever the add stayed in W's binade and was no (near-)tie, i.e. almost
        everywhere when |d| << |W|. ``merge`` therefore computes U right away and records the flat
        positions where U != W (bit patterns) with W's values there, plus a copy of A, B and s;
        ``unmerge`` recomputes U from that copy and patches those positions, so the weight comes
        back bit for bit. Extra memory while merged: r * (in + out) adapter numbers plus
        (4 + itemsize) bytes per patched element, capped at one copy of W (a plain copy is kept
        when that is smaller; see ``merge_extra_bytes``). Exactness relies on ``B @ A`` being
        recomputed bit-identically on the same device, as deterministic BLAS does (CPU, and cuBLAS
        outside its multi-stream split-K modes), and on the weight keeping its dtype and device
        until ``unmerge`` (after a ``.to(...)`` of a merged model the patched positions get W's
        values cast, the others obey the bound above, as they would were B @ A not reproducible).
        """
        if self.merged:
            return
        name = self.active_adapter
        if self.disabled:
            raise RuntimeError("cannot merge: the adapter of this LoRALinear is disabled (disabled=True)")
        if name not in self.lora_A:
            raise KeyError(f"active_adapter {name!r} is not an adapter of this module (has {list(self.lora_A)})")
        if self.on_meta():
            raise ValueError(META_MERGE)
        if self.lora_B[name].bias is not None and self.base_layer.bias is None:
            raise ValueError(f"cannot merge adapter {name!r}: it has a lora_bias, and the base layer has no bias to "
                             "fold it into")
        w = self.base_layer.weight
        with torch.no_grad():
            a = self.lora_A[name].weight.detach().clone()
            b = self.lora_B[name].weight.detach().clone()
            scale = float(self.scaling[name])
            d = self._delta_like_weight(a, b, scale)
            orig = w.detach()
            if name in self.lora_magnitude_vector:
                return self._merge_dora(name, a, b, scale, d)
            merged = (orig.to(d.dtype) + d).to(w.dtype)
            if not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(orig).all()):
                raise ValueError(f"merging adapter {name!r} would make the {w.dtype} base weight non-finite "
                                 f"(max |delta| = {d.abs().max().item():.3e}); the weight was left unchanged")
            back = (merged.to(d.dtype) - d).to(w.dtype)
            index = (_bits(back) != _bits(orig)).view(-1).nonzero().squeeze(1)
            if orig.numel() < 2**31:
                index = index.to(torch.int32)
            if index.numel() * (index.element_size() + orig.element_size()) >= orig.numel() * orig.element_size():
                index, values = None, orig.clone()  # a plain copy is smaller than the patch list
            else:
                values = orig.contiguous().view(-1)[index.long()]
            w.copy_(merged)
            bias = self._fold_lora_bias(name, scale)
        self._merge_record = _MergeRecord(name, a, b, scale, index, values, bias)
        self.merged = True

    def _fold_lora_bias(self, name: str, scale: float) -> Optional[torch.Tensor]:
        """``bias += scale * b`` for a lora_bias (in fp32, rounded once); returns the bias before."""
        lb = self.lora_B[name].bias
        if lb is None:
            return None
        bias = self.base_layer.bias
        before = bias.detach().clone()
        bias.copy_((before.float() + scale * lb.detach().float()).to(bias.dtype))
        return before

    def _merge_dora(self, name: str, a, b, scale: float, d: torch.Tensor) -> None:
        """DoRA's merge: ``W <- cast(m / ||W + d|| * (W + d))`` per output row (the norm of the unmerged
        weight, as forward uses). Every element changes, so unmerge restores from a full copy of W."""
        w = self.base_layer.weight
        orig = w.detach()
        m = self.lora_magnitude_vector[name].weight.detach()
        mns = (m.to(d.dtype) / weight_norm(self.base_weight_nk(), a, b, scale).to(d.dtype))
        rows = mns[None, :] if self.fan_in_fan_out else mns[:, None]
        merged = ((orig.to(d.dtype) + d) * rows).to(w.dtype)
        if not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(orig).all()):
            raise ValueError(f"merging DoRA adapter {name!r} would make the {w.dtype} base weight non-finite; the "
                             "weight was left unchanged")
        values = orig.clone()
        w.copy_(merged)
        self._merge_record = _MergeRecord(name, a, b, scale, None, values)
        self.merged = True

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight again, restoring it bit for bit (see
        ``merge``). A no-op when not merged."""
        if not self.merged:
            return
        rec = self._merge_record
        w = self.base_layer.weight
        with torch.no_grad():
            if rec.bias is not None:
                self.base_layer.bias.copy_(rec.bias)
            values = rec.values.to(device=w.device, dtype=w.dtype)
            if rec.index is None:
                w.copy_(values)
            else:
                d = self._delta_like_weight(rec.a.to(w.device), rec.b.to(w.device), rec.scale)
                back = (w.detach().to(d.dtype) - d).to(w.dtype).contiguous()
                back.view(-1)[rec.index.to(device=w.device, dtype=torch.long)] = values
                w.copy_(back)
        self._merge_record = None
        self.merged = False

    def on_meta(self) -> bool:
        """True when the base weight or the active adapter holds no data (the meta device)."""
        name = self.active_adapter
        ts = [self.base_layer.weight] + ([self.lora_A[name].weight, self.lora_B[name].weight] if name in self.lora_A
                                         else [])
        return any(t.is_meta for t in ts)

    def merge_extra_bytes(self) -> int:
        """Bytes held while merged to make ``unmerge`` exact (0 when not merged)."""
        return self._merge_record.extra_bytes() if self._merge_record is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            return self._mixed_forward(x)
        if self._dora_active():
            return self._dora_forward(x)
        if not torch.is_grad_enabled():
            y = self._inference_forward(x)
            if y is not None:
                return y
        args = self._op_args()
        if args is None:
            return self._merged_guard(self.base_layer(x))
        group = (lambda: self._grouped_forward(x)) if self._group is not None else None
        return lora_forward(x, args, group)

    def _merged_guard(self, y: torch.Tensor) -> torch.Tensor:
        """``y``, or while training a merged layer whose adapter requires grad, ``y`` through
        :class:`_MergedAdapterGuard`: backward into that adapter then raises, naming merge / unmerge
        (otherwise torch's "does not require grad" error, or a silently untrained adapter)."""
        name = self.active_adapter
        if not (self.merged and self.training and torch.is_grad_enabled() and name in self.lora_A):
            return y
        a = self.lora_A[name].weight
        return _MergedAdapterGuard.apply(y, a) if a.requires_grad else y

    def forward_swiglu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(g) * u)``; when autograd records, through :func:`lora_linear_swiglu`, which
        saves g and u instead of silu(g), u and the product. Hooks registered on this layer still
        run: a hooked layer takes the plain path."""
        args = self._op_args() if torch.is_grad_enabled() and not _has_hooks(self) else None
        if args is None or takes_plain_ops(g, args):  # g: shaped like silu(g) * u
            return self(nn.functional.silu(g) * u)
        return lora_linear_swiglu(g, u, *args)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch whose rows use different adapters (``ptune_rt.mixed_adapters``), inference only:
        the base output for every row, then per adapter ``y[rows] += s * (x[rows] A^T) B^T`` on the
        rows that use it (rows without an adapter keep the base output)."""
        batch, groups = self._rows
        special = [n for n, _ in groups if n in self.lora_magnitude_vector or self.lora_B[n].bias is not None]
        if special:
            raise ValueError(f"adapter(s) {special} are DoRA adapters or have a lora_bias: a mixed-adapter batch "
                             "(ptune_rt.mixed_adapters) runs plain LoRA adapters only; run them one at a time "
                             "(set_adapter)")
        if torch.is_grad_enabled():
            raise RuntimeError("a mixed-adapter batch (ptune_rt.mixed_adapters) runs inference only: call the "
                               "model under torch.no_grad() (generate() does)")
        if x.dim() < 2 or x.shape[0] != batch:
            raise ValueError(f"ptune_rt.mixed_adapters was given {batch} adapter names, one per row, but this layer "
                             f"got a batch of {x.shape[0] if x.dim() else 0} rows (input {tuple(x.shape)}); pass one "
                             "name per row of the batch the model runs (generate with num_beams or "
                             "num_return_sequences > 1 multiplies the rows)")
        if groups and self.backend_choice()[0] == "triton":  # every step stacked, in the fused kernels
            return stacked_lora_linear(x, self.base_weight_nk(), self.base_layer.bias, *self._mixed_stack(x.device),
                                       self.backend)
        y = self.base_layer(x)
        if not groups:
            return y
        if x.dim() == 3 and x.shape[1] == 1:  # a decode step: every adapter at once, 3 ops for any count
            return stacked_lora_linear(x, self.base_weight_nk(), self.base_layer.bias, *self._mixed_stack(x.device),
                                       self.backend, base_out=y)
        for name, rows in groups:
            if rows.device != x.device:
                rows = rows.to(x.device)
            a = self.lora_A[name].weight
            b = self.lora_B[name].weight
            xr = x.index_select(0, rows)
            delta = nn.functional.linear(nn.functional.linear(xr.to(a.dtype), a), b).mul_(self.scaling[name])
            y.index_add_(0, rows, delta.to(y.dtype))
        return y

    def _mixed_stack(self, device) -> tuple:
        """The stacked form of a mixed batch (a torch-path decode step, every Triton-path step): the used
        adapters' A stacked [sum r, K] and B side by side [N, sum r], and per row the scale of its own
        adapter's r columns, 0 elsewhere [B, 1, sum r] (rows without an adapter: all 0). Every row
        computes every used adapter's shrink (a few columns each: in a decode step the op count is
        what costs, not these FLOPs) and the zeros drop the others exactly. Built once per
        ``mixed_adapters`` block."""
        if self._rows_stack is not None and self._rows_stack[0].device == device:
            return self._rows_stack
        batch, groups = self._rows
        names = [n for n, _ in groups]
        a_cat = torch.cat([self.lora_A[n].weight for n in names]).to(device)
        b_cat = torch.cat([self.lora_B[n].weight for n in names], 1).to(device)
        col_scale = torch.zeros(batch, 1, a_cat.shape[0], dtype=a_cat.dtype, device=device)
        off = 0
        for n, rows in groups:
            r = self.r[n]
            col_scale[rows.to(device), :, off:off + r] = self.scaling[n]
            off += r
        self._rows_stack = (a_cat, b_cat, col_scale)
        return self._rows_stack

    def _dora_active(self) -> bool:
        return not (self.merged or self.disabled) and self.active_adapter in self.lora_magnitude_vector

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        p = self.lora_dropout_p[name] if self.training else 0.0
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return dora_linear(x, self.base_weight_nk(), self.base_layer.bias, a, b,
                           self.lora_magnitude_vector[name].weight, self.scaling[name], p, self.backend,
                           norm=self._dora_norm(name))

    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row of DoRA adapter ``name`` (detached), recomputed only when W, A
        or B changed (their storages and version counters key the cache, so an optimizer step or a
        load invalidates it; eval and generate reuse it). ``||W_n||^2`` is cached the same way."""
        w = self.base_weight_nk()
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        scale = self.scaling[name]
        if torch.compiler.is_compiling():
            return weight_norm(w, a, b, scale)
        w_key = (w.data_ptr(), w._version, w.dtype, w.device)
        w_sq = self._dora_cache.get("w_sq")
        if w_sq is None or w_sq[0] != w_key:
            w_sq = self._dora_cache["w_sq"] = (w_key, row_norms_sq(w))
        key = (w_key, a.data_ptr(), a._version, b.data_ptr(), b._version, scale)
        hit = self._dora_cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._dora_cache[name] = (key, weight_norm(w, a, b, scale, w_sq[1]))
        return hit[1]

    def _op_args(self) -> Optional[LoRAArgs]:
        """The active adapter's operands, or None when the base layer alone runs (merged, disabled, or
        no such adapter) or the adapter is a DoRA one (forward runs it on its own path)."""
        name = self.active_adapter
        if self.merged or self.disabled or name not in self.lora_A or name in self.lora_magnitude_vector:
            return None
        p = self.lora_dropout_p[name] if self.training else 0.0
        return LoRAArgs(self.base_weight_nk(), self.effective_bias(name), self.lora_A[name].weight,
                        self.lora_B[name].weight, self.scaling[name], p, self.backend)

    def lora_bias(self, name: Optional[str] = None) -> Optional[torch.Tensor]:
        """Adapter ``name``'s lora_B bias (PEFT's ``lora_bias``), or None."""
        return self.lora_B[name or self.active_adapter].bias

    def effective_bias(self, name: str) -> Optional[torch.Tensor]:
        """The bias the layer's output gets with adapter ``name``: the base layer's, plus ``scale * b`` of a
        lora_B bias (an N-vector under autograd, in the base's dtype: its gradient reaches both)."""
        base, extra = self.base_layer.bias, self.lora_B[name].bias
        if extra is None:
            return base
        total = extra * self.scaling[name] if base is None else base.to(extra.dtype) + extra * self.scaling[name]
        return total.to(self.base_layer.weight.dtype)

    def _grouped_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Training path of a layer in a projection group (q/k/v or gate/up of one block, see
        :func:`enable_projection_groups`), or None for the layer's own path.

        The first member called computes every member's output in one :func:`lora_linear_group`
        and leaves each sibling its output with the input it was computed for; a sibling then
        called with that very tensor returns it (its own hooks run as usual, around this forward).
        The group only runs when every member would take the eager torch path without dropout, in
        x's dtype, without hooks. A sibling called with another tensor, or never called, shows that
        the model does not feed these layers one input: the group is switched off for good (the
        call that finds out runs on its own, so results never depend on it)."""
        grp = self._group
        st = self._stash
        if st is not None:
            self._stash = None
            if st[0] is x:
                return st[1]
            _ungroup(grp)  # computed for another input: these layers do not share one
            return None
        if torch.compiler.is_compiling() or x.dtype not in OP_DTYPES:
            return None
        members = []
        for m in grp:
            if m._stash is not None:  # a sibling never came for its last output: same conclusion
                _ungroup(grp)
                return None
            if _has_hooks(m):
                return None
            args = m._op_args()
            if (args is None or args.dropout != 0.0 or m.backend_choice()[0] != "torch"
                    or not (x.dtype == args.weight.dtype == args.a.dtype == args.b.dtype)):
                return None
            members.append((args.weight, args.bias, args.a, args.b, args.scale))
        outs = lora_linear_group(x, members)
        mine = None
        for m, y in zip(grp, outs):
            if m is self:
                mine = y
            else:
                m._stash = (x, y)
        return mine

    def _inference_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The decode-step path (autograd off), or None for the checked path.

        The op's input checks and backend choice run once into an
        :class:`~ptune_rt.ops.lora_dispatch.InferencePlan`, kept while it matches (same parameter
        objects and storages, adapter, backend, input dtype, device and width): per call this saves
        the checks, the backend resolution, the custom-op dispatch and three transposes, most of a
        LoRA linear's overhead at batch 1. A first call with bad input returns None, so the
        checked path raises its clear error."""
        if self.merged or self.disabled:
            return self.base_layer(x)
        name = self.active_adapter
        la = self._modules["lora_A"]._modules.get(name)
        if la is None:
            return self.base_layer(x)
        if (self.training and self.lora_dropout_p[name] > 0) or torch.compiler.is_compiling() \
                or self.lora_B[name].bias is not None:
            return None
        a = la._parameters["weight"]
        b = self._modules["lora_B"]._modules[name]._parameters["weight"]
        base = self._modules["base_layer"]._parameters
        w, bias = base["weight"], base.get("bias")
        plan = self._inference_cache
        if plan is None or not plan.matches(x, a, b, w, bias, name, self.backend):
            plan = self._inference_cache = plan_inference(x, w, self.fan_in_fan_out, bias, a, b, self.scaling[name],
                                                          name, self.backend)
            if plan is None:
                return None
        return run_inference(x, plan, self.scaling[name])

    # The inference cache holds views of the weights: drop it whenever they may move, so that e.g.
    # ``model.to("cuda")`` or ``model.half()`` never keeps the old copies alive, and never pickle it.
    def _apply(self, fn, *args, **kwargs):
        self._inference_cache = None
        self._dora_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._inference_cache = None
        self._dora_cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_inference_cache"] = None
        state["_stash"] = None
        state["_dora_cache"] = {}
        return state

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (f"in={self.in_features}, out={self.out_features}, r={self.r.get(name)}, "
                f"scaling={self.scaling.get(name)}, backend={self.backend}, merged={self.merged}")


#: The error of merging on the meta device, where there are no weights to merge.
META_MERGE = ("cannot merge: the weights are on the meta device (they hold no data); load the real weights first "
              "(e.g. from_pretrained without device_map='meta', or to_empty() then load_state_dict)")


class _MergedAdapterGuard(torch.autograd.Function):
    """Identity on a merged layer's output that ties it to the adapter's A, so that backward reaches
    here and raises a clear error instead of training nothing."""

    @staticmethod
    def forward(ctx, y, a):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        raise RuntimeError("a LoRA layer has its adapter merged into the base weight (ptune_rt.merge), so the "
                           "adapter gets no gradient: call ptune_rt.unmerge(model) before training it (or freeze "
                           "its lora_A / lora_B with requires_grad_(False) to train other parameters)")


# ----------------------------------------------------------------------------------------
# SwiGLU MLPs: recompute the gated product in backward
# ----------------------------------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    """Hooks registered on ``m`` itself, or a forward replaced on the instance. Global module hooks
    (``register_module_forward_hook``, as used by module trackers) do not count: under them the
    gated path still runs, and such a hook sees the MLP, not its down projection, run."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)  # a wrapped forward (e.g. accelerate's device hooks)


def _ungroup(grp) -> None:
    """Switch a projection group off for good (see :func:`~ptune_rt.methods.lora.groups.enable_projection_groups`)."""
    for m in grp:
        m._group = m._stash = None
