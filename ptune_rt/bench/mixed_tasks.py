"""``ptune-rt bench --suite mixed-tasks``: serving several tuned tasks in one batch.

T tasks (prompt tuning, and prefix tuning), R rows each, on the Llama-like benchmark model with
random weights. ptune-rt runs the T x R rows as one mixed batch (``task_ids`` per row: one soft-prompt
gather at the input, or the fused prefix attention's per-row task index). HF PEFT 0.21.2 cannot mix
prompt-learning tasks in one batch, so it serves them the way it can: one ``PeftModel`` holding the
T adapters, and for each task ``set_adapter(task)`` then the task's R rows. Both hold identical
weights and inputs, and the run checks that they compute the same logits and tokens.

Measured, interleaved round by round (medians of ``--repeats`` runs, >= 3):

* greedy generation of ``new_tokens`` tokens after ``prompt_len``-token prompts (no padding),
  throughput = generated tokens / wall time;
* a no-grad forward over the prompts, throughput = prompt tokens / wall time;
* dispatched ops (``TorchDispatchMode``) of one forward and one whole generate call, and per
  generated token.

Writes ``mixed_tasks_<device>.json`` (numbers + provenance), ``.md`` and ``.png``.

Modes (:data:`MODES`): the default run times prompt and prefix tuning (the methods with a target) in 6
rounds (under 5 minutes on a 2-core CPU); ``--full`` is the configuration of the committed results
(``bench/results/mixed_tasks_cpu.*``: LoRA too, 7 rounds); ``--quick`` runs tiny shapes in seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

from ptune_rt.bench.workload import ModelShape
from ptune_rt.methods.lora.inject import lora_modules

METHODS = ("prompt_tuning", "prefix_tuning", "lora")
#: Methods PEFT serves only task by task (set_adapter, then that task's rows): the ones with a target.
TASK_BY_TASK = ("prompt_tuning", "prefix_tuning")
CASES = ("generate", "forward")
#: Throughput of ptune-rt's mixed batch over PEFT's task-by-task loop, per method and case.
TARGET_RATIO = 2.0
MIN_REPEATS = 3

#: The settings of each run mode (an option given on the command line wins). ``default``: the methods
#: with a target, 6 timed rounds (the fewest behind a PASS / MISS), under 5 minutes on a 2-core CPU;
#: ``full``: the command of the committed ``bench/results/mixed_tasks_cpu.*``.
MODES = {
    "quick": {"repeats": 5, "methods": ",".join(METHODS)},
    "default": {"repeats": 6, "methods": ",".join(TASK_BY_TASK)},
    "full": {"repeats": 7, "methods": ",".join(METHODS)},
}
FULL_HELP = ("the configuration of the committed results (bench/results/mixed_tasks_cpu.*): every method, --repeats "
             "7, about 5 minutes on a 2-core CPU")

#: Seconds per call of each variant in the committed run on its 2-core CPU, per workload:
#: the plan's prior costs until the run's own calls are measured.
PRIOR_S = {
    "default": {"build": 3.0, "per_method_build": 1.0,
                "prompt_tuning": {"generate": {"peft": 5.3, "ptune-rt": 1.9, "base": 1.5},
                                  "forward": {"peft": 1.4, "ptune-rt": 1.1, "base": 0.74}},
                "prefix_tuning": {"generate": {"peft": 5.0, "ptune-rt": 1.44, "base": 1.35},
                                  "forward": {"peft": 0.96, "ptune-rt": 0.64, "base": 0.67}},
                "lora": {"generate": {"peft": 2.3, "ptune-rt": 1.7, "base": 1.3},
                         "forward": {"peft": 0.92, "ptune-rt": 0.92, "base": 0.69}}},
    "quick": {"build": 0.5, "per_method_build": 0.2,
              **{m: {"generate": {"peft": 0.3, "ptune-rt": 0.08, "base": 0.06},
                     "forward": {"peft": 0.05, "ptune-rt": 0.02, "base": 0.02}} for m in METHODS}},
}
#: Op counting runs a forward and a generate of both sides under a dispatch mode, about this much slower.
OPCOUNT_SLOWDOWN = 1.3


@dataclasses.dataclass(frozen=True)
class MixedWorkload(ModelShape):
    """Model shape, tasks and batch of one mixed-task run."""

    tasks: int = 8
    rows_per_task: int = 4
    num_virtual_tokens: int = 16
    prompt_len: int = 32
    new_tokens: int = 16
    #: LoRA: rank and alpha of every task's adapter, on all seven projections
    lora_r: int = 16
    lora_alpha: float = 32.0

    @classmethod
    def quick(cls) -> "MixedWorkload":
        """Tiny shapes for smoke tests (same structure: GQA, several tasks, several rows each)."""
        return cls(**cls.QUICK, tasks=4, rows_per_task=2, num_virtual_tokens=4, prompt_len=8, new_tokens=4, lora_r=4,
                   lora_alpha=8.0)

    @property
    def batch(self) -> int:
        return self.tasks * self.rows_per_task

    def model_workload(self):
        """The LoRA benchmark's ``Workload`` with this model shape (for its model factory)."""
        from ptune_rt.bench.workload import Workload

        return Workload(**self.model_fields(), gen_batch=self.batch, gen_prompt=self.prompt_len,
                        gen_new_tokens=self.new_tokens)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch"] = self.batch
        d["prompt_tokens"] = self.batch * self.prompt_len
        d["generated_tokens"] = self.batch * self.new_tokens
        return d


