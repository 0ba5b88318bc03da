"""Roofline bounds beside each timing: an analytic model, not a measurement.

``bounds(case, hw)`` gives, per implementation (ptune-rt, PEFT, eager) and mode (train = forward +
backward, forward = no-grad forward), the sum over the kernels it launches of
max(FLOP time, HBM bytes / bandwidth): ``ptune_rt.bench.analytic`` for the LoRA linear,
``ptune_rt.bench.prefix``'s chains for prefix attention, and the small decode and gather models
below. The eager reference is given the unfused chain's bound (PEFT's model).
"""
from __future__ import annotations

from ptune_rt.bench import analytic as A
from ptune_rt.gpu_check import cases as C

_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LAYERS = 32  # PEFT's once-per-forward work (prefix gather, mask) is charged 1/LAYERS per layer


def _lora(c: C.LoraCase, hw: dict) -> dict:
    e = _BYTES[c.dtype]
    train = A.linear_model(c.M, c.K, c.N, c.r, e, c.dropout, hw)
    fwd = A.linear_model(c.M, c.K, c.N, c.r, e, 0.0, hw)["forward"]  # inference: no dropout
    out = {}
    for impl, chain in (("ptune-rt", "fused"), ("PEFT", "unfused")):
        out[impl] = {"forward": fwd[chain]["bound_s"],
                     "train": train["forward"][chain]["bound_s"] + train["backward"][chain]["bound_s"]}
    return out


def _dora(c: C.DoraCase, hw: dict) -> dict:
    """A LoRA linear's bounds plus what DoRA adds: ptune-rt reads W once more (W A^T for the norm) and
    writes the M x N pre-scale output; PEFT materializes B A and W + s B A (N x K, fp32: written, read
    for the norm) and runs its rescale as separate M x N elementwise passes (about four)."""
    out = _lora(c, hw)
    e, hbm = _BYTES[c.dtype], hw["hbm_bytes_per_s"]
    ours = (c.N * c.K * e + c.M * c.N * e) / hbm
    peft = (4 * c.N * c.K * 4 + 4 * 2 * c.M * c.N * e) / hbm
    for impl, extra in (("ptune-rt", ours), ("PEFT", peft)):
        out[impl] = {"forward": out[impl]["forward"] + extra, "train": out[impl]["train"] + extra}
    return out


def _attention_train(c: C.AttentionCase, hw: dict) -> dict:
    from ptune_rt.bench.prefix import fused_chain, peft_chain

    args = (c.B, c.Hq, c.Hkv, c.L, c.P, c.D, _BYTES[c.dtype], LAYERS)
    out = {}
    for impl, chain in (("ptune-rt", fused_chain), ("PEFT", peft_chain)):
        fwd = A._chain(chain(*args, backward=False), hw)["bound_s"]
        out[impl] = {"forward": fwd, "train": fwd + A._chain(chain(*args, backward=True), hw)["bound_s"]}
    return out


def decode_kernels(c: C.AttentionCase, fused: bool) -> list:
    """One decode step (q [B, Hq, 1, D]) over a prefix of P and a cache of S keys."""
    B, Hq, Hkv, S, P, D, e = c.B, c.Hq, c.Hkv, c.S, c.P, c.D, _BYTES[c.dtype]
    q, flops = B * Hq * D * e, 4 * B * Hq * (P + S) * D
    if fused:
        pre = 2 * Hkv * P * D
        return [A.Kernel("prefix cast fp32 -> activation dtype (K and V)", pre * 4, pre * e, pre),
                A.Kernel("shared-prefix pass: every row's queries of a KV head against its prefix", q + pre * e,
                         q + B * Hq * 4, 4 * B * Hq * P * D),
                A.Kernel("per-row cache pass", q + 2 * B * Hkv * S * D * e + B * S, q + B * Hq * 4,
                         4 * B * Hq * S * D),
                A.Kernel("merge the two parts by their log-sum-exps", 2 * q + 2 * B * Hq * 4, q, 6 * B * Hq * D)]
    kv_cat, kv_rep = 2 * B * Hkv * (P + S) * D * e, 2 * B * Hq * (P + S) * D * e
    return [A.Kernel("repeat_kv K and V (GQA)", kv_cat, kv_rep, 0),
            A.Kernel("SDPA with a [B, 1, 1, P+S] mask", q + kv_rep + B * (P + S), q, flops)]


def _decode(c: C.AttentionCase, hw: dict) -> dict:
    return {impl: {"forward": A._chain(decode_kernels(c, fused), hw)["bound_s"]}
            for impl, fused in (("ptune-rt", True), ("PEFT", False))}


def gather_kernels(c: C.GatherCase, fused: bool, backward: bool) -> list:
    """Input embeddings of B rows: P virtual tokens (fp32 prompt parameters) then L token rows."""
    B, L, P, H, T, e = c.B, c.L, c.P, c.H, c.T, _BYTES[c.dtype]
    rows, virt = B * (L + P) * H * e, B * P * H
    if fused and not backward:
        return [A.Kernel("prompt cast fp32 -> embedding dtype", T * P * H * 4, T * P * H * e, 0),
                A.Kernel("gather kernel: token rows and virtual rows", B * L * H * e + virt * e + B * (L + P) * 8,
                         rows, 0)]
    if fused:
        return [A.Kernel("dprompts: gather the virtual rows' gradient, sum per task", virt * e, T * P * H * 4, virt)]
    if not backward:
        return [A.Kernel("token embedding lookup", B * L * H * e + B * L * 8, B * L * H * e, 0),
                A.Kernel("prompt embedding lookup (fp32)", virt * 4, virt * 4, 0),
                A.Kernel("prompt cast to the model dtype", virt * 4, virt * e, 0),
                A.Kernel("cat(prompts, token embeddings)", rows, rows, 0)]
    return [A.Kernel("cast backward of the prompt rows", virt * e, virt * 4, 0),
            A.Kernel("embedding backward: sum into the prompt table", virt * 4, T * P * H * 4, virt)]


def _gather(c: C.GatherCase, hw: dict) -> dict:
    out = {}
    for impl, fused in (("ptune-rt", True), ("PEFT", False)):
        fwd = A._chain(gather_kernels(c, fused, False), hw)["bound_s"]
        out[impl] = {"forward": fwd, "train": fwd + A._chain(gather_kernels(c, fused, True), hw)["bound_s"]}
    return out


def bounds(case: C.Case, hw: dict | None = None) -> dict:
    """{implementation: {mode: bound in seconds}} on ``hw`` (default: the H100 SXM model)."""
    hw = hw or A.H100_SXM
    if case.kind == "lora":
        out = _lora(case, hw)
    elif case.kind == "dora":
        out = _dora(case, hw)
    elif case.kind == "attention":
        out = _decode(case, hw) if case.mode == "decode" else _attention_train(case, hw)
    else:
        out = _gather(case, hw)
    out["eager"] = dict(out["PEFT"])  # the eager reference runs the same unfused chain (or more)
    return out
