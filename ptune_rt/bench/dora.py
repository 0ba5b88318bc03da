"""``ptune-rt bench --suite dora``: ptune-rt's DoRA against HF PEFT's ``LoraConfig(use_dora=True)``.

The Llama-like model of the other suites (random weights from a ``LlamaConfig``), DoRA on all seven
projections, built twice from the same frozen copy: PEFT's ``get_peft_model`` and
``ptune_rt.apply(model, LoRAConfig(use_dora=True))``. PEFT's ``lora_A`` / ``lora_B`` /
``lora_magnitude_vector`` are set (``lora_B`` non-zero, the magnitudes moved off the initial norms so
``m / ||W + s B A||`` is not 1) and copied into the ptune-rt model by name.

* ``train``: ``zero_grad`` + forward + loss + backward + ``AdamW.step()``, both models timed round-robin
  (interleaved), the ratio PEFT / ptune-rt with its paired-bootstrap 95% interval; target > 1.0.
* ``forward_nograd``: an eval-mode forward under ``torch.no_grad()``, timed the same way.
* Memory, exact and device-independent: every tensor one forward + backward allocates, recorded by a
  ``TorchDispatchMode`` (each op's outputs that share no storage with its inputs). PEFT materializes
  ``B A`` and ``W + s B A`` (N x K) in every DoRA layer's forward to take the row norms; ptune-rt's op
  (:mod:`ptune_rt.ops.dora_linear`) computes them by expansion. Reported: allocations of the size of a
  target's weight (N x K elements), their bytes, the largest allocation, and the bytes autograd saves
  for backward; on CUDA also the peak allocated memory of a training step.
* Equality: logits and the gradients of A, B and the magnitude, ptune-rt and PEFT in fp32 against
  PEFT in float64, by the tolerance rule of :mod:`ptune_rt.testing.tolerances`.

Writes ``dora_<device>.json`` (all numbers plus provenance), ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

import ptune_rt
from ptune_rt.bench.common import add_common_arguments, default_out_dir, provenance, resolve_mode, wait_for_quiet
from ptune_rt.bench.memory import _Where, saved_for_backward
from ptune_rt.bench.report import (VERDICT_RULE, bar_groups, ci_cell, commit_label, judge, load_label, mode_label,
                                   peak_load, suite_stem, write_outputs)
from ptune_rt.bench.timing import Plan, QuietGate, interleaved, summarize
from ptune_rt.bench.workload import Workload, _random_adapter, build_base, check_same_adapters, default_device
from ptune_rt.testing.tolerances import error_report

VARIANTS = ("peft", "ptune-rt")
LABELS = {"peft": "HF PEFT DoRA", "ptune-rt": "ptune-rt DoRA"}
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")
#: Each run mode's settings where the command line gives none: --quick a smoke test (seconds), the
#: default about a minute on 2 CPU cores, --full the committed run.
MODE_SETTINGS = {"quick": {"repeats": 3}, "default": {"repeats": 8},
                 "full": {"repeats": 31, "wait_for_load": 1.0, "max_wait": 300.0, "quiet_gate": 0.8,
                          "gate_max_wait": 5.0}}
#: Seconds per call on a quiet 2-core CPU (default shapes; --quick about a tenth), for the ETA.
PRIORS_S = {"build": 6.0, "equality": 10.0, "memory": 5.0, "train": 0.5, "forward": 0.2}


@dataclasses.dataclass(frozen=True)
class DoRAWorkload(Workload):
    """The benchmark model with DoRA on every projection; 192 tokens a step (no activation then has
    the element count of a target's weight, see :func:`check_shapes`)."""

    batch: int = 2
    seq: int = 96
    lr: float = 1e-4
    #: magnitudes are the initial row norms times a factor drawn from [1 - jitter, 1 + jitter]
    magnitude_jitter: float = 0.2


def check_shapes(wl: DoRAWorkload) -> None:
    """Refuse a batch whose activations could have a target weight's element count (they would be
    counted as N x K temporaries)."""
    weights = {n * k for _, k, n in wl.linear_shapes()}
    tokens = wl.batch * wl.seq
    dims = {k for _, k, n in wl.linear_shapes()} | {n for _, k, n in wl.linear_shapes()} | {wl.vocab, 1}
    acts = {tokens * d for d in dims} | {wl.batch * h * wl.seq * wl.seq for h in (wl.heads, wl.kv_heads, 1)}
    clash = weights & acts
    if clash:
        raise ValueError(f"dora bench: batch {wl.batch} x seq {wl.seq} gives activations of {sorted(clash)} "
                         "elements, a target weight's count; choose another batch or sequence length")


@dataclasses.dataclass
class Variant:
    name: str
    model: object
    optimizer: object
    input_ids: object

    def loss(self):
        return self.model(input_ids=self.input_ids, labels=self.input_ids).loss

    def step(self):
        """One training step: zero_grad, forward + loss, backward, AdamW step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def forward(self):
        with torch.no_grad():
            return self.model(input_ids=self.input_ids).logits


def set_adapters(wl: DoRAWorkload, peft_model, device) -> None:
    """Non-zero A and B (the other suites' random adapter) and magnitudes off their initial norms."""
    layers = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_magnitude_vector")}
    weights = _random_adapter(wl, {n: (m.in_features, m.out_features) for n, m in layers.items()}, device)
    g = torch.Generator().manual_seed(wl.seed + 5)
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A["default"].weight.copy_(weights[name][0])
            m.lora_B["default"].weight.copy_(weights[name][1])
            mag = m.lora_magnitude_vector["default"].weight
            mag.mul_((1 - wl.magnitude_jitter + 2 * wl.magnitude_jitter * torch.rand(mag.shape, generator=g))
                     .to(mag.device))


def copy_adapters(peft_model, ptune_model) -> int:
    """PEFT's A, B and magnitudes into the ptune-rt model, by name; returns how many tensors."""
    src = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ptune_model.named_parameters():
            if p.requires_grad:
                p.copy_(src[n])
    return len(src)


def build(wl: DoRAWorkload, device) -> dict:
    """The two models on identical weights, each with its AdamW and the same batch."""
    from peft import LoraConfig, get_peft_model
    base = build_base(wl, device)
    targets = list(wl.targets)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=wl.r, lora_alpha=wl.alpha, lora_dropout=0.0, target_modules=targets, bias="none", use_dora=True))
    ptune_model = ptune_rt.apply(copy.deepcopy(base), ptune_rt.LoRAConfig(
        r=wl.r, alpha=wl.alpha, target_modules=targets, use_dora=True))
    del base
    set_adapters(wl, peft_model, device)
    copy_adapters(peft_model, ptune_model)
    check_same_adapters(peft_model, ptune_model)
    ids = torch.randint(0, wl.vocab, (wl.batch, wl.seq), generator=torch.Generator().manual_seed(wl.seed + 2))
    out = {}
    for name, m in (("peft", peft_model), ("ptune-rt", ptune_model)):
        m.train()  # no dropout anywhere: train mode changes nothing numerically
        params = [p for p in m.parameters() if p.requires_grad]
        out[name] = Variant(name, m, torch.optim.AdamW(params, lr=wl.lr), ids.to(device))
    return out


