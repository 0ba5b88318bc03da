"""``ptune-rt bench --suite child-tuning``: Child-tuning's optimizer step, ptune-rt's
``ChildTuningAdamW`` against an eager masked AdamW, in modes F and D.

The parameters are the weight and bias tensors of a BERT-like encoder's layers (random values, random
gradients, fp32; no model runs: only the optimizer step is measured). For each mode two copies of
the same tensors step side by side on the same gradients:

* ``eager``: the paper's recipe in plain torch: mode F draws a float Bernoulli(reserve_p) mask per
  tensor, divides it by reserve_p and multiplies the gradient by it; mode D multiplies the gradient by
  a stored bool child mask; then ``torch.optim.AdamW.step()`` (torch's default implementation);
* ``ptune-rt``: ``ChildTuningAdamW.step()``: on CUDA one fused Triton kernel per tensor (F mask drawn
  in the kernel, D child read as packed bits); on CPU its torch path (the eager reference step with
  the mask from torch's generator, or unpacked from the bits).

Timed round-robin (interleaved, rotating order) with paired-bootstrap 95% intervals, the gradients
put back untimed before every step. Besides the times: the analytic bytes each step moves
(``analytic_bytes``), the D mask's memory (packed bits vs a bool tensor vs a float mask), and whether
the entries outside the D child stayed unchanged in each variant after the timed steps (ptune-rt skips
them; eager AdamW still applies weight decay there).

Writes ``child_tuning_<device>.json`` (all numbers plus provenance), ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

from ptune_rt.bench.report import MIN_ROUNDS_FOR_VERDICT

MODES = ("F", "D")
VARIANTS = ("eager", "ptune-rt")
LABELS = {"eager": "eager masked AdamW (grad.mul_(mask) + torch.optim.AdamW)", "ptune-rt": "ptune-rt ChildTuningAdamW"}
MODE_SETTINGS = {"quick": {"repeats": 5}, "default": {"repeats": 15},
                 "full": {"repeats": 31, "wait_for_load": 0.7, "max_wait": 900.0}}
FP32 = 4  # bytes of an fp32 parameter, gradient or moment


@dataclasses.dataclass(frozen=True)
class ChildTuningWorkload:
    """The parameter tensors of ``layers`` BERT-like encoder layers (Q, K, V, O, up and down
    projections with biases, two LayerNorms), Child-tuning's reserve_p and AdamW's settings."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 1
    reserve_p: float = 0.3
    lr: float = 2e-5
    weight_decay: float = 0.01
    seed: int = 0

    @classmethod
    def quick(cls) -> "ChildTuningWorkload":
        return cls(hidden=64, intermediate=256, layers=1)

    def shapes(self) -> list:
        h, i = self.hidden, self.intermediate
        layer = [(h, h), (h,)] * 4 + [(i, h), (i,), (h, i), (h,)] + [(h,), (h,)] * 2
        return layer * self.layers

    def numel(self) -> int:
        import math
        return sum(math.prod(s) for s in self.shapes())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tensors": len(self.shapes()), "parameters": self.numel()}


# ----------------------------------------------------------------------------------------
# analytic bytes
# ----------------------------------------------------------------------------------------

#: Tensor passes of torch's single-tensor AdamW step: mul_ (decay) 2, lerp_ 3, mul_ + addcmul_ 5,
#: sqrt / bias correction / add_ eps 6, addcdiv_ 4.
EAGER_ADAMW_PASSES = 20


def analytic_bytes(n: int) -> dict:
    """Bytes one optimizer step moves over ``n`` fp32 parameters (fp32 state), by variant and mode.

    fused: read p, g, m, v, write p, m, v (7 passes; mode D reads 1 bit more per parameter: an upper
    bound, the entries outside the child are neither read nor written). eager: torch's AdamW passes
    plus the mask: mode F draws a float mask (written), divides it by reserve_p (read + written) and
    multiplies the gradient by it (gradient and mask read, gradient written); mode D reads the bool
    mask and the gradient and writes the gradient."""
    adamw = EAGER_ADAMW_PASSES * FP32 * n
    return {
        "fused_F": 7 * FP32 * n,
        "fused_D": 7 * FP32 * n + (n + 7) // 8,
        "eager_F": adamw + FP32 * n * (1 + 2 + 3),
        "eager_D": adamw + 2 * FP32 * n + n,
        "eager_adamw_only": adamw,
        "what": "bytes per optimizer step over all parameters; fp32 parameters, gradients and moments",
    }


