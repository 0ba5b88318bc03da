"""LoRA: its config and the fused module that replaces a frozen linear layer.

``LoRALinear`` keeps PEFT's attribute layout (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``scaling[name]``) so parameter names, state dicts and optimizers line up with PEFT's, and runs
forward through the fused op ``ptune_rt.ops.lora_linear``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ptune_rt.ops.lora_linear import BACKENDS, lora_linear, resolve_backend

try:  # GPT-2 style Conv1D: weight is [in_features, out_features]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "zeros")


@dataclasses.dataclass
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (names follow PEFT's ``LoraConfig`` where they overlap).

    r: rank (1 .. min(in_features, out_features) of every target).
    alpha: scaling numerator: scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``.
    dropout: dropout rate on the low-rank input during training.
    target_modules: module names (suffix match, e.g. ``"q_proj"``), a regex string matched against the
        full name, or ``"all-linear"``; None picks the model type's default (as PEFT does).
    bias: "none", "all" (train every bias of the model) or "lora_only" (train the targets' biases).
    init: "default" (PEFT: Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B) or
        "zeros" (both zero; for loading).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Optional[Union[Sequence[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    init: str = "default"
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LoRAConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"LoRAConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str) and not all(isinstance(t, str) and t for t in tm):
            raise ValueError(f"LoRAConfig.target_modules must be a string or a list of non-empty strings, got {tm!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return {"method": "lora", **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        d = dict(d)
        method = d.pop("method", "lora")
        if method != "lora":
            raise ValueError(f"not a LoRA config: method={method!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "LoRAConfig":
        return cls.from_dict(json.loads(s))


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D and isinstance(layer, Conv1D):
        k, n = layer.weight.shape
        return k, n
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus a LoRA adapter, run by the fused op."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", backend: str = "auto",
                 adapter_name: str = "default"):
        super().__init__()
        in_f, out_f = linear_shape(base_layer)
        if r < 1 or r > min(in_f, out_f):
            raise ValueError(f"rank r={r} must be between 1 and min(in_features={in_f}, out_features={out_f})")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.backend = backend
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged = False
        self.disabled = False
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "default") -> None:
        w = self.base_layer.weight
        # Adapter weights live in fp32 on a half-precision base (PEFT's default autocast_adapter_dtype).
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
            else:
                nn.init.zeros_(a.weight)
            nn.init.zeros_(b.weight)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p[name] = float(dropout)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.merged or self.disabled or name not in self.lora_A:
            return self.base_layer(x)
        p = self.lora_dropout_p[name] if self.training else 0.0
        return lora_linear(x, self.base_weight_nk(), self.base_layer.bias, self.lora_A[name].weight,
                           self.lora_B[name].weight, self.scaling[name], p, backend=self.backend)

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (f"in={self.in_features}, out={self.out_features}, r={self.r.get(name)}, "
                f"scaling={self.scaling.get(name)}, backend={self.backend}, merged={self.merged}")
