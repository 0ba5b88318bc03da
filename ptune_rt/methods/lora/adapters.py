"""Working with a model's LoRA adapters: ``merge`` / ``unmerge`` (bit-exact), ``set_adapter``, and
``mixed_adapters`` (each row of a batch with its own adapter, for serving many tasks from one base)."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ptune_rt.methods._config import check_bool
from ptune_rt import state as model_state
from ptune_rt.methods.lora.groups import disable_projection_groups
from ptune_rt.methods.lora.inject import (SOURCE_ATTR, _require_swapped, _set_submodule, _swap_out_tokens,
                                          restore_requires_grad, token_adapters)
from ptune_rt.methods.lora.swiglu import disable_mlp_recompute
from ptune_rt.methods.lora.layer import META_MERGE, LoRALinear

def merge(model: nn.Module, untie: bool = False) -> nn.Module:
    """Fold every swapped module's adapter into its base weight (see ``LoRALinear.merge``).

    A base weight shared with another parameter (a tied model whose ``lm_head`` is a target shares
    it with the input embedding) would give that parameter ``s B A`` too: refused with a
    ValueError naming them, unless ``untie=True``, which first gives each such base layer its own
    copy of the weight, sets ``tie_word_embeddings=False`` in the model's config so transformers
    does not tie them again, and warns naming the parameters (PEFT warns and merges).

    All or nothing: if one module cannot merge, those merged by this call are unmerged again
    (bit-exact) and untied weights are tied again before the error propagates."""
    mods = _require_swapped(model, "merge")
    check_bool("untie", untie)
    todo = {n: m for n, m in mods.items() if not m.merged}
    for n, m in todo.items():
        if m.disabled:
            raise ValueError(f"cannot merge module {n!r}: its adapter is disabled")
        if m.active_adapter not in m.lora_A:
            raise ValueError(f"cannot merge module {n!r}: active_adapter {m.active_adapter!r} is not one of its "
                             f"adapters {list(m.lora_A)}")
        if m.on_meta():
            raise ValueError(f"module {n!r}: {META_MERGE}")
    tied = _tied_base_weights(model, todo)
    if tied and not untie:
        raise ValueError(f"cannot merge: {_describe_ties(tied)}; merging would add the adapter to those parameters "
                         "too. Pass untie=True to give each LoRA base layer its own copy of the weight first")
    retie = _untie(model, todo, tied) if tied else (lambda: None)
    done = []
    try:
        for m in todo.values():
            m.merge()
            done.append(m)
    except Exception:
        for m in reversed(done):
            m.unmerge()
        retie()
        raise
    return model


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _tied_base_weights(model: nn.Module, mods: dict[str, LoRALinear]) -> dict[str, list[str]]:
    """LoRA module name -> the other parameters sharing its base weight's storage (tied weights)."""
    by_storage: dict[tuple, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_storage.setdefault(_storage_key(p), []).append(n)
    out = {}
    for n, m in mods.items():
        own = f"{n}.base_layer.weight"
        others = [p for p in by_storage.get(_storage_key(m.base_layer.weight), []) if p != own]
        if others:
            out[n] = others
    return out


def _describe_ties(tied: dict[str, list[str]]) -> str:
    return "; ".join(f"the base weight of LoRA module {n!r} is tied to {others}" for n, others in tied.items())


def _untie(model: nn.Module, mods: dict[str, LoRALinear], tied: dict[str, list[str]]):
    """Give each tied base layer its own copy of its weight and switch the config's tying off;
    returns the function that undoes both."""
    configs = [c for c in _tie_configs(model) if getattr(c, "tie_word_embeddings", False)]
    olds = {n: mods[n].base_layer.weight for n in tied}
    warnings.warn(f"ptune_rt.merge(untie=True): {_describe_ties(tied)}; each of these LoRA base layers gets its own "
                  "copy of the weight before merging (the tied parameters keep theirs), and the model config's "
                  "tie_word_embeddings is set to False", UserWarning, stacklevel=3)
    for n, w in olds.items():
        mods[n].base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    for c in configs:
        c.tie_word_embeddings = False

    def retie():
        for n, w in olds.items():
            mods[n].base_layer.weight = w
        for c in configs:
            c.tie_word_embeddings = True
    return retie


def _tie_configs(model: nn.Module) -> list:
    """The model's transformers config and its text config (where tie_word_embeddings may live)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    return [cfg] if text is cfg else [cfg, text]


def _require_adapter(mods: dict[str, LoRALinear], name: str, prefix: str, hint: str = "") -> None:
    """Raise unless every module of ``mods`` holds the adapter ``name``; the message starts with
    ``prefix`` (the argument) and ends its list of the model's adapters with ``hint``."""
    lacking = [n for n, m in mods.items() if name not in m.lora_A]
    if lacking:
        held = sorted({a for m in mods.values() for a in m.lora_A})
        raise ValueError(f"{prefix}{name!r} is not an adapter of LoRA modules {lacking[:3]}"
                         f"{' ...' if len(lacking) > 3 else ''} (the model's adapters: {held}{hint})")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active LoRA adapter of every swapped module (adapters are added with
    ``ptune_rt.load_adapter(model, path, adapter_name=...)``), as PEFT's ``set_adapter``: the active
    adapter's weights become trainable, the others frozen. Checked first, all or nothing: every
    module must hold the adapter, and a model with a merged adapter must be unmerged before
    switching. Returns the model."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    mods = _require_swapped(model, "set_adapter")
    _require_adapter(mods, adapter_name, "adapter_name=")
    merged = [n for n, m in mods.items() if m.merged and m.active_adapter != adapter_name]
    if merged:
        raise ValueError(f"modules {merged[:3]}{' ...' if len(merged) > 3 else ''} have adapter "
                         f"{mods[merged[0]].active_adapter!r} merged into their base weight: ptune_rt.unmerge(model) "
                         f"before switching to {adapter_name!r}")
    for m in mods.values():
        m.active_adapter = adapter_name
        m.set_adapters_trainable(False)
        m.set_adapters_trainable(True, [adapter_name])
    return model


class mixed_adapters:
    """``with ptune_rt.mixed_adapters(model, adapter_names):`` row i of every batch the model runs
    uses the LoRA adapter ``adapter_names[i]`` (``None`` or ``"__base__"``: the base model alone),
    as PEFT's ``adapter_names=`` forward argument: many tasks' adapters served in one batch from one
    unmerged base. Inference only (``torch.no_grad()``; ``generate()`` qualifies). Checked on entry,
    before anything changes: every name must be an adapter of every LoRA module, and no adapter may
    be merged. Each LoRA linear then runs the base matmul once for the whole batch and, per adapter,
    the low-rank term on the rows that use it; in a decode step (one token per row) all used adapters
    at once, against their A and B stacked once per block. On the Triton backend every step runs
    the stacked form through the fused kernels (the shrink kernel, then the low-rank term added in
    the base GEMM's accumulator); elsewhere torch ops. Adapter weights must not change inside a
    block."""

    BASE = "__base__"

    def __init__(self, model: nn.Module, adapter_names):
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
            raise TypeError(f"adapter_names must be a sequence of adapter names (one per row, None or "
                            f"{self.BASE!r} for the base model), got {type(adapter_names).__name__}")
        names = [self.BASE if n is None else n for n in adapter_names]
        if not names:
            raise ValueError("adapter_names is empty; expected one adapter name per row of the batch")
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter_names must hold str or None, got {type(bad[0]).__name__}")
        self.mods = _require_swapped(model, "mixed_adapters")
        used = [n for n in dict.fromkeys(names) if n != self.BASE]
        for n in used:
            _require_adapter(self.mods, n, "adapter_names: ", f", or None / {self.BASE!r} for the base model")
        off = [m for m, mod in self.mods.items() if mod.disabled]
        if off:
            raise ValueError(f"modules {off[:3]}{' ...' if len(off) > 3 else ''} have their adapters disabled; enable "
                             "them before serving a mixed-adapter batch (rows that want the base model take None)")
        merged = [m for m, mod in self.mods.items() if mod.merged]
        if merged:
            raise ValueError(f"modules {merged[:3]}{' ...' if len(merged) > 3 else ''} have an adapter merged into "
                             "their base weight, which every row would get: ptune_rt.unmerge(model) first")
        self._check_not_nested()
        device = next(iter(self.mods.values())).weight.device  # index tensors where the layers run
        self.rows = (len(names), tuple((n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device))
                                       for n in used))

    def _check_not_nested(self) -> None:
        busy = [m for m, mod in self.mods.items() if mod._rows is not None]
        if busy:
            raise RuntimeError(f"modules {busy[:3]} are already inside a ptune_rt.mixed_adapters block: "
                               "blocks do not nest")

    def __enter__(self):
        self._check_not_nested()  # again: another block may have been entered since this one was made
        for mod in self.mods.values():
            mod._rows, mod._rows_stack = self.rows, None
        return self

    def __exit__(self, *exc):
        for mod in self.mods.values():
            mod._rows, mod._rows_stack = None, None
        return False


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again, bit-exact (see ``LoRALinear.unmerge``)."""
    for m in _require_swapped(model, "unmerge").values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA module's active adapter into its base weight and put the base layers back in
    place of the ``LoRALinear`` modules (the model's own modules, classes and requires_grad flags
    as before ``apply``): the plain model, whose ``save_pretrained`` loads into the stock class.
    Checked first, all or nothing (see :func:`merge`). A model from ``ptune_rt.accelerate`` keeps
    PEFT's wrapper: use its own ``merge_and_unload()``."""
    mods = _require_swapped(model, "merge_and_unload")
    from_peft = [n for n, m in mods.items() if m.__dict__.get(SOURCE_ATTR) == "peft"]
    if from_peft:
        raise ValueError(f"merge_and_unload: LoRA modules {from_peft[:3]} come from a PEFT model run by "
                         "ptune_rt.accelerate; call peft_model.merge_and_unload() (PEFT's own) instead")
    merge(model)
    disable_mlp_recompute(model)
    disable_projection_groups(model)
    for n, m in mods.items():
        m.base_layer.train(m.training)
        _set_submodule(model, n, m.base_layer)
    _swap_out_tokens(model, fold=True)
    restore_requires_grad(model)
    model_state.forget(model, "lora")
    return model