# ----------------------------------------------------------------------------------------
# setup: one factory for timing, op counts and equality
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class MixedSetup:
    method: str
    peft: object                 # PeftModel holding adapters task0 .. task{T-1}
    ptune: object                # the same base with a ptune-rt soft prompt / prefix / LoRA adapters for T tasks
    input_ids: object            # [T * R, prompt_len], rows of all tasks interleaved
    task_ids: object             # [T * R]
    rows: list                   # rows of each part PEFT returns, in batch order (one part per task, or
                                 # one part of all rows where PEFT runs the mixed batch itself: LoRA)

    @staticmethod
    def adapter(t: int) -> str:
        return f"task{t}"

    def adapter_names(self, task_ids=None) -> list:
        """The LoRA adapter name of every row (PEFT's ``adapter_names``, ptune-rt's ``mixed_adapters``)."""
        return [self.adapter(int(t)) for t in (self.task_ids if task_ids is None else task_ids)]


def _peft_config(method: str, wl: MixedWorkload):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    from ptune_rt.bench.workload import LLAMA_TARGETS

    P = wl.num_virtual_tokens
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    if method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=wl.lora_r, lora_alpha=wl.lora_alpha,
                          target_modules=list(LLAMA_TARGETS))
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)


def _lora_tasks(peft_model, base, wl: MixedWorkload):
    """ptune-rt LoRA on a copy of ``base`` holding PEFT's T adapters (random non-zero B, seeded) under
    the same names, task0 active."""
    import copy

    import torch

    import ptune_rt
    from ptune_rt.bench.workload import LLAMA_TARGETS

    g = torch.Generator().manual_seed(wl.seed + 20)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ptune = ptune_rt.apply(copy.deepcopy(base), ptune_rt.LoRAConfig(r=wl.lora_r, alpha=wl.lora_alpha,
                                                                    target_modules=list(LLAMA_TARGETS)))
    inner = peft_model.get_base_model()
    mods = lora_modules(ptune)
    for n, m in mods.items():
        pm = inner.get_submodule(n)
        for t in range(wl.tasks):
            a = MixedSetup.adapter(t)
            m.add_adapter(a, wl.lora_r, wl.lora_alpha, init="zeros")
            with torch.no_grad():
                m.lora_A[a].weight.copy_(pm.lora_A[a].weight)
                m.lora_B[a].weight.copy_(pm.lora_B[a].weight)
    ptune_rt.set_adapter(ptune, MixedSetup.adapter(0))
    for m in mods.values():
        m.delete_adapter("default")  # apply's own adapter: no task of this run
    return ptune


