"""How Child-tuning goes into and out of a model, and what ``report`` says of it.

``apply`` only makes the chosen parameters trainable (all of them by default: Child-tuning is full
fine-tuning); the child network is the optimizer's business (:mod:`.optim`). Checkpoints hold every
trained parameter by name, as a parameter-subset method's do.
"""
from __future__ import annotations

from torch import nn

from ptune_rt import param_subset
from ptune_rt import state as model_state
from ptune_rt.methods.child_tuning.config import ChildTuningConfig
from ptune_rt.methods.method import Method
from ptune_rt.targets import module_matches

NAME = ChildTuningConfig.METHOD
WHY = ("full fine-tuning of a child network: ChildTuningAdamW (fused masked AdamW kernel) or ChildTuningOptimizer "
       "masks each step's update")


def trained_names(model: nn.Module, config: ChildTuningConfig) -> list[str]:
    """Every parameter, or those of the modules ``config.target_modules`` names; a clear error when none."""
    names = param_subset.chosen_parameters(
        model, lambda mn, m, pn, p: config.target_modules is None or module_matches(mn, config.target_modules))
    if not names:
        raise ValueError(f"Child-tuning: {type(model).__name__} has no parameter in modules matching "
                         f"{config.target_modules!r} (ChildTuningConfig.target_modules)")
    return names


def report_rows(model: nn.Module) -> list[dict]:
    st = model_state.get(model, NAME)
    if st is None:
        return []
    return [{"module": n.rsplit(".", 1)[0] if "." in n else "", "method": NAME, "parameter": n,
             "shape": "x".join(map(str, p.shape)), "size": str(p.numel()), "mode": st.config.mode,
             "reserve_p": st.config.reserve_p, "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
             "backend": "torch", "why": WHY, "merged": False} for n, p in zip(st.names, st.parameters(model))]


def cells(row: dict) -> tuple[str, str, str]:
    return row["shape"], row["size"], "-"


def summary(rows: list[dict]) -> str:
    total = sum(int(r["size"]) for r in rows)
    mode, p = rows[0]["mode"], rows[0]["reserve_p"]
    child = "a fresh Bernoulli mask each step" if mode == "F" else "a fixed Fisher-information mask"
    return (f"{len(rows)} tensors trained by Child-tuning_{mode} ({total} parameters; child: {child} keeping "
            f"{p:g} of them, about {round(p * total)})")


OPS = param_subset.SubsetOps(NAME, "Child-tuning", ChildTuningConfig, trained_names)
METHOD = Method(NAME, ChildTuningConfig, OPS.apply, OPS.remove, OPS.is_applied, OPS.trainable, report_rows, cells,
                summary, param_subset.SubsetCheckpoint(NAME, ChildTuningConfig, OPS.apply, trained_names),
                example=ChildTuningConfig, merge_and_unload=OPS.merge_and_unload, disable=OPS.disable)