def disable(model: nn.Module):
    """Run every LoRA module's base layer alone; returns the function that enables them again."""
    mods = _require_swapped(model, "disable_adapter")
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise ValueError(f"disable_adapter: LoRA modules {merged[:3]} have their adapter merged into the base weight; "
                         "ptune_rt.unmerge(model) first")
    before = {n: m.disabled for n, m in mods.items()}
    tokens = {id(t): (t, t.disabled) for t in token_adapters(model)}
    for m in mods.values():
        m.disabled = True
    for t, _ in tokens.values():
        t.disabled = True

    def enable() -> None:
        for n, m in mods.items():
            m.disabled = before[n]
        for t, was in tokens.values():
            t.disabled = was
    return enable


COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: nn.Module, adapters: list, weights: list, adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None) -> nn.Module:
    """Add ``adapter_name`` to every LoRA module, a weighted combination of ``adapters``, as PEFT's
    ``add_weighted_adapter`` builds it (same operands, same rank, alpha = rank): "linear" (equal
    ranks: A = sum sign_i sqrt|w_i s_i| A_i, B = sum sqrt|w_i s_i| B_i), "cat" (the adapters' A
    and B stacked, rank the sum: the exact sum of w_i s_i B_i A_i) or "svd" (the rank ``svd_rank``,
    default the largest, truncation of sum w_i s_i B_i A_i). The new adapter starts inactive and
    frozen; ``set_adapter(model, adapter_name)`` makes it the one that runs. Checked first."""
    mods = _require_swapped(model, "add_weighted_adapter")
    if isinstance(adapters, str) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {len(adapters)} finite numbers, one per adapter, got {weights!r}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    for a in adapters:
        _require_adapter(mods, a, "adapters: ")
    dora = sorted({a for m in mods.values() for a in adapters if m.is_dora(a)})
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters: add_weighted_adapter combines plain LoRA adapters "
                         "only (a DoRA adapter's magnitude does not combine linearly)")
    taken = [n for n, m in mods.items() if adapter_name in m.lora_A]
    if not isinstance(adapter_name, str) or not adapter_name or taken:
        raise ValueError(f"adapter_name must be a new adapter name, got {adapter_name!r}"
                         f"{' (already an adapter of ' + repr(taken[:3]) + ')' if taken else ''}")
    rank = _combined_rank(mods, adapters, combination_type, svd_rank)
    config = model_state.get(model, "lora")
    rslora = bool(getattr(getattr(config, "config", None), "use_rslora", False))
    first = adapters[0]
    for m in mods.values():
        a, b = _combine(m, adapters, [float(w) for w in weights], combination_type, rank)
        m.add_adapter(adapter_name, rank, float(rank), m.lora_dropout_p[first], rslora, init="zeros")
        with torch.no_grad():
            m.lora_A[adapter_name].weight.copy_(a)
            m.lora_B[adapter_name].weight.copy_(b)
        for layer in (m.lora_A[adapter_name], m.lora_B[adapter_name]):
            layer.requires_grad_(False)
    return model


