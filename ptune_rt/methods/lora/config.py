"""LoRA's hyper-parameters: :class:`LoRAConfig` (names follow PEFT's ``LoraConfig``)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Sequence, Union

from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods._config import check_bool, check_choice, check_int, check_number, check_regex
from ptune_rt.methods.config_base import MethodConfig
from ptune_rt.ops.backend import BACKENDS
from ptune_rt.targets import pattern_key

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "zeros", "orthogonal", "mica", "pissa", "olora")


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """Hyper-parameters of a LoRA adapter (names follow PEFT's ``LoraConfig`` where they overlap).

    r: rank (1 .. min(in_features, out_features) of every target).
    alpha: scaling numerator: scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``.
    dropout: dropout rate on the low-rank input during training.
    target_modules: module names (suffix match, e.g. ``"q_proj"``), a regex string matched against the
        full name, or ``"all-linear"``; None picks the model type's default (as PEFT does).
    bias: "none", "all" (train every bias of the model) or "lora_only" (train the targets' biases).
    init: "default" (PEFT: Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B), "zeros"
        (both zero; for loading), or PEFT's "orthogonal" (r even), "mica" (B frozen), "pissa", "olora"
        (these two start from a modified base weight; ``restore`` gives the original back and
        checkpoints are written against it): see ``ptune_rt.methods.lora.inits``.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    recompute_mlp: in SwiGLU MLPs (Llama, Mistral, Qwen2, ...: ``down(silu(gate(x)) * up(x))``)
        whose down projection is a target, keep only gate(x) and up(x) for backward and recompute
        silu and the product there: two fewer [tokens, intermediate] tensors saved per layer, the
        same gradients bit for bit, one extra silu and product per layer in backward.
    group_projections: targets that read one input in one block (q/k/v, gate/up; query/key/value)
        run as a group on the eager torch path while training without dropout: one shrink GEMM,
        one dA GEMM and one dX buffer for all of them (results within fp rounding of separate
        layers, not bit for bit). Other paths are unaffected.
    rank_pattern / alpha_pattern: per-module ranks / alphas overriding ``r`` / ``alpha`` (PEFT's
        names and rule): ``{"regex": value}``, a key selecting the modules whose name ends with a match
        of it after a dot (``"q_proj"``, ``"layers\\.0\\.self_attn\\.q_proj"``); the first matching key wins.
    layers_to_transform / layers_pattern: only targets in these layers (an index or a list; PEFT's
        rule: the first number after a dotted component, or after ``layers_pattern``, e.g. "layers").
    lora_bias: PEFT's ``lora_bias``: lora_B gets a trainable bias (zero at init); the layer adds
        ``scale * b`` (folded into the fused op's bias: no extra pass).
    trainable_token_indices: PEFT's: rows of an embedding table that train next to the adapter (new or
        rare tokens): a list of token ids (the input embedding, and a tied output layer with it) or
        ``{module name: [ids]}``; no table-sized copy is made (see ``ptune_rt.methods.lora.tokens``).
    use_dora: DoRA (Liu et al., 2024): each target also gets a trainable magnitude per output row,
        ``y = m / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + b`` (PEFT's ``use_dora``), the norm
        computed without materializing ``W + s B A`` (see ``ptune_rt.ops.dora_linear``).
    modules_to_save: modules trained whole next to the adapters and saved with them (PEFT's
        ``modules_to_save``): None picks the task head of sequence / token classification and
        question answering models (``classifier``, ``score``, ``qa_outputs``, ...), as PEFT's task
        types do, and nothing elsewhere; ``[]`` trains the adapters alone; a list names modules (a
        whole name or a dotted suffix). A head is never a LoRA target.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Optional[Union[Sequence[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    init: str = "default"
    backend: str = "auto"
    recompute_mlp: bool = True
    group_projections: bool = True
    modules_to_save: Optional[list] = None
    use_dora: bool = False
    lora_bias: bool = False
    rank_pattern: Optional[dict] = None
    alpha_pattern: Optional[dict] = None
    layers_to_transform: Optional[Union[int, list]] = None
    layers_pattern: Optional[Union[str, list]] = None
    trainable_token_indices: Optional[Union[list, dict]] = None

    METHOD: ClassVar[str] = "lora"

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name) == {}:
                setattr(self, name, None)  # PEFT writes {} for none
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.trainable_token_indices, tuple):
            self.trainable_token_indices = list(self.trainable_token_indices)
        super().__post_init__()

    def validate(self) -> None:
        check_int("LoRAConfig.r", self.r)
        check_number("LoRAConfig.alpha", self.alpha, 0.0, low_open=True)
        check_number("LoRAConfig.dropout", self.dropout, 0.0, 1.0)
        check_choice("LoRAConfig.bias", self.bias, BIAS_MODES)
        check_choice("LoRAConfig.init", self.init, INIT_MODES)
        check_choice("LoRAConfig.backend", self.backend, BACKENDS)
        for flag in ("use_rslora", "recompute_mlp", "group_projections", "use_dora", "lora_bias"):
            check_bool(f"LoRAConfig.{flag}", getattr(self, flag))
        tm = self.target_modules
        if isinstance(tm, str):
            check_regex("LoRAConfig.target_modules", tm)
        elif tm is not None and not (isinstance(tm, (list, tuple)) and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(f"LoRAConfig.target_modules must be a string or a list of non-empty strings, got {tm!r}")
        check_modules_to_save("LoRAConfig", self.modules_to_save)
        self._validate_patterns()
        if self.use_dora and self.lora_bias:
            raise ValueError("LoRAConfig.use_dora=True with lora_bias=True is not supported (PEFT does not combine "
                             "them either)")
        if self.use_dora and self.init in ("pissa", "olora"):
            raise ValueError(f"LoRAConfig.init={self.init!r} with use_dora=True is not supported: a DoRA magnitude "
                             "would start from the modified base weight's norms")
        if self.init == "orthogonal":
            odd = sorted({v for v in [self.r, *(self.rank_pattern or {}).values()] if v % 2})
            if odd:
                raise ValueError(f"LoRAConfig.init='orthogonal' needs even ranks, got r / rank_pattern values {odd}")

    def _validate_patterns(self) -> None:
        for name, check in (("rank_pattern", lambda k, v: check_int(f"LoRAConfig.rank_pattern[{k!r}]", v)),
                            ("alpha_pattern", lambda k, v: check_number(f"LoRAConfig.alpha_pattern[{k!r}]", v, 0.0,
                                                                        low_open=True))):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
                raise ValueError(f"LoRAConfig.{name} must be None or a dict of module-name regex -> value, got "
                                 f"{value!r}")
            for k, v in value.items():
                check_regex(f"LoRAConfig.{name} key", k)
                check(k, v)
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0) \
                and not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                          for i in layers)):
            raise ValueError(f"LoRAConfig.layers_to_transform must be None, a layer index >= 0 or a list of them, got "
                             f"{layers!r}")
        self._validate_token_indices()
        lp = self.layers_pattern
        if lp is not None and not (isinstance(lp, str) or isinstance(lp, list) and all(
                isinstance(p, str) and p for p in lp)):
            raise ValueError(f"LoRAConfig.layers_pattern must be None, a name or a list of names, got {lp!r}")
        if lp and layers is None:
            raise ValueError(f"LoRAConfig.layers_pattern={lp!r} needs layers_to_transform (PEFT's rule)")

    def _validate_token_indices(self) -> None:
        ti = self.trainable_token_indices
        if ti is None:
            return

        def ids_ok(v) -> bool:
            return isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                     for i in v) and len(set(v)) == len(v)
        if isinstance(ti, dict):
            ok = bool(ti) and all(isinstance(k, str) and k and ids_ok(v) for k, v in ti.items())
        else:
            ok = ids_ok(ti)
        if not ok:
            raise ValueError("LoRAConfig.trainable_token_indices must be None, a non-empty list of distinct token ids "
                             f">= 0, or a dict of module name -> such a list, got {ti!r}")

    def rank_for(self, module: str) -> int:
        """Module ``module``'s rank: its ``rank_pattern`` entry, else ``r``."""
        key = pattern_key(self.rank_pattern or {}, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern or {}, module)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
