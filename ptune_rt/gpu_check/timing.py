"""Timings of ptune-rt, HF PEFT and the eager reference side by side, on CUDA.

Every implementation runs on the same tensors: for LoRA, PEFT's own ``peft.tuners.lora.Linear``
wrapping an ``nn.Linear`` (adapters in fp32, as ``get_peft_model`` leaves them), and ptune-rt's op
and the eager reference on that module's parameters; for prefix attention, PEFT's path (the prefix
concatenated in front of K/V as its cache does, ``repeat_kv``, SDPA with a boolean [B, 1, L, P+L]
mask; the mask and the per-row prefix are built once, outside the timed region, as PEFT builds them
once per forward for all layers); for the prompt inputs, PEFT's embedding lookups and ``cat``.
Times are ``triton.testing.do_bench`` medians with the 0.2 / 0.8 quantiles (CUDA events, L2
flushed between runs); ``train`` is forward + backward, ``forward`` a no-grad forward.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ptune_rt.gpu_check import cases as C
from ptune_rt.gpu_check.numerics import DTYPES, LORA_SCALE, _generator, _randn, gather_inputs

IMPLS = ("ptune-rt", "PEFT", "eager")
WARMUP_MS, REP_MS = 25, 100


@dataclasses.dataclass
class Impl:
    run: Callable[[bool], torch.Tensor]  # run(training) -> output
    leaves: list                         # tensors whose .grad a training step fills
    prepare: Callable[[bool], object] = lambda training: None  # outside the timed region (module.train())


def bench(fn, grad_to_none=None) -> dict:
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return {"median_ms": med, "q20_ms": lo, "q80_ms": hi}


# ----------------------------------------------------------------------------------------
# the three implementations per case kind
# ----------------------------------------------------------------------------------------


class _Holder(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora_linear(c: C.LoraCase, device):
    """PEFT's LoRA Linear around an nn.Linear [K -> N] (bias-free), adapters in fp32 (a DoraCase: with
    ``use_dora=True``, the magnitude initialized by PEFT from these weights)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as PeftLinear

    dt, g = DTYPES[c.dtype], _generator(device, c)
    lin = torch.nn.Linear(c.K, c.N, bias=False, device=device, dtype=dt)
    with torch.no_grad():
        lin.weight.copy_(_randn(g, c.N, c.K, device=device, dtype=dt, scale=c.K ** -0.5))
    holder = inject_adapter_in_model(LoraConfig(r=c.r, lora_alpha=int(LORA_SCALE * c.r), lora_dropout=c.dropout,
                                                target_modules=["lin"], use_dora=c.kind == "dora"), _Holder(lin))
    layer = holder.lin
    assert isinstance(layer, PeftLinear), type(layer)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(_randn(g, c.r, c.K, device=device, scale=c.K ** -0.5))
        layer.lora_B["default"].weight.copy_(_randn(g, c.N, c.r, device=device, scale=c.r ** -0.5))
    layer.base_layer.weight.requires_grad_(False)
    return layer


def _lora_impls(c: C.LoraCase, device):
    from ptune_rt.ops import lora_linear
    from ptune_rt.reference import lora_linear_reference

    dt, g = DTYPES[c.dtype], _generator(device, c)
    peft = peft_lora_linear(c, device)
    w, a, b = peft.base_layer.weight, peft.lora_A["default"].weight, peft.lora_B["default"].weight
    s = peft.scaling["default"]
    x = _randn(g, c.M, c.K, device=device, dtype=dt).requires_grad_()
    leaves = [x, a, b]

    def eager(training):
        keep = torch.rand(x.shape, device=device) >= c.dropout if (training and c.dropout) else None
        return lora_linear_reference(x, w, None, a, b, s, keep, c.dropout)

    impls = {"ptune-rt": Impl(lambda t: lora_linear(x, w, None, a, b, s, c.dropout if t else 0.0, backend="triton"),
                              leaves),
             "PEFT": Impl(lambda t: peft(x), leaves, prepare=peft.train),
             "eager": Impl(eager, leaves)}
    return impls, _randn(g, c.M, c.N, device=device, dtype=dt)


def _repeat_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    try:
        from transformers.integrations.sdpa_attention import repeat_kv
    except ImportError:  # pragma: no cover - older transformers
        B, H, S, D = t.shape
        return t[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D)
    return repeat_kv(t, n)