def _grads_by_kind(model) -> dict:
    """Every adapter gradient, float64, concatenated per kind (A, B, magnitude) in name order."""
    out = {}
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for kind in ADAPTER_TENSORS:
        out[kind] = torch.cat([p.grad.double().flatten() for n, p in named if f".{kind}." in n])
    return out


def equality(variants: dict) -> dict:
    """Logits and adapter gradients of one forward + backward on the same batch, ptune-rt and PEFT in
    fp32 against PEFT in float64. No optimizer step is taken."""
    peft = variants["peft"]
    runs = {"peft": peft.model, "ptune-rt": variants["ptune-rt"].model, "fp64": copy.deepcopy(peft.model).double()}
    logits, grads = {}, {}
    for key, m in runs.items():
        m.zero_grad(set_to_none=True)
        out = m(input_ids=peft.input_ids, labels=peft.input_ids)
        out.loss.backward()
        logits[key] = out.logits.detach().double()
        grads[key] = _grads_by_kind(m)
        m.zero_grad(set_to_none=True)
    del runs
    checks = {"logits": error_report(logits["ptune-rt"], logits["peft"], logits["fp64"], torch.float32)}
    for kind in ADAPTER_TENSORS:
        checks[f"grad_{kind}"] = error_report(grads["ptune-rt"][kind], grads["peft"][kind], grads["fp64"][kind],
                                              torch.float32)
    for key, c in checks.items():
        c["ok"] = bool(c["ok"])
    return {"checks": checks, "passed": all(c["ok"] for c in checks.values()),
            "rule": "max|ptune-rt - fp64| <= 2 * max|PEFT fp32 - fp64| + 1e-5 * max(1, max|fp64|) (float32)"}


