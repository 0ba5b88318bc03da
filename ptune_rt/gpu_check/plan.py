"""The run plan: every case by section, an estimated cost per case, and a time budget per section.

Cost model (seconds on one H100/H200-class GPU, the first run, with an empty Triton cache):

* a Triton compile costs ``COMPILE_S`` (about 1.2 s per LoRA GEMM variant for sm_90 measured on a
  busy 2-vCPU machine; a GPU host's CPUs are faster). Every config a launch chooses among (the
  kernels' shipped lists, read from ``ptune_rt.kernels``) compiles once per specialization: dtype,
  rank (R = 8 is not a multiple of 16, 16 and 64 are), M == 1 (Triton specializes integer
  arguments equal to 1), flags such as dropout; decode-sized LoRA launches take one fixed config;
  IA3 runs the LoRA GEMM at rank 0 (one launch forward, one for dX), the LoRA embedding its own
  gather kernel plus two of the LoRA linear's skinny launches (compiled by the LoRA cases, tuned
  anew), the Child-tuning step one fixed config (and its mask kernel), untuned;
* choosing a config benchmarks each candidate once per tuning key: ``TUNE_CONFIG_S`` each (what
  ``triton.autotune``'s 25 ms warmup + 100 ms cost; the kernels' own tuner is quicker);
* the checks themselves run at conservative effective rates (``RATES``) plus ``CASE_OVERHEAD_S``;
* a ``do_bench`` call (25 ms warmup, 100 ms of repeats) costs ``BENCH_CALL_S`` or eight runs of a
  slow op.

Budgets: the sections share the total budget (``--budget-s``, default 450 s, under 8 minutes with
``STARTUP_S`` of imports and CUDA start-up) in proportion to their estimates; a section may use
what the sections before it left unused.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ptune_rt.gpu_check import cases as C

COMPILE_S = 0.8
TUNE_CONFIG_S = 0.15
CASE_OVERHEAD_S = 0.3
BENCH_CALL_S = 0.35
STARTUP_S = 20.0
DEFAULT_BUDGET_S = 450.0
#: Effective rates on an H100-class GPU, well under the peaks (FLOP/s; bytes/s for "hbm").
RATES = {"bfloat16": 400e12, "float16": 400e12, "float32": 30e12, "float64": 40e12, "hbm": 2.0e12}
_ELEM = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclasses.dataclass
class PlannedCase:
    case: C.Case
    est_s: float
    modes: tuple = ()  # timing sections: what gets timed

    def to_json(self) -> dict:
        out = {**C.describe(self.case), "est_s": round(self.est_s, 2)}
        if self.modes:
            out["modes"] = list(self.modes)
        return out


@dataclasses.dataclass
class Section:
    id: str
    cases: list
    budget_s: float = 0.0

    @property
    def est_s(self) -> float:
        return sum(p.est_s for p in self.cases)

    def to_json(self) -> dict:
        return {"id": self.id, "title": C.SECTION_TITLES[self.id], "est_s": round(self.est_s, 1),
                "budget_s": round(self.budget_s, 1), "cases": [p.to_json() for p in self.cases]}


def _shipped(KA, name: str, dtype, head_dim: int) -> list:
    try:
        return KA.shipped_configs(name, dtype, head_dim)
    except TypeError:  # an older signature without the head dim
        return KA.shipped_configs(name, dtype)


def _config_counts() -> dict:
    """How many configs each kernel chooses among (the shipped lists; defaults if they cannot be read).

    LoRA: fused forward and dX (2 x the fused list), four skinny launches (S, G, dB, dA); at most
    ``decode_rows`` rows every launch takes one fixed config, untuned."""
    try:
        import torch

        from ptune_rt.kernels import lora as KL
        from ptune_rt.kernels import prefix_attention as KA
        dts = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        fused = getattr(KL, "fused_configs", lambda dt: KL.FUSED_CONFIGS)
        from ptune_rt.kernels import lora_embedding as KE
        return {"lora": {n: 2 * len(fused(dt)) + 4 * len(KL.SKINNY_CONFIGS) for n, dt in dts.items()},
                "ia3": {n: 2 * len(fused(dt)) for n, dt in dts.items()},
                "lora_embedding": {"gather": len(KE.FWD_CONFIGS), "skinny": 2 * len(KL.SKINNY_CONFIGS)},
                "lora_decode_rows": getattr(KL, "DECODE_ROWS", 0),
                "attention": {n: {k: len(_shipped(KA, k, dt, 128)) for k in ("fwd", "dq", "dkdv")}
                              for n, dt in dts.items()}}
    except Exception:  # noqa: BLE001 - the plan must build anywhere; these are the lists at writing
        half = {"fwd": 3, "dq": 1, "dkdv": 3}
        return {"lora": {"bfloat16": 16, "float16": 16, "float32": 14}, "lora_decode_rows": 16,
                "ia3": {"bfloat16": 4, "float16": 4, "float32": 2},
                "lora_embedding": {"gather": 3, "skinny": 6},
                "attention": {"bfloat16": half, "float16": half, "float32": {"fwd": 1, "dq": 1, "dkdv": 1}}}


class CostModel:
    """Estimated seconds per case: ``kernels`` (compiles and tunings not paid for by an earlier
    case) plus ``run`` (the check or the timings themselves)."""

    def __init__(self):
        self.configs = _config_counts()
        self.compiled: set = set()
        self.tuned: set = set()

    def _first(self, seen: set, key, cost: float) -> float:
        if key in seen:
            return 0.0
        seen.add(key)
        return cost

    def _compile_and_tune(self, spec, tune_key, n_configs: int) -> float:
        return (self._first(self.compiled, spec, n_configs * COMPILE_S)
                + self._first(self.tuned, tune_key, n_configs * TUNE_CONFIG_S))

    def kernels(self, c: C.Case) -> float:
        if c.kind in ("lora", "dora") and c.M <= self.configs["lora_decode_rows"]:  # fixed configs, untuned
            return self._first(self.compiled, (c.kind, c.dtype, c.r, c.M == 1, "decode"), 6 * COMPILE_S)
        if c.kind in ("lora", "dora"):  # DoRA: the LoRA kernels with its own flags, tuned per key
            return self._compile_and_tune((c.kind, c.dtype, c.r, c.dropout > 0),
                                          (c.kind, c.dtype, c.M, c.K, c.N, c.r, c.dropout > 0),
                                          self.configs["lora"][c.dtype])
        if c.kind == "ia3" and c.M <= self.configs["lora_decode_rows"]:
            return self._first(self.compiled, ("ia3", c.dtype, c.feedforward, c.M == 1, "decode"), 2 * COMPILE_S)
        if c.kind == "ia3":  # the LoRA GEMM at rank 0 with the scale's flags: forward and dX
            return self._compile_and_tune(("ia3", c.dtype, c.feedforward), ("ia3", c.dtype, c.M, c.K, c.N, c.feedforward),
                                          self.configs["ia3"][c.dtype])
        if c.kind == "lora_embedding":  # its skinny launches are the LoRA linear's, compiled by the r = 16 cases
            n = self.configs["lora_embedding"]
            return (self._first(self.compiled, ("lora_embedding", c.dtype), n["gather"] * COMPILE_S)
                    + self._first(self.tuned, ("lora_embedding", c.dtype, c.M, c.V, c.H, c.r),
                                  (n["gather"] + n["skinny"]) * TUNE_CONFIG_S))
        if c.kind == "child_adamw":  # one fixed config, untuned; mode F also compiles the mask kernel
            return self._first(self.compiled, ("child_adamw", c.dtype, c.mode), (1 + (c.mode == "F")) * COMPILE_S)
        if c.kind == "attention":
            return self._compile_and_tune(("attn", c.dtype, c.mode, c.padding is not None),
                                          ("attn", c.dtype, c.mode, c.L, c.S, c.P, c.padding is not None),
                                          self._attention_configs(c))
        return self._first(self.compiled, ("gather", c.dtype, c.T > 1), COMPILE_S)

    def _attention_configs(self, c: C.AttentionCase) -> int:
        cfg = self.configs["attention"][c.dtype]
        if c.mode == "decode":
            return 2 * cfg["fwd"]  # the shared-prefix pass and the per-row cache pass
        return cfg["fwd"] + cfg["dq"] + 2 * cfg["dkdv"]  # dK/dV of the sequence keys and of the prefix

    @staticmethod
    def run(c: C.Case) -> float:
        """The check itself: the op, the eager reference in its dtype and the float64 gold."""
        if c.kind == "gather":
            return 2 * c.B * (c.L + c.P) * 120e-6 + CASE_OVERHEAD_S  # the per-row Python reference, twice
        if c.kind == "lora_embedding":  # memory-bound: the table's float64 cast, gathers, the skinny products
            traffic = (c.V * c.H * (_ELEM[c.dtype] + _ELEM["float64"]) * 2
                       + c.M * c.H * (_ELEM[c.dtype] + _ELEM["float64"]) * 8)
            return traffic / RATES["hbm"] + CASE_OVERHEAD_S
        if c.kind == "child_adamw":  # elementwise: about 30 passes over the tensor per step and run
            from ptune_rt.gpu_check.numerics import CHILD_STEPS
            traffic = c.N * c.K * (_ELEM[c.dtype] + 4 + _ELEM["float64"]) * 30 * CHILD_STEPS
            return traffic / RATES["hbm"] + CASE_OVERHEAD_S
        if c.kind in ("lora", "dora", "ia3"):
            flops = 2 * (2 * c.M * c.N * c.K)  # y and dX: the two big products
            traffic = (c.M * (c.K + c.N) + c.N * c.K) * (_ELEM[c.dtype] + _ELEM["float64"]) * 8
            extra = 0.0
        else:
            scores = c.B * c.Hq * c.L * (c.P + c.S)
            flops = 4 * scores * c.D * (1 if c.mode == "decode" else 3.5)
            traffic = scores * (4 + 8) * 10  # the references' fp32 and float64 scores, ~10 passes
            extra = 0.05 * c.Hkv  # one reference call per KV head
        return (2 * flops / RATES[c.dtype] + flops / RATES["float64"] + traffic / RATES["hbm"]
                + CASE_OVERHEAD_S + extra)

    def numerics(self, c: C.Case) -> float:
        return self.kernels(c) + self.run(c)

    def timing(self, c: C.Case, modes) -> float:
        """Three implementations (ptune-rt, PEFT, eager) per mode, plus the op's tunings if new."""
        from ptune_rt.gpu_check import roofline

        bounds = roofline.bounds(c)
        slowest = max(bounds[impl][m] for impl in ("PEFT", "eager") for m in modes)
        per_call = max(BENCH_CALL_S, 8 * 3 * slowest)  # unfused ops at about a third of their bound
        return self.kernels(c) + 3 * len(modes) * per_call + 1.0  # + PEFT's module and the inputs