def mask_memory(n: int) -> dict:
    """Bytes a D child mask over ``n`` parameters takes: packed bits, a bool tensor, a float mask."""
    return {"packed_bits": (n + 7) // 8, "bool_tensor": n, "float_mask": FP32 * n}


# ----------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    params: list
    grads: list
    optimizer: object
    premask: object  # the eager variant's gradient masking, None for ptune-rt

    def restore_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad.copy_(g)

    def step(self) -> None:
        if self.premask is not None:
            self.premask()
        self.optimizer.step()


def build(wl: ChildTuningWorkload, mode: str, device) -> tuple[dict, object]:
    """The two variants of ``mode`` on copies of the same tensors and gradients, and the D mask."""
    import torch

    from ptune_rt.methods.child_tuning import ChildMask, ChildTuningAdamW, ChildTuningConfig, pack_bits

    g = torch.Generator().manual_seed(wl.seed)
    values = [torch.randn(s, generator=g) * 0.02 for s in wl.shapes()]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in wl.shapes()]
    child = [torch.rand(s, generator=g) < wl.reserve_p for s in wl.shapes()]
    out, mask = {}, None
    for name in VARIANTS:
        params = [torch.nn.Parameter(v.clone().to(device)) for v in values]
        gs = [x.to(device) for x in grads]
        for p, x in zip(params, gs):
            p.grad = x.clone()
        if name == "eager":
            opt = torch.optim.AdamW(params, lr=wl.lr, weight_decay=wl.weight_decay)
            premask = _eager_mask(params, [c.to(device) for c in child], mode, wl.reserve_p)
        else:
            mask = ChildMask({p: pack_bits(c).to(device) for p, c in zip(params, child)}, wl.reserve_p)
            opt = ChildTuningAdamW(params, ChildTuningConfig(mode=mode, reserve_p=wl.reserve_p), lr=wl.lr,
                                   weight_decay=wl.weight_decay, mask=mask if mode == "D" else None, seed=wl.seed)
            premask = None
        out[name] = Variant(name, params, gs, opt, premask)
    return out, child


def _eager_mask(params, child, mode, reserve_p):
    import torch

    def mask_f():
        for p in params:
            p.grad.mul_(torch.empty_like(p.grad).bernoulli_(reserve_p).div_(reserve_p))

    def mask_d():
        for p, c in zip(params, child):
            p.grad.mul_(c)
    return mask_f if mode == "F" else mask_d


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------


def verdict(ratio: float, ci, rounds: int) -> str:
    from ptune_rt.bench.report import verdict as judge

    return judge(ratio, 1.0, True, ci, rounds, labels=("faster", "slower"))


def speed(variants: dict, repeats: int, warmup: int, device, tick) -> dict:
    import torch

    from ptune_rt.bench.bitfit import median_ci
    from ptune_rt.bench.timing import bootstrap_ratio_ci, interleaved

    cpu: dict = {}
    times = interleaved({n: v.step for n, v in variants.items()}, repeats, warmup, torch.device(device),
                        setup=lambda n: variants[n].restore_grads(), tick=tick, cpu_times=cpu)
    res = {"variants": {}}
    for n, ts in times.items():
        res["variants"][n] = {"median_s": statistics.median(ts), "median_ci95_s": median_ci(ts) if len(ts) > 1 else None,
                              "min_s": min(ts), "max_s": max(ts), "runs_s": ts}
        if cpu.get(n):
            res["variants"][n]["cpu_median_s"] = statistics.median(cpu[n])
    b, c = times["eager"], times["ptune-rt"]
    ratio = statistics.median(b) / statistics.median(c)
    ci = list(bootstrap_ratio_ci(b, c)) if len(b) > 1 else None
    res["ratio"] = {"baseline": "eager", "candidate": "ptune-rt", "ratio": ratio, "ci95": ci,
                    "verdict": verdict(ratio, ci, len(b)), "ratio_paired_median": statistics.median(
                        [x / y for x, y in zip(b, c)])}
    if cpu.get("eager") and cpu.get("ptune-rt"):
        res["ratio"]["ratio_cpu_time"] = statistics.median(cpu["eager"]) / statistics.median(cpu["ptune-rt"])
    return res