def _attention_impls(c: C.AttentionCase, device):
    from ptune_rt.ops.prefix_attention import prefix_attention
    from ptune_rt.reference import prefix_attention_mask, prefix_attention_reference

    dt, g, G = DTYPES[c.dtype], _generator(device, c), c.Hq // c.Hkv
    train = c.mode == "train"
    q = _randn(g, c.B, c.Hq, c.L, c.D, device=device, dtype=dt).requires_grad_(train)
    k, v = (_randn(g, c.B, c.Hkv, c.S, c.D, device=device, dtype=dt).requires_grad_(train) for _ in range(2))
    pk, pv = (_randn(g, c.Hkv, c.P, c.D, device=device).requires_grad_(train) for _ in range(2))
    # PEFT: the prefix is in the cache, one copy per row, in the model's dtype
    rows_k, rows_v = (p.detach().to(dt)[None].expand(c.B, -1, -1, -1).contiguous().requires_grad_(train)
                      for p in (pk, pv))
    mask = prefix_attention_mask(c.B, c.L, c.S, c.P, None, c.causal, device)
    cache = None if train else tuple(torch.cat([r, t], dim=2) for r, t in ((rows_k, k), (rows_v, v)))

    def peft(_training):
        kk, vv = cache if cache is not None else (torch.cat([rows_k, k], 2), torch.cat([rows_v, v], 2))
        return F.scaled_dot_product_attention(q, _repeat_kv(kk, G), _repeat_kv(vv, G), attn_mask=mask)

    impls = {"ptune-rt": Impl(lambda t: prefix_attention(q, k, v, pk, pv, None, None, c.causal, backend="triton"),
                              [q, k, v, pk, pv]),
             "PEFT": Impl(peft, [q, k, v, rows_k, rows_v]),
             "eager": Impl(lambda t: prefix_attention_reference(q, k, v, pk, pv, None, None, c.causal)[0],
                           [q, k, v, pk, pv])}
    return impls, _randn(g, c.B, c.Hq, c.L, c.D, device=device, dtype=dt)


def _gather_impls(c: C.GatherCase, device):
    from ptune_rt.ops.prompt_inputs import build_inputs_embeds

    t, dt = gather_inputs(c, device), DTYPES[c.dtype]
    prompts = t["prompts"].requires_grad_()
    prompt_tokens = torch.arange(c.P, device=device).expand(c.B, c.P)

    def peft(_training):
        virtual = F.embedding(prompt_tokens, prompts).to(dt)
        return torch.cat([virtual, F.embedding(t["ids"], t["emb"])], dim=1)

    impls = {"ptune-rt": Impl(lambda _: build_inputs_embeds(t["src"], t["emb"], prompts, t["task_ids"],
                                                            backend="triton"), [prompts]),
             "PEFT": Impl(peft, [prompts]),
             "eager": None}  # the reference is a per-element Python loop: a spec, not timed
    return impls, t["dout"]


def _dora_impls(c: C.DoraCase, device):
    from ptune_rt.ops.dora_linear import dora_linear
    from ptune_rt.reference import dora_linear_reference

    dt, g = DTYPES[c.dtype], _generator(device, c)
    peft = peft_lora_linear(c, device)
    w, a, b = peft.base_layer.weight, peft.lora_A["default"].weight, peft.lora_B["default"].weight
    m = peft.lora_magnitude_vector["default"].weight
    m.data = m.data.float()  # PEFT keeps it in the norm's dtype; fp32 beside fp32 adapters
    s = peft.scaling["default"]
    x = _randn(g, c.M, c.K, device=device, dtype=dt).requires_grad_()
    leaves = [x, a, b, m]
    impls = {"ptune-rt": Impl(lambda t: dora_linear(x, w, None, a, b, m, s, backend="triton"), leaves),
             "PEFT": Impl(lambda t: peft(x), leaves, prepare=peft.train),
             "eager": Impl(lambda t: dora_linear_reference(x, w, None, a, b, m, s), leaves)}
    return impls, _randn(g, c.M, c.N, device=device, dtype=dt)


BUILDERS = {"lora": _lora_impls, "dora": _dora_impls, "attention": _attention_impls, "gather": _gather_impls}


# ----------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------


def _time_impl(impl: Impl, mode: str, grad_out) -> dict:
    impl.prepare(mode == "train")
    if mode == "train":
        return bench(lambda: impl.run(True).backward(grad_out), grad_to_none=impl.leaves)

    def forward():
        with torch.no_grad():
            impl.run(False)
    return bench(forward)


def _agreement(impls: dict) -> Optional[float]:
    """max|ptune-rt - PEFT| / max(1, max|PEFT|) of the no-grad forward (same weights, same inputs)."""
    impls["PEFT"].prepare(False)
    with torch.no_grad():
        ours, theirs = impls["ptune-rt"].run(False).float(), impls["PEFT"].run(False).float()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0)).item()


def time_case(case: C.Case, modes, hw: dict, device="cuda") -> list[dict]:
    """One row per (mode, implementation): median and quantiles, roofline bound, ratio to PEFT."""
    from ptune_rt.gpu_check.roofline import bounds

    impls, grad_out = BUILDERS[case.kind](case, device)
    bound = bounds(case, hw)
    agree = _agreement(impls)
    rows = []
    for mode in modes:
        for name in IMPLS:
            impl = impls.get(name)
            row = {"case": case.id, "kind": case.kind, "mode": mode, "impl": name,
                   "bound_us": bound[name][mode] * 1e6 if mode in bound[name] else None}
            if impl is None:
                rows.append({**row, "note": "not timed: the eager reference is a per-element Python loop"})
                continue
            rows.append({**row, **_time_impl(impl, mode, grad_out), "forward_rel_diff_vs_peft": agree})
        _add_ratios([r for r in rows if r["mode"] == mode])
    return rows


def _add_ratios(rows: list[dict]) -> None:
    peft = next((r.get("median_ms") for r in rows if r["impl"] == "PEFT"), None)
    for r in rows:
        if r.get("median_ms"):
            if r.get("bound_us"):
                r["fraction_of_bound"] = r["bound_us"] / 1e3 / r["median_ms"]
            if peft:
                r["speedup_vs_peft"] = peft / r["median_ms"]