def _with_budgets(sections: list[Section], budget_s: Optional[float]) -> list[Section]:
    """Share ``budget_s`` (minus start-up) among the sections in proportion to their estimates;
    ``None``: no limit (every section's budget is infinite)."""
    total = sum(s.est_s for s in sections) or 1.0
    for s in sections:
        s.budget_s = float("inf") if budget_s is None else max(0.0, budget_s - STARTUP_S) * s.est_s / total
    return sections


def build_plan(subset: str = "full", sections: tuple = ("numerics", "timing"),
               budget_s: Optional[float] = DEFAULT_BUDGET_S) -> list[Section]:
    """Every section of the run with its cases in order, their estimated cost and its budget."""
    model = CostModel()
    out = []
    if "numerics" in sections:
        for sid, cs in C.numerics_cases(subset).items():
            out.append(Section(sid, [PlannedCase(c, model.numerics(c)) for c in cs]))
    if "timing" in sections:
        for sid, cs in C.timing_cases(subset).items():
            out.append(Section(sid, [PlannedCase(c, model.timing(c, modes), modes) for c, modes in cs]))
    return _with_budgets(out, budget_s)


def plan_summary(plan: list[Section], budget_s: Optional[float]) -> dict:
    est = sum(s.est_s for s in plan)
    return {"estimated_total_s": round(STARTUP_S + est, 1), "startup_s": STARTUP_S,
            "budget_s": budget_s, "cost_model": {"compile_s": COMPILE_S, "tune_config_s": TUNE_CONFIG_S,
                                                 "case_overhead_s": CASE_OVERHEAD_S, "bench_call_s": BENCH_CALL_S,
                                                 "effective_rates": RATES},
            "sections": [s.to_json() for s in plan]}