def build(wl: MixedWorkload, method: str, base, device) -> MixedSetup:
    """PEFT (T adapters, seeded random prompts) and ptune-rt (T tasks holding the same values) over
    copies of ``base``, plus the mixed batch."""
    import copy

    import torch
    from peft import get_peft_model

    import ptune_rt
    from ptune_rt.methods.prefix.inject import prefix_encoder

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    T, P = wl.tasks, wl.num_virtual_tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wl.seed + 10)
        peft_model = get_peft_model(copy.deepcopy(base), _peft_config(method, wl), adapter_name=MixedSetup.adapter(0))
        for t in range(1, T):
            peft_model.add_adapter(MixedSetup.adapter(t), _peft_config(method, wl))
    peft_model.eval()
    if method == "lora":
        ptune = _lora_tasks(peft_model, base, wl)
    elif method == "prompt_tuning":
        ptune = ptune_rt.apply(copy.deepcopy(base), ptune_rt.PromptTuningConfig(P, num_tasks=T))
        table = ptune.prompt_encoder["default"].embedding.weight  # [T, P, hidden]
        with torch.no_grad():
            for t in range(T):
                table[t].copy_(peft_model.prompt_encoder[MixedSetup.adapter(t)].embedding.weight)
    else:
        ptune = ptune_rt.apply(copy.deepcopy(base), ptune_rt.PrefixConfig(P, num_tasks=T))
        enc = prefix_encoder(ptune)
        for t in range(T):
            enc.load_prompt_embeddings(peft_model.prompt_encoder[MixedSetup.adapter(t)].embedding.weight.detach(),
                                       task=t)
    ptune.eval()
    g = torch.Generator().manual_seed(wl.seed + 3)
    ids = torch.randint(3, wl.vocab, (wl.batch, wl.prompt_len), generator=g).to(device)
    task_ids = torch.arange(T).repeat(wl.rows_per_task).to(device)  # every task spread over the batch
    if method in TASK_BY_TASK:
        rows = [(task_ids == t).nonzero().flatten() for t in range(T)]
    else:  # PEFT runs the mixed batch itself (adapter_names=): one part, all rows
        rows = [torch.arange(wl.batch, device=device)]
    return MixedSetup(method, peft_model, ptune, ids, task_ids, rows)


def _gen_kwargs(wl: MixedWorkload) -> dict:
    return dict(max_new_tokens=wl.new_tokens, min_new_tokens=wl.new_tokens, do_sample=False, pad_token_id=0,
                eos_token_id=None)


def _ptune_rows(s: MixedSetup, task_ids):
    """(context, forward kwargs) that give row i of ptune-rt's batch task ``task_ids[i]``."""
    import contextlib

    import ptune_rt

    if s.method == "lora":
        return ptune_rt.mixed_adapters(s.ptune, s.adapter_names(task_ids)), {}
    return contextlib.nullcontext(), {"task_ids": task_ids}


def ptune_forward(s: MixedSetup, task_ids=None):
    import torch

    ctx, kw = _ptune_rows(s, s.task_ids if task_ids is None else task_ids)
    with ctx, torch.no_grad():
        return s.ptune(input_ids=s.input_ids, **kw).logits


def peft_forward(s: MixedSetup):
    import torch

    if s.method not in TASK_BY_TASK:
        with torch.no_grad():
            return [s.peft(input_ids=s.input_ids, adapter_names=s.adapter_names()).logits]
    out = []
    with torch.no_grad():
        for t, rows in enumerate(s.rows):
            s.peft.set_adapter(MixedSetup.adapter(t))
            out.append(s.peft(input_ids=s.input_ids[rows]).logits)
    return out


def ptune_generate(s: MixedSetup, wl: MixedWorkload):
    import torch

    ctx, kw = _ptune_rows(s, s.task_ids)
    with ctx, torch.no_grad():
        return s.ptune.generate(input_ids=s.input_ids, attention_mask=torch.ones_like(s.input_ids), **kw,
                                **_gen_kwargs(wl))


def peft_generate(s: MixedSetup, wl: MixedWorkload):
    import torch

    if s.method not in TASK_BY_TASK:
        with torch.no_grad():
            return [s.peft.generate(input_ids=s.input_ids, attention_mask=torch.ones_like(s.input_ids),
                                    adapter_names=s.adapter_names(), **_gen_kwargs(wl))]
    out = []
    with torch.no_grad():
        for t, rows in enumerate(s.rows):
            s.peft.set_adapter(MixedSetup.adapter(t))
            ids = s.input_ids[rows]
            out.append(s.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **_gen_kwargs(wl)))
    return out


def _scatter(s: MixedSetup, parts: list):
    """Per-task outputs back into batch order."""
    full = parts[0].new_empty((s.input_ids.shape[0],) + tuple(parts[0].shape[1:]))
    for rows, part in zip(s.rows, parts):
        full[rows] = part
    return full


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------


