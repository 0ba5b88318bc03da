"""How BitFit goes into and out of a model, and what ``report`` says of it."""
from __future__ import annotations

from torch import nn

from ptune_rt import param_subset
from ptune_rt import state as model_state
from ptune_rt.methods.bitfit.config import BitFitConfig
from ptune_rt.methods.method import Method
from ptune_rt.targets import module_matches

NAME = BitFitConfig.METHOD
WHY = "bias-only training: backward computes dX and the bias gradient (column sum of dY), no weight-gradient GEMM"


def bias_names(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The biases ``config`` selects and the task head's parameters; a clear error when there are no biases."""
    names = param_subset.chosen_parameters(
        model, lambda mn, m, pn, p: pn == "bias" and (config.bias_modules is None
                                                       or module_matches(mn, config.bias_modules)))
    if not names:
        looked = "any module" if config.bias_modules is None else f"modules matching {config.bias_modules!r}"
        raise ValueError(f"BitFit: {type(model).__name__} has no bias parameter in {looked} (a model built with "
                         "bias=False, e.g. Llama's linears, has nothing for BitFit to train)")
    return names + param_subset.head_parameters(model, config.modules_to_save, "BitFitConfig", exclude=names)


def report_rows(model: nn.Module) -> list[dict]:
    st = model_state.get(model, NAME)
    if st is None:
        return []
    return [{"module": n.rsplit(".", 1)[0] if "." in n else "", "method": NAME, "parameter": n,
             "shape": "x".join(map(str, p.shape)), "size": str(p.numel()),
             "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device), "backend": "torch",
             "why": WHY, "merged": False} for n, p in zip(st.names, st.parameters(model))]


def cells(row: dict) -> tuple[str, str, str]:
    return row["shape"], row["size"], "-"


def summary(rows: list[dict]) -> str:
    return f"{len(rows)} BitFit biases ({sum(int(r['size']) for r in rows)} parameters): torch {len(rows)}"


OPS = param_subset.SubsetOps(NAME, "BitFit", BitFitConfig, bias_names)
METHOD = Method(NAME, BitFitConfig, OPS.apply, OPS.remove, OPS.is_applied, OPS.trainable, report_rows, cells, summary,
                param_subset.SubsetCheckpoint(NAME, BitFitConfig, OPS.apply, bias_names), example=BitFitConfig,
                merge_and_unload=OPS.merge_and_unload, disable=OPS.disable)
