"""How LayerNorm tuning goes into and out of a model, its report rows and its PEFT layout."""
from __future__ import annotations

from torch import nn

from ptune_rt import param_subset
from ptune_rt import state as model_state
from ptune_rt.errors import AdapterError
from ptune_rt.heads import HEAD_NAMES, head_modules
from ptune_rt.methods.ln_tuning.config import DEFAULT_TARGETS, LNTuningConfig
from ptune_rt.methods.method import Method
from ptune_rt.targets import module_matches

NAME = LNTuningConfig.METHOD
PEFT_TYPE = "LN_TUNING"
LAYER_KEY = "ln_tuning_layers"
WHY = "norm-only training: the model's own norm parameters train, nothing is swapped"


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def norm_modules(model: nn.Module, config: LNTuningConfig) -> list[str]:
    targets = config.target_modules
    if targets is None:
        targets = DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None))
    found = [n for n, m in model.named_modules() if n and (module_matches(n, targets) if targets is not None
                                                          else _is_norm(m))]
    found = [n for n in found if any(True for _ in model.get_submodule(n).parameters(recurse=False))]
    if not found:
        looked = f"modules matching {targets!r}" if targets is not None else "LayerNorm / RMSNorm modules"
        raise ValueError(f"LN tuning: {type(model).__name__} has no {looked} with parameters")
    return found


def trained_names(model: nn.Module, config: LNTuningConfig) -> list[str]:
    params = dict(model.named_parameters())  # canonical names: a tied parameter counts once
    names = [f"{n}.{pn}" for n in norm_modules(model, config)
             for pn, _ in model.get_submodule(n).named_parameters(recurse=False) if f"{n}.{pn}" in params]
    return names + param_subset.head_parameters(model, config.modules_to_save, "LNTuningConfig", exclude=names)


def report_rows(model: nn.Module) -> list[dict]:
    st = model_state.get(model, NAME)
    if st is None:
        return []
    rows = {}
    for n, p in zip(st.names, st.parameters(model)):
        module = n.rsplit(".", 1)[0]
        row = rows.setdefault(module, {"module": module, "method": NAME, "shape": "x".join(map(str, p.shape)),
                                       "size": 0, "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
                                       "backend": "torch", "why": WHY, "merged": False})
        row["size"] += p.numel()
    return [{**r, "size": str(r["size"])} for r in rows.values()]


def cells(row: dict) -> tuple[str, str, str]:
    return row["shape"], row["size"], "-"


def summary(rows: list[dict]) -> str:
    return f"{len(rows)} LN-tuned modules ({sum(int(r['size']) for r in rows)} parameters): torch {len(rows)}"


# PEFT's layout: a norm's parameter "<module>.<p>" is "<module>.ln_tuning_layers.<p>"; a head's keeps its name.

def _peft_key(name: str) -> str:
    module, _, param = name.rpartition(".")
    return f"{module}.{LAYER_KEY}.{param}" if module else name


def _peft_name(key: str) -> str:
    return key.replace(f".{LAYER_KEY}.", ".")


def _config_to_peft(config: LNTuningConfig) -> dict:
    return {"target_modules": config.target_modules, "modules_to_save": config.modules_to_save,
            "exclude_modules": None}


def _config_from_peft(d: dict, source: str) -> LNTuningConfig:
    unsupported = {k: d[k] for k in ("exclude_modules",) if d.get(k)}
    if unsupported:
        raise AdapterError(f"{source}: LN_TUNING with {unsupported} is not supported")
    heads = d.get("modules_to_save")
    if isinstance(heads, list) and set(heads) <= set(HEAD_NAMES):
        heads = None  # PEFT's task defaults (e.g. ["classifier", "score"]): the model's own task head
    try:
        return LNTuningConfig(target_modules=d.get("target_modules"), modules_to_save=heads)
    except ValueError as e:
        raise AdapterError(f"{source}: {e}") from None


class _LNCheckpoint(param_subset.SubsetCheckpoint):
    """Heads keep their names in PEFT's layout; only norm parameters get ``ln_tuning_layers``."""

    def to_peft(self, collected, model, task_type):
        config, _ = super().to_peft(collected, model, task_type)
        heads = head_modules(model, collected.config.modules_to_save, "LNTuningConfig", skip="\0")
        config["modules_to_save"] = heads or None
        prefix = param_subset.PEFT_KEY_PREFIX
        in_head = lambda n: any(n.startswith(h + ".") for h in heads)  # noqa: E731
        return config, {prefix + (n if in_head(n) else _peft_key(n)): t for n, t in collected.tensors.items()}


OPS = param_subset.SubsetOps(NAME, "LN tuning", LNTuningConfig, trained_names)
CHECKPOINT = _LNCheckpoint(NAME, LNTuningConfig, OPS.apply, trained_names,
                           param_subset.PeftLayout(PEFT_TYPE, _peft_key, _peft_name, _config_to_peft, _config_from_peft))
METHOD = Method(NAME, LNTuningConfig, OPS.apply, OPS.remove, OPS.is_applied, OPS.trainable, report_rows, cells,
                summary, CHECKPOINT, example=LNTuningConfig, peft_types=(PEFT_TYPE,),
                merge_and_unload=OPS.merge_and_unload, disable=OPS.disable)
