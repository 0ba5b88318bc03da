"""LoRA's fields of PEFT's ``adapter_config.json``: writing one PEFT loads (the fields of PEFT's
``LoraConfig`` present since PEFT 0.14, with the values its ``save_pretrained`` writes for the same
adapter), and reading one into a :class:`LoRAConfig`, refusing settings this LoRA cannot reproduce."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ptune_rt.io.common import AdapterError
from ptune_rt.io.peft_config import auto_mapping, name_or_path
from ptune_rt.methods._config import check_bool, check_int, check_number, check_regex
from ptune_rt.methods.lora.config import LoRAConfig

#: LoRA init modes that change the base weights (PiSSA, OLoRA, CorDA, LoftQ): such an adapter only
#: fits the base model as modified at init, which is not what a user loads it into.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def lora_to_peft(config: LoRAConfig, model: nn.Module, task_type: Optional[str], fan_in_fan_out: bool,
                 modules_to_save: Optional[list[str]]) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT writes for this LoRA adapter."""
    init = {"gaussian": "gaussian", "orthogonal": "orthogonal", "mica": "mica"}.get(config.init, True)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": auto_mapping(model, task_type),
        "base_model_name_or_path": name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": config.target_modules,
        "exclude_modules": None,
        "bias": config.bias,
        "use_rslora": bool(config.use_rslora),
        "use_dora": bool(config.use_dora),
        "lora_bias": bool(config.lora_bias),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "init_lora_weights": init,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": {k: _number(v) for k, v in (config.alpha_pattern or {}).items()},
        "trainable_token_indices": config.trainable_token_indices,
        "layer_replication": None,
    }


def _unsupported_features(d: dict) -> list[str]:
    """Settings of a PEFT LoraConfig this package's LoRA cannot reproduce (empty: all fine)."""
    out = []

    def set_(key, ok=lambda v: not v):
        if key in d and not ok(d[key]):
            out.append(f"{key}={d[key]!r}")

    set_("layer_replication", lambda v: v is None)
    set_("target_parameters")
    set_("use_qalora")
    set_("alora_invocation_tokens", lambda v: v is None)
    set_("use_bdlora")
    set_("arrow_config", lambda v: v is None)
    set_("megatron_config", lambda v: v is None)
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        out.append(f"init_lora_weights={init!r} (the adapter only fits the base weights as modified at init; "
                   "convert it to a plain LoRA adapter with PEFT's save_pretrained("
                   "path_initial_model_for_weight_conversion=...) first)")
    return out


def read_lora_config(d: dict, source: str, backend: str) -> tuple[LoRAConfig, Any]:
    """(LoRAConfig, exclude_modules) from a PEFT LoRA ``adapter_config.json`` dict."""
    bad = _unsupported_features(d)
    if bad:
        raise AdapterError(f"{source}: this PEFT LoRA adapter uses settings ptune_rt's LoRA does not support: "
                           f"{', '.join(bad)}")
    tm = d.get("target_modules")
    if isinstance(tm, (list, tuple, set)):
        tm = sorted(tm) if isinstance(tm, set) else list(tm)
    elif tm is not None and not isinstance(tm, str):
        raise AdapterError(f"{source}: target_modules must be a list of names, a regex string or null, got {tm!r}")
    exclude = d.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or isinstance(exclude, (list, tuple)) and all(
            isinstance(e, str) and e for e in exclude)):
        raise AdapterError(f"{source}: exclude_modules must be a list of names, a regex string or null, "
                           f"got {exclude!r}")
    _check_lora_fields(d, source, tm, exclude)
    init = d.get("init_lora_weights", True)
    try:
        config = LoRAConfig(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                            target_modules=tm, bias=d.get("bias", "none"), use_rslora=d.get("use_rslora", False),
                            init=init if init in ("gaussian", "orthogonal", "mica") else "default", backend=backend,
                            use_dora=d.get("use_dora", False), lora_bias=d.get("lora_bias", False),
                            rank_pattern=d.get("rank_pattern") or None,
                            alpha_pattern=d.get("alpha_pattern") or None,
                            layers_to_transform=d.get("layers_to_transform"),
                            layers_pattern=d.get("layers_pattern") or None,
                            trainable_token_indices=d.get("trainable_token_indices"))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: not a valid LoRA config for ptune_rt: {e}") from e
    return config, (list(exclude) if isinstance(exclude, tuple) else exclude)


def _check_lora_fields(d: dict, source: str, target_modules, exclude_modules) -> None:
    """PEFT's LoRA fields by their names in the file: types, finite numbers, regexes that compile."""
    try:
        check_int(f"{source}: r", d.get("r", 8))
        check_number(f"{source}: lora_alpha", d.get("lora_alpha", 8), 0.0, low_open=True)
        check_number(f"{source}: lora_dropout", d.get("lora_dropout", 0.0), 0.0, 1.0)
        check_bool(f"{source}: use_rslora", d.get("use_rslora", False))
        check_bool(f"{source}: use_dora", d.get("use_dora", False))
        check_bool(f"{source}: lora_bias", d.get("lora_bias", False))
        for key, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if isinstance(value, str):
                check_regex(f"{source}: {key}", value)
    except ValueError as e:
        raise AdapterError(str(e)) from None