def equality(s: MixedSetup, wl: MixedWorkload) -> dict:
    """ptune-rt's mixed batch vs PEFT (task by task; LoRA: its adapter_names batch) on the same weights
    and inputs."""
    import torch

    mine = ptune_forward(s)
    theirs = _scatter(s, peft_forward(s))
    L = wl.prompt_len
    diff = (mine[:, -L:] - theirs[:, -L:]).abs().max().item()  # the real tokens' logits (both layouts)
    gen_mine = ptune_generate(s, wl)
    gen_theirs = _scatter(s, peft_generate(s, wl))
    same_rows = (gen_mine[:, -wl.new_tokens:] == gen_theirs[:, -wl.new_tokens:]).all(-1)
    # the tasks really differ: every row run with task 0's adapter instead changes the logits
    other = ptune_forward(s, torch.zeros_like(s.task_ids))
    effect = (other[:, -L:] - mine[:, -L:]).abs().max().item()
    return {"logits_shape_ptune": list(mine.shape), "logits_shape_peft": list(theirs.shape),
            "logits_max_abs_diff": diff, "logits_max_abs": theirs[:, -L:].abs().max().item(),
            "argmax_agreement": (mine[:, -L:].argmax(-1) == theirs[:, -L:].argmax(-1)).float().mean().item(),
            "generated_rows_identical": int(same_rows.sum()), "rows": int(same_rows.numel()),
            "all_generated_tokens_identical": bool(same_rows.all()),
            "task_effect_max_abs_logit_change": effect}


def op_counts(s: MixedSetup, wl: MixedWorkload) -> dict:
    from ptune_rt.bench.opcount import OpCounter

    def count(fn) -> dict:
        c = OpCounter(None, descend=True)
        with c:
            fn()
        r = c.result(1)
        return {k: r[k] for k in ("all", "compute", "custom", "inside_custom_compute", "compute_expanded")} | \
            {"top_ops": r["top_ops"]}

    out = {}
    for name, fwd, gen in (("peft", peft_forward, peft_generate), ("ptune-rt", ptune_forward, ptune_generate)):
        out[name] = {"forward": count(lambda: fwd(s)), "generate": count(lambda: gen(s, wl))}
        out[name]["generate_per_token_step"] = {k: v / wl.new_tokens for k, v in out[name]["generate"].items()
                                                if k != "top_ops"}
    for case in ("forward", "generate"):
        out[f"{case}_compute_ratio_peft_over_ptune"] = (out["peft"][case]["compute"]
                                                        / max(1, out["ptune-rt"][case]["compute"]))
    out["note"] = ("forward: one no-grad forward over all rows (PEFT: one per task; LoRA: one adapter_names "
                   "batch); generate: one whole greedy generate call (PEFT: one per task; LoRA: one), per token "
                   "step = that / new tokens. compute = dispatched ops "
                   "minus metadata-only ones; custom = ptune-rt's own ops (each counted once), expanded = with "
                   "what they run inside on the torch path")
    return out


def base_forward(base, s: MixedSetup):
    import torch

    with torch.no_grad():
        return base(input_ids=s.input_ids).logits


def base_generate(base, s: MixedSetup, wl: MixedWorkload):
    import torch

    with torch.no_grad():
        return base.generate(input_ids=s.input_ids, attention_mask=torch.ones_like(s.input_ids), **_gen_kwargs(wl))


def speed(setups: dict, base, wl: MixedWorkload, repeats: int, warmup: int, device, plan) -> dict:
    """Interleaved timings per method and case: PEFT (task by task; LoRA: its own mixed batch),
    ptune-rt's mixed batch, and the frozen base model on the same rows in one batch without any
    adapter (a reference point: it processes P fewer positions per row than prompt tuning)."""
    from ptune_rt.bench.timing import interleaved, summarize

    res = {}
    for method, s in setups.items():
        res[method] = {}
        for case in CASES:
            if case == "generate":
                fns = {"peft": lambda s=s: peft_generate(s, wl), "ptune-rt": lambda s=s: ptune_generate(s, wl),
                       "base": lambda s=s: base_generate(base, s, wl)}
                tokens = wl.batch * wl.new_tokens
                what = (f"greedy generate, {wl.batch} rows ({wl.tasks} tasks x {wl.rows_per_task}), "
                        f"{wl.prompt_len}-token prompts, {wl.new_tokens} new tokens each (prefill included)")
            else:
                fns = {"peft": lambda s=s: peft_forward(s), "ptune-rt": lambda s=s: ptune_forward(s),
                       "base": lambda s=s: base_forward(base, s)}
                tokens = wl.batch * wl.prompt_len
                what = f"no-grad forward over {wl.batch} rows x {wl.prompt_len} tokens"
            cpu: dict = {}
            plan.begin(f"{method}_{case}", f"timing: {method}, {case}")
            d = summarize(interleaved(fns, repeats, warmup, device, tick=plan.ticker(1, warmup * len(fns)),
                                      cpu_times=cpu), cpu_times=cpu)
            d["what"] = what
            d["tokens"] = tokens
            d["throughput_tokens_per_s"] = {n: tokens / v["median_s"] for n, v in d["variants"].items()}
            d["throughput_ratio"] = d["speedup"]  # same tokens: time ratio = throughput ratio
            res[method][case] = d
    return res