def _storage_ptrs(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


class AllocationLog:
    """Every tensor allocated while :attr:`mode` is active: the op, the shape, the bytes, and whether
    it ran inside a DoRA linear's forward. An output counts as allocated when it shares no storage
    with the op's inputs (views, in-place and ``out=`` ops allocate nothing)."""

    def __init__(self, model):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        self.where = _Where(model)
        self.records: list = []
        rec, where = self.records, self.where

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = _storage_ptrs(tree_flatten((args, kwargs))[0])
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs:
                        rec.append((func.overloadpacket.__name__, tuple(t.shape), t.numel(),
                                    t.numel() * t.element_size(), where.depth > 0))
                        inputs.add(t.untyped_storage().data_ptr())
                return out

        self.mode = Mode()

    def result(self, weight_numels: set, weight_itemsize: int) -> dict:
        """Counts and bytes of the allocations with a target weight's element count (N x K), the
        largest allocation of the step and of the DoRA layers' forwards."""
        nk = [r for r in self.records if r[2] in weight_numels]
        by_op = Counter(f"{op} -> {'x'.join(map(str, shape))}" for op, shape, *_ in nk)
        in_dora = [r for r in self.records if r[4]] or [("none", (), 0, 0, True)]
        largest = {key: dict(zip(("op", "shape", "numel", "bytes"), max(rs, key=lambda r: r[3])[:4]))
                   for key, rs in (("step", self.records), ("dora_forward", in_dora))}
        weight_bytes = max(weight_numels) * weight_itemsize
        return {"allocations": len(self.records), "allocated_bytes": sum(r[3] for r in self.records),
                "nk_allocations": len(nk), "nk_bytes": sum(r[3] for r in nk),
                "nk_allocations_by_op_and_shape": dict(by_op.most_common()),
                "largest_target_weight_bytes": weight_bytes, "largest_allocation": largest,
                "largest_in_dora_forward_over_largest_weight": largest["dora_forward"]["bytes"] / weight_bytes}


def memory(v: Variant, wl: DoRAWorkload, device) -> dict:
    """Allocations of one forward + backward (:class:`AllocationLog`), the activation bytes autograd
    saves (:func:`ptune_rt.bench.memory.saved_for_backward`), on CUDA the peak of a training step."""
    v.optimizer.zero_grad(set_to_none=True)
    log = AllocationLog(v.model)
    try:
        with log.mode:
            v.loss().backward()
    finally:
        log.where.remove()
    out = log.result({n * k for _, k, n in wl.linear_shapes()}, wl.torch_dtype.itemsize)
    v.optimizer.zero_grad(set_to_none=True)
    saved = saved_for_backward(v.model, lambda: v.loss().backward())
    v.optimizer.zero_grad(set_to_none=True)
    out.update({"activation_bytes": saved["activation_bytes"],
                "activation_bytes_in_dora_linears": saved["activation_bytes_in_lora_linears"],
                "saved_tensor_count": saved["saved_tensor_count"]})
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        v.step()
        torch.cuda.synchronize(device)
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_above_start_bytes"] = out["cuda_peak_allocated_bytes"] - before
    return out


def speed(variants: dict, case: str, args, device, plan, gate=None) -> dict:
    """One case timed interleaved, summarized as PEFT / ptune-rt with its 95% interval."""
    fns = {n: (v.step if case == "train" else v.forward) for n, v in variants.items()}
    cpu: dict = {}
    plan.begin(case)
    times = interleaved(fns, args.repeats, args.warmup, device, tick=plan.ticker(1, len(fns) * args.warmup),
                        cpu_times=cpu, gate=gate)
    return summarize(times, "peft", "ptune-rt", cpu_times=cpu)


def targets(res: dict, rounds: int) -> list:
    rows = []
    for case, label in (("train", "training step"), ("forward_nograd", "no-grad forward")):
        sp = res["speed"][case]
        rows.append({"target": f"{label}, PEFT / ptune-rt time", "value": sp["speedup"], "goal": "> 1.0x",
                     **judge(sp["speedup"], 1.0, True, sp.get("speedup_ci95"), rounds)})
    n = res["memory"]["ptune-rt"]["nk_allocations"]
    rows.append({"target": "N x K allocations per step, ptune-rt", "value": n, "goal": "0", **judge(n, 0, False)})
    return rows


def make_plan(args):
    scale = 0.1 if args.quick else 1.0
    plan = Plan()
    plan.add("build", 1, PRIORS_S["build"] * scale, "building PEFT and ptune-rt DoRA models")
    plan.add("equality", 1, PRIORS_S["equality"] * scale, "equality against float64")
    plan.add("memory", 2, PRIORS_S["memory"] * scale, "allocations and saved bytes")
    for case in ("train", "forward"):
        plan.add(case, 2 * (args.repeats + args.warmup), PRIORS_S[case] * scale, f"timing {case}")
    return plan


def run(args, command_argv) -> dict:
    if args.repeats < 2 or args.warmup < 0:
        raise SystemExit("ptune-rt bench --suite dora: --repeats must be >= 2 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = DoRAWorkload.quick() if args.quick else DoRAWorkload.default()
    check_shapes(wl)
    waited = None
    if args.wait_for_load is not None and device.type == "cpu" and hasattr(os, "getloadavg"):
        waited = wait_for_quiet(args.wait_for_load, args.max_wait)
    results: dict = {"schema": "ptune-rt-bench-dora/1", "provenance": provenance(device, command_argv),
                     "workload": wl.to_dict(), "mode": args.mode, "repeats": args.repeats, "warmup": args.warmup,
                     "variants": dict(LABELS)}
    if waited is not None:
        results["provenance"]["wait_for_load"] = waited
    gate = None
    if args.quiet_gate is not None and device.type == "cpu":
        gate = QuietGate(args.quiet_gate, args.gate_max_wait)
    plan = make_plan(args).start(disable=args.no_progress)
    try:
        plan.begin("build")
        variants = build(wl, device)
        results["backends"] = sorted({row["backend"] for row in ptune_rt.report(variants["ptune-rt"].model)})
        plan.advance()
        plan.begin("equality")
        results["equality"] = equality(variants)
        plan.advance()
        plan.begin("memory")
        results["memory"] = {}
        for n, v in variants.items():
            results["memory"][n] = memory(v, wl, device)
            plan.advance()
        results["speed"] = {"train": speed(variants, "train", args, device, plan, gate)}
        for v in variants.values():
            v.model.eval()
        results["speed"]["forward_nograd"] = speed(variants, "forward", args, device, plan, gate)
    finally:
        plan.close()
    results["plan"] = plan.summary()
    pv = results["provenance"]
    pv["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    pv["wall_time_s"] = plan.wall_s()
    if gate is not None:
        pv["quiet_gate"] = gate.summary()
    results["targets"] = targets(results, args.repeats)
    return results


def file_stem(results: dict) -> str:
    return suite_stem(results, "dora")


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def _alloc(m: dict, where: str) -> str:
    a = m["largest_allocation"][where]
    return f"`{a['op']}` {'x'.join(map(str, a['shape']))} ({_mib(a['bytes'])} MiB)"


def markdown(results: dict) -> str:
    pv, wl, v = results["provenance"], results["workload"], results["provenance"]["versions"]
    out = [f"# ptune-rt DoRA benchmark: ptune-rt vs HF PEFT `use_dora=True` ({pv['device']}, {wl['dtype']})", "",
           f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, "
           f"{load_label(pv)}); torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; commit "
           f"{commit_label(pv)}; {mode_label(results)}; {results['repeats']} interleaved rounds per case after "
           f"{results['warmup']} warm-up; ptune-rt backend {', '.join(results['backends'])}; command "
           f"`{pv['command']}`.", "",
           f"Model: Llama-like, hidden {wl['hidden']}, intermediate {wl['intermediate']}, {wl['layers']} layers, "
           f"{wl['heads']} heads / {wl['kv_heads']} KV heads, vocab {wl['vocab']}, random weights; DoRA r={wl['r']}, "
           f"alpha={wl['alpha']:g} on {', '.join(wl['targets'])} ({wl['n_lora_linears']} layers); batch "
           f"{wl['batch']} x seq {wl['seq']}, causal-LM loss, AdamW(lr={wl['lr']:g}), no dropout. Both models hold "
           "the same weights: PEFT's A, B (non-zero) and magnitudes (moved off the initial norms) copied into "
           "ptune-rt's by name.", ""]
    cpus = pv.get("cpu_count") or 1
    if pv["device"].startswith("cpu") and peak_load(pv) > 0.5 * cpus:
        out += [f"> Note: this machine was shared: the 1-minute load average reached {peak_load(pv):.1f} on {cpus} "
                "CPUs during the run, so the timings are noisy (interleaved rounds, medians and paired intervals, "
                "but treat small ratios with care). The memory and equality figures are exact and unaffected.", ""]
    qg = pv.get("quiet_gate")
    if qg:
        out += [f"Quiet gate: before each of the {qg['rounds']} timed rounds the run waited (up to "
                f"{qg['max_wait_s']:g} s) for the CPUs to be at least {qg['min_idle']:.0%} idle over one second; "
                f"{qg['rounds_quiet']} rounds started quiet, {qg['total_wait_s']:.0f} s spent waiting.", ""]
    out += ["## Targets", "", "| Target | value | goal | 95% interval | result |", "|---|---:|---|---:|---|"]
    for t in results["targets"]:
        val = f"{t['value']:.3f}x" if isinstance(t["value"], float) else str(t["value"])
        out.append(f"| {t['target']} | {val} | {t['goal']} | {ci_cell(t, 'ci95', 3)} | {t['verdict']} |")
    out += ["", VERDICT_RULE, "", "## Speed", "",
            "| Case | PEFT median ms | ptune-rt median ms | PEFT / ptune-rt | 95% interval | fastest runs | CPU time |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for case, sp in results["speed"].items():
        p, o = sp["variants"]["peft"], sp["variants"]["ptune-rt"]
        cpu = sp.get("speedup_cpu_time")
        out.append(f"| {case} | {p['median_s'] * 1e3:.1f} | {o['median_s'] * 1e3:.1f} | **{sp['speedup']:.3f}x** | "
                   f"{ci_cell(sp, digits=3)} | {sp['speedup_of_minima']:.3f}x | {f'{cpu:.3f}x' if cpu else '–'} |")
    out += ["", "*train*: `zero_grad` + forward + loss + backward + `AdamW.step()`; *forward_nograd*: eval mode, "
            "`torch.no_grad()`. Above 1: ptune-rt is faster. ptune-rt caches the norm while W, A and B are "
            "unchanged, so repeated no-grad forwards of fixed weights skip it; PEFT recomputes it every forward "
            "(its `ENABLE_DORA_CACHING` is off by default). Every training step changes A and B, so there both "
            "compute it every step.", "", "## Memory (one forward + backward)", ""]
    mem = results["memory"]
    rows = [("allocations of a target weight's size (N x K elements)", lambda m: str(m["nk_allocations"])),
            ("their bytes, MiB", lambda m: _mib(m["nk_bytes"])),
            ("largest allocation in a DoRA layer's forward", lambda m: f"{_alloc(m, 'dora_forward')}, "
             f"{m['largest_in_dora_forward_over_largest_weight']:.2f}x the largest target weight"),
            ("largest allocation of the step", lambda m: _alloc(m, "step")),
            ("all allocations: count, MiB", lambda m: f"{m['allocations']}, {_mib(m['allocated_bytes'])}"),
            ("activations saved for backward, MiB", lambda m: _mib(m["activation_bytes"])),
            ("... of which inside DoRA layers, MiB", lambda m: _mib(m["activation_bytes_in_dora_linears"]))]
    if "cuda_peak_allocated_bytes" in mem["peft"]:
        rows.append(("CUDA peak allocated in a training step, MiB", lambda m: _mib(m["cuda_peak_allocated_bytes"])))
    out += ["| Measure | HF PEFT DoRA | ptune-rt DoRA |", "|---|---:|---:|"]
    out += [f"| {label} | {f(mem['peft'])} | {f(mem['ptune-rt'])} |" for label, f in rows]
    nk = mem["peft"]["nk_allocations_by_op_and_shape"]
    out += ["", "Allocations: outputs of every op dispatched during one forward + backward "
            "(`TorchDispatchMode`) that share no storage with the op's inputs; the batch is chosen so no "
            "activation has a target weight's element count. PEFT's N x K allocations by op and shape: "
            + (", ".join(f"`{k}` {c}" for k, c in nk.items()) or "none") + ". ptune-rt allocates none, so no "
            "N x K temporary can be alive at the peak. Saved activations: unique storages autograd keeps for "
            "backward (`saved_tensors_hooks`, parameters excluded).", "", "## Equality", ""]
    eq = results["equality"]
    out += ["| Tensor | ptune-rt error to fp64 | PEFT fp32 error to fp64 | bound | within |", "|---|---:|---:|---:|---|"]
    out += [f"| {k} | {c['err']:.2e} | {c['ref_err']:.2e} | {c['bound']:.2e} | {c['ok']} |"
            for k, c in eq["checks"].items()]
    out += ["", f"Rule: {eq['rule']}. **Equality check {'passed' if eq['passed'] else 'FAILED'}.**", ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    pv = results["provenance"]
    fig.suptitle(f"DoRA: ptune-rt vs HF PEFT ({pv['device']}, {results['workload']['dtype']}, {results['mode']})")
    cases = list(results["speed"])
    vals = [results["speed"][c]["speedup"] for c in cases]
    cis = [results["speed"][c].get("speedup_ci95") or [v, v] for c, v in zip(cases, vals)]
    ax1.bar(cases, vals, yerr=[[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]],
            capsize=4, color="tab:blue")
    ax1.axhline(1.0, color="black", lw=0.8, ls="--")
    ax1.set_ylabel("PEFT time / ptune-rt time (95% CI)")
    ax1.set_title("Speed (above 1: ptune-rt faster)")
    mem = results["memory"]
    colors = {"peft": "tab:orange", "ptune-rt": "tab:blue"}
    bar_groups(ax2, ["N x K allocations", "their MiB"],
               [([mem[n]["nk_allocations"], mem[n]["nk_bytes"] / 2**20], LABELS[n], colors[n]) for n in VARIANTS],
               "count / MiB per forward + backward", "Weight-sized temporaries")
    bar_groups(ax3, ["activations saved"], [([mem[n]["activation_bytes"] / 2**20], LABELS[n], colors[n])
                                            for n in VARIANTS], "MiB", "Saved for backward")
    for ax in (ax2, ax3):
        for bars in ax.containers:
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptune-rt bench --suite dora",
        description="ptune-rt DoRA vs HF PEFT DoRA (use_dora=True) on the Llama-like benchmark model (random "
                    "weights): training-step and no-grad forward times with intervals, the N x K temporaries and "
                    "saved activations of a step, equality against float64.")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per case (median; default {MODE_SETTINGS['default']['repeats']}, --quick "
                        f"{MODE_SETTINGS['quick']['repeats']}, --full {MODE_SETTINGS['full']['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)")
    p.add_argument("--quiet-gate", type=float, default=None, metavar="IDLE",
                   help="CPU runs: before every timed round wait (up to --gate-max-wait s) until the CPUs were at "
                        "least this fraction idle over one second, e.g. 0.8 (Linux; default: off, --full 0.8)")
    p.add_argument("--gate-max-wait", type=float, default=60.0, help="longest wait per round for --quiet-gate (s)")
    add_common_arguments(p, max_wait=300.0, full=f"the committed run: {MODE_SETTINGS['full']['repeats']} rounds, "
                         "waiting for a quieter machine (a few minutes on 2 CPU cores)")
    return p


def main(argv=None, command_argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODE_SETTINGS)
    command_argv = list(command_argv) if command_argv is not None else ["--suite", "dora"] + argv
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        results = run(args, command_argv)
    paths = write_outputs(results, Path(args.out or default_out_dir()), file_stem(results), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