def outside_unchanged(variants: dict, child: list, initial: list) -> dict:
    """Per variant: whether every entry outside the D child still holds its initial value."""
    import torch

    return {n: all(torch.equal(p.detach().cpu()[~c], x[~c]) for p, c, x in zip(v.params, child, initial))
            for n, v in variants.items()}


def bench_mode(wl: ChildTuningWorkload, mode: str, device, args, progress) -> dict:
    progress.set_description_str(f"mode {mode}: building")
    variants, child = build(wl, mode, device)
    initial = [p.detach().cpu().clone() for p in variants["eager"].params]
    res = {"mode": mode, "backend": _backend(device)}
    progress.set_description_str(f"mode {mode}: timing")
    res["speed"] = speed(variants, args.repeats, args.warmup, device, lambda: progress.update(1))
    if mode == "D":
        res["outside_child_unchanged"] = outside_unchanged(variants, child, initial)
    return res


def _backend(device) -> str:
    import torch

    from ptune_rt.kernels._triton_utils import interpreting

    if torch.device(device).type == "cuda":
        return "triton (one fused kernel per tensor)"
    return "triton interpreter" if interpreting() else "torch path (CPU without Triton)"


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def file_stem(results: dict) -> str:
    from ptune_rt.bench.report import suite_stem

    return suite_stem(results, "child_tuning")


def _ms(s) -> str:
    return f"{s * 1e3:.2f}"