def evaluate_targets(results: dict) -> list[dict]:
    """One row per target, judged on its 95% interval (``report.verdict``)."""
    from ptune_rt.bench.report import judge

    rows = []
    for method, cases in results.get("speed", {}).items():
        if method not in TASK_BY_TASK:  # PEFT serves these mixed itself: a comparison, no target
            continue
        for case in CASES:
            if case in cases:
                d = cases[case]
                v = d["throughput_ratio"]
                rows.append({"target": f"{method}, {case}: throughput of ptune-rt's mixed batch vs PEFT task by task",
                             "value": v, "goal": f">= {TARGET_RATIO:g}x", "unit": "x",
                             **judge(v, TARGET_RATIO, True, d.get("speedup_ci95"),
                                     len(d["variants"]["peft"]["runs_s"]))})
    return rows


def make_plan(methods: list, repeats: int, warmup: int, quick: bool):
    """The run's plan: model builds, per method the equality check and op counts, then every timed call,
    with their prior costs."""
    from ptune_rt.bench.timing import Plan

    pr = PRIOR_S["quick" if quick else "default"]
    plan = Plan()
    plan.add("build", 1, pr["build"] + pr["per_method_build"] * len(methods), "building models")
    for m in methods:
        g, f = pr[m]["generate"], pr[m]["forward"]
        # equality: a forward and a generate of both sides, and one more ptune-rt forward
        plan.add(f"equality_{m}", 1, g["peft"] + g["ptune-rt"] + f["peft"] + 2 * f["ptune-rt"], f"equality: {m}")
        plan.add(f"ops_{m}", 1, OPCOUNT_SLOWDOWN * (g["peft"] + g["ptune-rt"] + f["peft"] + f["ptune-rt"]), f"ops: {m}")
    for m in methods:
        for case in CASES:
            per_variant = pr[m][case]
            plan.add(f"{m}_{case}", len(per_variant) * (warmup + repeats),
                     sum(per_variant.values()) / len(per_variant), f"timing: {m}, {case}")
    return plan


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def file_stem(results: dict) -> str:
    from ptune_rt.bench.report import suite_stem

    return suite_stem(results, "mixed_tasks")


def _ms(s) -> str:
    return f"{s * 1e3:.1f}"