def _combined_rank(mods: dict, adapters: list, combination_type: str, svd_rank) -> int:
    ranks = sorted({m.r[a] for m in mods.values() for a in adapters})
    if combination_type == "linear":
        if len(ranks) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}")
        return ranks[0]
    if combination_type == "cat":
        return sum(next(iter(mods.values())).r[a] for a in adapters)
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ValueError(f"svd_rank must be None or an integer >= 1, got {svd_rank!r}")
    limit = min(min(m.in_features, m.out_features) for m in mods.values())
    rank = svd_rank or max(ranks)
    if rank > limit:
        raise ValueError(f"svd_rank={rank} exceeds the smallest min(in_features, out_features)={limit} of the "
                         "LoRA modules")
    return rank


def _combine(m: LoRALinear, adapters: list, weights: list, combination_type: str, rank: int):
    """(A [rank, in], B [out, rank]) of the combination in one module (fp32 math, the adapters' dtype)."""
    As = [m.lora_A[a].weight.detach().float() for a in adapters]
    Bs = [m.lora_B[a].weight.detach().float() for a in adapters]
    ws = [w * m.scaling[a] for w, a in zip(weights, adapters)]
    dtype = m.lora_A[adapters[0]].weight.dtype
    if combination_type == "linear":
        a = sum(math.copysign(math.sqrt(abs(w)), w) * A for w, A in zip(ws, As))
        b = sum(math.sqrt(abs(w)) * B for w, B in zip(ws, Bs))
    elif combination_type == "cat":
        a = torch.cat([w * A for w, A in zip(ws, As)], dim=0)
        b = torch.cat(Bs, dim=1)
    else:
        delta = sum(w * (B @ A) for w, A, B in zip(ws, As, Bs))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        b, a = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    return a.to(dtype), b.to(dtype)