def markdown(results: dict) -> str:
    from ptune_rt.bench.report import commit_label, load_label

    pv, wl = results["provenance"], results["workload"]
    n = wl["parameters"]
    out = [f"# ptune-rt Child-tuning benchmark: the optimizer step ({pv['device']})", "",
           f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, "
           f"{load_label(pv)}); torch {pv['versions']['torch']}, triton {pv['versions']['triton']}; commit "
           f"{commit_label(pv)}; mode {results['mode']}, {results['repeats']} interleaved rounds after "
           f"{results['warmup']} warm-up; command `{pv['command']}`.", "",
           f"Parameters: {wl['tensors']} tensors of {wl['layers']} BERT-like layer(s) (hidden {wl['hidden']}, "
           f"intermediate {wl['intermediate']}), {n:,} fp32 parameters with random gradients; reserve_p "
           f"{wl['reserve_p']:g}, AdamW lr {wl['lr']:g}, weight decay {wl['weight_decay']:g}.", "",
           "## Step time", "",
           "| Mode | ptune-rt backend | eager, median ms (95% CI) | ptune-rt, median ms (95% CI) | eager / ptune-rt "
           "(95% CI) | verdict | CPU-time ratio |", "|---|---|---:|---:|---:|---|---:|"]
    for mode, d in results["modes"].items():
        sp = d["speed"]
        cells = []
        for v in VARIANTS:
            var = sp["variants"][v]
            ci = var.get("median_ci95_s")
            cells.append(f"{_ms(var['median_s'])} ({_ms(ci[0])}-{_ms(ci[1])})" if ci else _ms(var["median_s"]))
        r = sp["ratio"]
        ci = r.get("ci95")
        rc = f"{r['ratio']:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})" if ci else f"{r['ratio']:.2f}x"
        cpu = r.get("ratio_cpu_time")
        out.append(f"| {mode} | {d['backend']} | {cells[0]} | {cells[1]} | {rc} | {r['verdict']} | "
                   f"{f'{cpu:.2f}x' if cpu else '–'} |")
    out += ["", "*eager / ptune-rt* above 1: ptune-rt's step is faster. The verdict says *faster* or *slower* only "
            f"when the whole 95% paired-bootstrap interval lies on one side of 1.0 (and at least "
            f"{MIN_ROUNDS_FOR_VERDICT} rounds ran), *inconclusive* otherwise. On CPU ptune-rt runs its torch path, "
            "the same step in torch ops: the fused kernel's saving is memory traffic on a GPU (below).", ""]
    ab, mm = results["analytic_bytes"], results["mask_memory"]
    out += ["## Bytes moved per step (analytic)", "",
            "| Mode | fused kernel | eager masked AdamW | eager / fused |", "|---|---:|---:|---:|"]
    for mode in MODES:
        out.append(f"| {mode} | {ab[f'fused_{mode}'] / n:.3f} B/param ({ab[f'fused_{mode}'] / 2**20:.1f} MiB) | "
                   f"{ab[f'eager_{mode}'] / n:.0f} B/param ({ab[f'eager_{mode}'] / 2**20:.1f} MiB) | "
                   f"{ab[f'eager_{mode}'] / ab[f'fused_{mode}']:.2f}x |")
    out += ["", "Fused: read p, g, m, v and write p, m, v (7 fp32 passes) plus 1 bit per parameter in mode D. Eager: "
            f"torch's single-tensor AdamW makes {EAGER_ADAMW_PASSES} passes (decay, lerp, mul + addcmul, sqrt, bias "
            "correction, + eps, addcdiv), plus the mask: F writes a float Bernoulli mask, divides it by reserve_p "
            "and multiplies the gradient by it; D reads a bool mask and rewrites the gradient.", "",
            "## D mask memory", "",
            f"Packed bits {mm['packed_bits']:,} B (1 bit per parameter), a bool tensor {mm['bool_tensor']:,} B "
            f"({mm['bool_tensor'] / mm['packed_bits']:.1f}x), a float mask {mm['float_mask']:,} B "
            f"({mm['float_mask'] / mm['packed_bits']:.1f}x).", ""]
    d = results["modes"].get("D")
    if d:
        oc = d["outside_child_unchanged"]
        out += [f"Entries outside the D child unchanged after the timed steps: ptune-rt {oc['ptune-rt']}, eager "
                f"{oc['eager']} (eager AdamW still applies weight decay to them; ChildTuningAdamW skips them).", ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptune_rt.bench.report import bar_groups

    fig = Figure(figsize=(13, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    fig.suptitle(f"Child-tuning optimizer step ({results['provenance']['device']}, "
                 f"{results['workload']['parameters']:,} parameters, {results['mode']})")
    modes = list(results["modes"])
    colors = {"eager": "tab:orange", "ptune-rt": "tab:blue"}
    for k, v in enumerate(VARIANTS):
        meds, lo, hi = [], [], []
        for m in modes:
            var = results["modes"][m]["speed"]["variants"][v]
            ci = var.get("median_ci95_s") or [var["median_s"]] * 2
            meds.append(var["median_s"] * 1e3)
            lo.append(max(0.0, (var["median_s"] - ci[0]) * 1e3))
            hi.append(max(0.0, (ci[1] - var["median_s"]) * 1e3))
        ax1.bar([x + (k - 0.5) * 0.4 for x in range(len(modes))], meds, width=0.4, yerr=[lo, hi], capsize=3,
                color=colors[v], label=LABELS[v])
    tops = [ci[1] * 1e3 for m in modes for v in VARIANTS
            for ci in [results["modes"][m]["speed"]["variants"][v].get("median_ci95_s")
                       or [0.0, results["modes"][m]["speed"]["variants"][v]["median_s"]]]]
    ax1.set_ylim(0, 1.45 * max(tops or [1.0]))  # room for the legend above the bars
    ax1.set_xticks(range(len(modes)))
    ax1.set_xticklabels([f"mode {m}" for m in modes])
    ax1.set_ylabel("ms per optimizer step (median, 95% CI)")
    ax1.set_title("Step time")
    ax1.legend(fontsize=7)
    ab, n = results["analytic_bytes"], results["workload"]["parameters"]
    bar_groups(ax2, [f"mode {m}" for m in MODES],
               [([ab[f"eager_{m}"] / n for m in MODES], "eager masked AdamW", colors["eager"]),
                ([ab[f"fused_{m}"] / n for m in MODES], "fused kernel", colors["ptune-rt"])],
               "bytes per parameter per step", "Memory traffic (analytic)")
    mm = results["mask_memory"]
    ax3.bar(["packed bits", "bool tensor", "float mask"],
            [mm["packed_bits"] / 2**10, mm["bool_tensor"] / 2**10, mm["float_mask"] / 2**10],
            color=["tab:blue", "tab:orange", "tab:gray"])
    ax3.set_ylabel("KiB")
    ax3.set_title("D mask memory")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ptune_rt.bench.common import add_common_arguments

    p = argparse.ArgumentParser(
        prog="ptune-rt bench --suite child-tuning",
        description="Child-tuning's optimizer step: ptune-rt's ChildTuningAdamW vs an eager masked AdamW "
                    "(grad.mul_(mask) + torch.optim.AdamW) in modes F and D, side by side: step times with "
                    "intervals, analytic bytes moved, D mask memory.")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per mode (default {MODE_SETTINGS['default']['repeats']}, --quick "
                        f"{MODE_SETTINGS['quick']['repeats']}, --full {MODE_SETTINGS['full']['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing (default 1)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    add_common_arguments(p, max_wait=900.0, full="the committed run: 31 rounds, waiting for a quiet machine")
    return p


def run(args, command_argv) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ptune_rt.bench.common import provenance, wait_for_quiet
    from ptune_rt.bench.workload import default_device

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"ptune-rt bench --suite child-tuning: --modes must name some of {MODES}, got {args.modes!r}")
    if args.repeats < 2 or args.warmup < 0:
        raise SystemExit("ptune-rt bench --suite child-tuning: --repeats must be >= 2 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = ChildTuningWorkload.quick() if args.quick else ChildTuningWorkload()
    waited = None
    if args.wait_for_load is not None and device.type == "cpu" and hasattr(os, "getloadavg"):
        waited = wait_for_quiet(args.wait_for_load, args.max_wait)
    results: dict = {"schema": "ptune-rt-bench-child-tuning/1", "provenance": provenance(device, command_argv),
                     "workload": wl.to_dict(), "mode": args.mode, "repeats": args.repeats, "warmup": args.warmup,
                     "variants": dict(LABELS), "analytic_bytes": analytic_bytes(wl.numel()),
                     "mask_memory": mask_memory(wl.numel())}
    if waited is not None:
        results["provenance"]["wait_for_load"] = waited
    t0 = time.perf_counter()
    progress = tqdm(total=len(modes) * len(VARIANTS) * args.repeats, disable=args.no_progress, unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    try:
        results["modes"] = {m: bench_mode(wl, m, device, args, progress) for m in modes}
    finally:
        progress.close()
    results["provenance"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["provenance"]["wall_time_s"] = time.perf_counter() - t0
    results["verdicts"] = [{"mode": m, **{k: d["speed"]["ratio"][k] for k in ("ratio", "ci95", "verdict")}}
                           for m, d in results["modes"].items()]
    return results


def main(argv=None, command_argv=None) -> int:
    from ptune_rt.bench.common import default_out_dir, resolve_mode
    from ptune_rt.bench.report import write_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODE_SETTINGS)
    command_argv = list(command_argv) if command_argv is not None else ["--suite", "child-tuning"] + argv
    results = run(args, command_argv)
    paths = write_outputs(results, Path(args.out or default_out_dir()), file_stem(results), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