def markdown(results: dict) -> str:
    from ptune_rt.bench.report import VERDICT_RULE, ci_cell, commit_label, load_label, mode_label, peak_load, verdict_of

    pv, wl = results["provenance"], results["workload"]
    v = pv["versions"]
    commit, loads = commit_label(pv), load_label(pv)
    out = [f"# ptune-rt mixed-task serving benchmark ({pv['device']}, {wl['dtype']})", "",
           f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, {loads}); "
           f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; commit {commit}; "
           f"{mode_label(results)}; {results['repeats']} interleaved runs per variant after {results['warmup']} warm-up; "
           f"command `{pv['command']}`.", "",
           f"Workload: Llama-like model from a `LlamaConfig` with random weights (hidden {wl['hidden']}, intermediate "
           f"{wl['intermediate']}, {wl['layers']} layers, {wl['heads']} heads / {wl['kv_heads']} KV heads, vocab "
           f"{wl['vocab']}), {wl['dtype']}; {wl['tasks']} tasks x {wl['rows_per_task']} rows = {wl['batch']} rows, "
           f"P = {wl['num_virtual_tokens']} virtual tokens per task, {wl['prompt_len']}-token prompts (no padding), "
           f"greedy generation of {wl['new_tokens']} new tokens per row.", "",
           "*ptune-rt*: one mixed batch of all rows, `task_ids` per row. *PEFT*: one `PeftModel` holding the "
           f"{wl['tasks']} adapters; for each task `set_adapter(task)`, then that task's rows (PEFT "
           f"{v['peft']} has no mixed-task batches for prompt or prefix tuning). *LoRA* (r={wl.get('lora_r')}, "
           f"alpha={wl.get('lora_alpha')}, all seven projections, one adapter per task): ptune-rt's "
           "`mixed_adapters(model, names)` against PEFT's own mixed batch (`adapter_names=`), so both sides run "
           "one batch and the LoRA rows carry no target. Same weights, same inputs.", ""]
    cpus = pv.get("cpu_count") or 1
    top = peak_load(pv)
    if pv["device"].startswith("cpu") and top > 0.5 * cpus:
        out += [f"> Note: the 1-minute load average reached {top:.1f} on {cpus} CPUs during this run: other processes "
                "competed for the cores, so the timings are noisy (interleaved runs and medians, but treat small "
                "ratios with care).", ""]
    out += ["| Method | Case | PEFT (median ms) | ptune-rt mixed batch (median ms) | base, no adapter "
            "(median ms) | PEFT tokens/s | ptune-rt tokens/s | throughput ratio | 95% interval | fastest runs ratio | "
            "CPU-time ratio | ceiling: PEFT / base | Target | Result |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    targets = {t["target"]: t for t in results.get("targets", [])}
    for method, cases in results.get("speed", {}).items():
        for case in CASES:
            d = cases.get(case)
            if not d:
                continue
            t = next((t for k, t in targets.items() if k.startswith(f"{method}, {case}:")), None)
            tp = d["throughput_tokens_per_s"]
            base = d["variants"].get("base")
            cpu = d.get("speedup_cpu_time")
            ceiling = d.get("ceiling_speedup_zero_cost_adapter")
            out.append(f"| {method} | {case} | {_ms(d['variants']['peft']['median_s'])} | "
                       f"{_ms(d['variants']['ptune-rt']['median_s'])} | {_ms(base['median_s']) if base else '–'} | "
                       f"{tp['peft']:.0f} | {tp['ptune-rt']:.0f} | **{d['throughput_ratio']:.2f}x** | {ci_cell(d)} | "
                       f"{d['speedup_of_minima']:.2f}x | {f'{cpu:.2f}x' if cpu else '–'} | "
                       f"{f'{ceiling:.2f}x' if ceiling else '–'} | "
                       f"{t['goal'] if t else ''} | {verdict_of(t)} |")
    out += ["", "Throughput ratio (the headline, judged against the target where there is one) = PEFT median time "
            "/ ptune-rt median time "
            "for the same tokens (above 1: ptune-rt serves faster); *fastest runs ratio* compares the quickest run of "
            "each (contention only slows runs down); *CPU-time ratio* compares median process CPU time. *generate* "
            "counts generated tokens, *forward* prompt tokens. *base*: the frozen model on the same rows in one batch "
            "without any adapter (prompt tuning runs P more positions per row than it); *ceiling* = PEFT time / base "
            "time, the ratio an adapter costing nothing in one batch would reach, so a target above it cannot be met "
            "by any implementation of the mixed batch. " + VERDICT_RULE, ""]
    ops = results.get("ops", {})
    if ops:
        out += ["## Dispatched ops", "",
                "| Method | Step | PEFT compute ops | ptune-rt compute ops (top level / custom ops expanded) | "
                "ptune-rt custom ops | PEFT / ptune-rt | PEFT all ops | ptune-rt all ops |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for method, d in ops.items():
            for step, key in (("one forward over all rows", "forward"), ("one generate call", "generate")):
                p, m = d["peft"][key], d["ptune-rt"][key]
                out.append(f"| {method} | {step} | {p['compute']} | {m['compute']} / {m['compute_expanded']} | "
                           f"{m['custom']} | {p['compute'] / max(1, m['compute']):.1f}x | {p['all']} | {m['all']} |")
            p, m = d["peft"]["generate_per_token_step"], d["ptune-rt"]["generate_per_token_step"]
            out.append(f"| {method} | per generated-token step (generate / new tokens) | {p['compute']:.0f} | "
                       f"{m['compute']:.0f} / {m['compute_expanded']:.0f} | {m['custom']:.2f} | "
                       f"{p['compute'] / max(1, m['compute']):.1f}x | {p['all']:.0f} | {m['all']:.0f} |")
        out += ["", next(iter(ops.values()))["note"] + ".", ""]
    eq = results.get("equality", {})
    if eq:
        out += ["## Equality (same weights and inputs)", "",
                "| Method | max abs logit diff (real tokens) | max abs logit | argmax agreement | rows generating identical "
                "tokens | logit change when every row takes task 0 |", "|---|---:|---:|---:|---:|---:|"]
        for method, e in eq.items():
            out.append(f"| {method} | {e['logits_max_abs_diff']:.2e} | {e['logits_max_abs']:.3f} | "
                       f"{e['argmax_agreement']:.4f} | {e['generated_rows_identical']} / {e['rows']} | "
                       f"{e['task_effect_max_abs_logit_change']:.3f} |")
        out.append("")
    sp = results.get("speed", {})
    if sp:
        out += ["## Timing detail", "", "| Method | Case | Variant | median ms | min ms | max ms | runs (ms) |",
                "|---|---|---|---:|---:|---:|---|"]
        for method, cases in sp.items():
            for case, d in cases.items():
                for n, var in d["variants"].items():
                    runs = ", ".join(_ms(t) for t in var["runs_s"])
                    out.append(f"| {method} | {case} | {n} | {_ms(var['median_s'])} | {_ms(var['min_s'])} | "
                               f"{_ms(var['max_s'])} | {runs} |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptune_rt.bench.report import VERDICT_COLORS, bar_groups, verdict_of

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    wl = results["workload"]
    fig.suptitle(f"{wl['tasks']} tasks x {wl['rows_per_task']} rows: ptune-rt mixed batch vs PEFT "
                 f"({results['provenance']['device']}, {wl['dtype']}, {results['mode']})")
    sp = results.get("speed", {})
    labels, vals, lo, hi, ceil, colors = [], [], [], [], [], []
    judged = {t["target"]: verdict_of(t) for t in results.get("targets", [])}
    for method, cases in sp.items():
        for case in CASES:
            if case in cases:
                d = cases[case]
                v = next((v for n, v in judged.items() if n.startswith(f"{method}, {case}:")), None)
                colors.append(VERDICT_COLORS.get(v, "tab:gray") if v else "tab:blue")  # blue: no target
                ceil.append(d.get("ceiling_speedup_zero_cost_adapter"))
                labels.append(f"{method.replace('_', ' ')}\n{case}")
                vals.append(d["throughput_ratio"])
                lo.append(max(0.0, d["throughput_ratio"] - d["speedup_paired_min"]))
                hi.append(max(0.0, d["speedup_paired_max"] - d["throughput_ratio"]))
    if vals:
        xs = list(range(len(vals)))
        ax1.bar(xs, vals, yerr=[lo, hi], capsize=4, color=colors)
        ax1.axhline(TARGET_RATIO, color="black", ls="--", lw=1,
                    label=f"target {TARGET_RATIO:g}x (prompt / prefix tuning vs PEFT task by task)")
        cx = [x for x, c in zip(xs, ceil) if c]
        if cx:
            ax1.scatter(cx, [c for c in ceil if c], marker="_", s=900, color="tab:purple", zorder=3,
                        label="ceiling: PEFT / base (no adapter)")
        ax1.axhline(1.0, color="gray", lw=0.8)
        ax1.set_xticks(xs)
        ax1.set_xticklabels(labels, fontsize=8)
        ax1.set_ylabel("throughput ratio (PEFT time / ptune-rt time)")
        ax1.set_title("Throughput ratio (median; bars: paired min-max)\ngreen PASS, red MISS, gray inconclusive, "
                      "blue no target", fontsize=9)
        ax1.legend(fontsize=8)
    ops = results.get("ops", {})
    if ops:
        labels, peft_v, mine_v = [], [], []
        for method, d in ops.items():
            for key, short in (("forward", "forward"), ("generate_per_token_step", "per token step")):
                labels.append(f"{method.replace('_', ' ')}\n{short}")
                peft_v.append(d["peft"][key]["compute"])
                mine_v.append(d["ptune-rt"][key]["compute"])
        bar_groups(ax2, labels, [(peft_v, "PEFT (task by task; LoRA: adapter_names batch)", "tab:orange"),
                                 (mine_v, "ptune-rt, mixed batch", "tab:blue")],
                   "dispatched compute ops", "Dispatched compute ops per step (all rows)")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ptune_rt.bench.common import add_common_arguments

    p = argparse.ArgumentParser(
        prog="ptune-rt bench --suite mixed-tasks",
        description="Serving several prompt- / prefix- / LoRA-tuned tasks in one batch: ptune-rt's mixed batch vs HF "
                    "PEFT (task by task; LoRA: PEFT's adapter_names batch), on a Llama-like model with random "
                    "weights (throughput, ops, equality).")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per variant, >= {MIN_REPEATS} (median reported; default "
                        f"{MODES['default']['repeats']}, --full {MODES['full']['repeats']}, --quick "
                        f"{MODES['quick']['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (default 1)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default {MODES['default']['methods']}; "
                        "--full and --quick: all)")
    add_common_arguments(p, max_wait=1800.0, full=FULL_HELP, plan=True)
    return p


def parse(argv) -> argparse.Namespace:
    """The options of ``argv`` with the run mode's settings (:data:`MODES`) filled in; ``.mode`` says which."""
    from ptune_rt.bench.common import resolve_mode

    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODES)
    return args


def chosen_methods(args) -> list:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"ptune-rt bench --suite mixed-tasks: --methods must name some of {METHODS}, got {args.methods!r}")
    return methods


def run(args, command_argv) -> dict:
    import torch

    from ptune_rt.bench.common import provenance, wait_for_quiet
    from ptune_rt.bench.workload import build_base, default_device

    methods = chosen_methods(args)
    if args.repeats < MIN_REPEATS:
        raise SystemExit(f"ptune-rt bench --suite mixed-tasks: --repeats must be >= {MIN_REPEATS} (a median of at "
                         f"least {MIN_REPEATS} runs), got {args.repeats}")
    if args.warmup < 0:
        raise SystemExit(f"ptune-rt bench --suite mixed-tasks: --warmup must be >= 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = MixedWorkload.quick() if args.quick else MixedWorkload.default()
    waited = None
    if args.wait_for_load is not None and device.type == "cpu":
        waited = wait_for_quiet(args.wait_for_load, args.max_wait)
    results: dict = {"schema": "ptune-rt-bench-mixed-tasks/1", "provenance": provenance(device, command_argv),
                     "workload": wl.to_dict(), "mode": args.mode, "methods": methods,
                     "repeats": args.repeats, "warmup": args.warmup}
    if waited is not None:
        results["provenance"]["wait_for_load"] = waited
    t0 = time.perf_counter()
    plan = make_plan(methods, args.repeats, args.warmup, args.quick).start(disable=args.no_progress)
    try:
        plan.begin("build")
        base = build_base(wl.model_workload(), device)
        setups = {m: build(wl, m, base, device) for m in methods}
        plan.advance()
        results["equality"], results["ops"] = {}, {}
        for m, s in setups.items():
            plan.begin(f"equality_{m}")
            results["equality"][m] = equality(s, wl)
            plan.advance()
            plan.begin(f"ops_{m}")
            results["ops"][m] = op_counts(s, wl)
            plan.advance()
        results["speed"] = speed(setups, base, wl, args.repeats, args.warmup, device, plan)
    finally:
        plan.close()
    results["provenance"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["provenance"]["wall_time_s"] = time.perf_counter() - t0
    results["plan"] = plan.summary()
    results["targets"] = evaluate_targets(results)
    return results


def main(argv=None, command_argv=None) -> int:
    from ptune_rt.bench.report import write_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from ptune_rt.bench.common import default_out_dir
    from ptune_rt.bench.report import finished_line

    command_argv = list(command_argv) if command_argv is not None else ["--suite", "mixed-tasks"] + argv
    out_dir = args.out or default_out_dir()
    if args.dry_run:
        methods = chosen_methods(args)
        print(f"ptune-rt bench --suite mixed-tasks, mode {args.mode}: methods {', '.join(methods)}, {args.repeats} "
              f"timed rounds, warm-up {args.warmup}; would write to {out_dir}\n")
        print("\n".join(make_plan(methods, args.repeats, args.warmup, args.quick).table()))
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT's prompt tuning drops the position ids generate passes (its documented behaviour)
        warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
        results = run(args, command_argv)
    paths = write_outputs(results, Path(out_dir), file_stem(results), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"ptune-rt bench --suite mixed-tasks: {finished_line(results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
