"""Turn the benchmark results into JSON, a markdown report and a PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

MiB = 2**20


def _ms(s) -> str:
    return "–" if s is None else f"{s * 1e3:.1f}"


def _mib(b) -> str:
    return "–" if b is None else f"{b / MiB:.1f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def ci_cell(d: dict, key: str = "speedup_ci95", digits: int = 2) -> str:
    """The 95% paired-bootstrap interval ``d[key]`` (a speed summary's, or a target row's ``ci95``)
    as a table cell, ``digits`` decimals ("–" when there is none)."""
    ci = d.get(key)
    return f"{ci[0]:.{digits}f}x - {ci[1]:.{digits}f}x" if ci else "–"


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.2f}"
    return f"{int(v)}"


def _sci(v) -> str:
    return "–" if v is None else f"{v:.2e}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def suite_stem(results: dict, suite: str) -> str:
    """Output file stem of a benchmark suite's results: ``<suite>_<device>[_quick]``."""
    dev = results["provenance"]["device"].split(":")[0]
    stem = f"{suite}_{dev}"
    return stem + "_quick" if results.get("mode") == "quick" else stem


def file_stem(results: dict) -> str:
    return suite_stem(results, "lora")


# ----------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------


#: Fewest paired rounds behind a timed PASS / MISS: with n rounds all on one side of the goal a sign test
#: gives p = 2 / 2**n, below 0.05 from 6 rounds on (and a bootstrap over fewer rounds is too narrow).
MIN_ROUNDS_FOR_VERDICT = 6
INCONCLUSIVE = "inconclusive (noise)"
VERDICT_RULE = (f"*Result*: a timed target is PASS only when its whole 95% interval lies on the goal's side, MISS only "
                f"when the whole interval lies on the other side, and {INCONCLUSIVE} otherwise (the goal inside "
                f"the interval, or fewer than {MIN_ROUNDS_FOR_VERDICT} rounds); counts and bytes, which do not vary "
                "from run to run, are judged by their value.")


def verdict(value: float, goal: float, at_least: bool = True, ci95=None, rounds=None,
            labels: tuple = ("PASS", "MISS")) -> str:
    """The verdict on one target, the rule every suite uses.

    ``at_least``: the target is ``value >= goal`` (else ``value <= goal``). An exact measurement (no
    ``ci95`` and no ``rounds``: an op or byte count) is judged by ``value``. A timed one (``rounds``
    paired rounds, ``ci95`` its 95% interval) gets ``labels[0]`` (pass) only when the whole interval
    lies on the goal's side, ``labels[1]`` (miss) only when it lies wholly on the other side, and
    "inconclusive (noise)" otherwise: the goal inside the interval, no interval, or fewer than
    :data:`MIN_ROUNDS_FOR_VERDICT` rounds.
    """
    yes, no = labels
    if ci95 is None and rounds is None:
        return yes if (value >= goal if at_least else value <= goal) else no
    if not ci95 or rounds is None or rounds < MIN_ROUNDS_FOR_VERDICT:
        return INCONCLUSIVE
    lo, hi = ci95
    if at_least:
        return yes if lo >= goal else no if hi < goal else INCONCLUSIVE
    return yes if hi <= goal else no if lo > goal else INCONCLUSIVE


def judge(value: float, goal: float, at_least: bool = True, ci95=None, rounds=None) -> dict:
    """A target row's verdict fields: ``verdict`` (:func:`verdict`), ``pass`` (True, False, or None when
    inconclusive), and the ``ci95`` and ``rounds`` it was judged on."""
    v = verdict(value, goal, at_least, ci95, rounds)
    return {"verdict": v, "pass": True if v == "PASS" else False if v == "MISS" else None,
            "ci95": list(ci95) if ci95 else None, "rounds": rounds}


def verdict_of(t) -> str:
    """The Result cell of a target row ("" for none)."""
    if not t:
        return ""
    return t.get("verdict") or "–"


def verdict_counts(targets: list[dict]) -> str:
    """"2 PASS, 1 MISS, 3 inconclusive (noise)" over a suite's target rows."""
    counts: dict = {}
    for t in targets:
        counts[verdict_of(t)] = counts.get(verdict_of(t), 0) + 1
    order = ["PASS", "MISS", INCONCLUSIVE]
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return ", ".join(f"{counts[k]} {k}" for k in keys)


VERDICT_COLORS = {"PASS": "tab:green", "MISS": "tab:red", INCONCLUSIVE: "tab:gray"}


def _target_cell(results, name_start):
    for t in results.get("targets", []):
        if t["target"].startswith(name_start):
            return t["goal"], verdict_of(t)
    return "", ""


def targets_table(targets: list[dict]) -> list[str]:
    """Markdown lines of the targets table; speed targets carry their 95% bootstrap interval."""
    lines = ["| Target | Measured | 95% interval | Goal | Result |", "|---|---:|---:|---|---|"]
    for t in targets:
        val = f"{t['value']:.3f}x" if t["unit"] == "x" else _num(t["value"])
        lines.append(f"| {t['target']} | {val} | {ci_cell(t, 'ci95', 3)} | {t['goal']} | {verdict_of(t)} |")
    if any(t.get("ci95") for t in targets):
        lines += ["", "*95% interval*: paired bootstrap of the ratio of medians over the interleaved rounds (2000 "
                  "resamples), the spread this machine's run-to-run noise puts around the measured ratio. A goal "
                  "inside it is met or missed by the noise of this run, not by the code. " + VERDICT_RULE]
    return lines


def summary_table(results: dict) -> list[str]:
    sp = results.get("speed", {})
    mem = results.get("memory", {})
    ops = results.get("ops", {})
    fl = results.get("flops", {})
    lines = ["| Measure | base (no adapter) | HF PEFT | ptune-rt | ptune-rt vs PEFT | Target | Result |",
             "|---|---:|---:|---:|---:|---|---|"]

    def speed_row(key, label, target_name):
        d = sp.get(key)
        if not d:
            return
        v = d["variants"]
        goal, res = _target_cell(results, target_name)
        ceiling = d.get("ceiling_speedup_zero_cost_adapter")
        note = f" (ceiling {_x(ceiling)})" if ceiling else ""
        lines.append(f"| {label} | {_ms(_get(v, 'base', 'median_s'))} | {_ms(v['peft']['median_s'])} | "
                     f"{_ms(v['ptune-rt']['median_s'])} | {_x(d['speedup'])}{note} | {goal} | {res} |")

    speed_row("train_dropout0", "Training step, dropout 0 (median ms)", "training step, dropout 0:")
    speed_row("train_dropout0.1", "Training step, dropout 0.1 (median ms)", "training step, dropout 0.1:")
    speed_row("forward_nograd", "No-grad forward (median ms)", "no-grad forward")
    speed_row("generate_per_token", "Greedy generate, per new token (median ms)", "greedy generate")

    for p in ("0", "0.1"):
        d = mem.get(f"dropout{p}")
        if not d:
            continue
        goal, res = _target_cell(results, "activation bytes saved for backward, dropout 0.1") if p == "0.1" else ("", "")
        lines.append(f"| Activations saved for backward, dropout {p} (MiB) | – | "
                     f"{_mib(d['peft']['activation_bytes'])} | {_mib(d['ptune-rt']['activation_bytes'])} | "
                     f"{_x(d['ratio_ptune_over_peft'])} of PEFT | {goal} | {res} |")
        lines.append(f"| &nbsp;&nbsp;of which saved inside LoRA linears, dropout {p} (MiB) | – | "
                     f"{_mib(d['peft']['activation_bytes_in_lora_linears'])} | "
                     f"{_mib(d['ptune-rt']['activation_bytes_in_lora_linears'])} | "
                     f"{_x(d['ratio_in_lora_linears'])} of PEFT |  |  |")
    d = mem.get("dropout0.1") or mem.get("dropout0")
    if d:
        lines.append(f"| Parameters saved by reference (MiB, no extra memory) | – | "
                     f"{_mib(d['peft']['parameter_bytes_by_reference'])} | "
                     f"{_mib(d['ptune-rt']['parameter_bytes_by_reference'])} |  |  |  |")

    f = ops.get("forward", {})
    tf = ops.get("train_forward", {})
    tri = results.get("triton", {})
    if f:
        backend = "/".join(ops.get("ptune_backend", {}))
        peft1 = _num(_get(f, "peft", "per_lora_linear_compute"))
        lines.append(f"| Compute ops per LoRA linear, no-grad forward and decode ({backend} path) | – | {peft1} | "
                     f"{_num(_get(f, 'ptune-rt', 'per_lora_linear_compute'))} |  |  |  |")
    if tf:
        pt = tf.get("ptune-rt", {})
        how = ("top level: the custom op = 1; its contents: "
               f"{_num(pt.get('per_lora_linear_compute_expanded'))}" if pt.get("custom") else
               "eager torch path: a plain autograd.Function, no custom op; torch.compile and the Triton path see "
               "one custom op")
        lines.append(f"| Compute ops per LoRA linear, training forward ({how}) | – | "
                     f"{_num(_get(tf, 'peft', 'per_lora_linear_compute'))} | {_num(pt.get('per_lora_linear_compute'))} "
                     f"|  |  |  |")
    if "compute_ops_per_lora_linear_forward" in tri:
        goal, res = _target_cell(results, "dispatched ops per LoRA linear")
        lines.append(f"| Compute ops per LoRA linear, forward, Triton path (interpreter probe; the op = 2 kernel "
                     f"launches) | – | {_num(_get(f, 'peft', 'per_lora_linear_compute'))} | "
                     f"{_num(tri['compute_ops_per_lora_linear_forward'])} |  | {goal} | {res} |")
    for step, label in (("forward", "no-grad forward"), ("decode_step", "decode step"),
                        ("train_step", "training step (forward + loss + backward)")):
        d = ops.get(step, {})
        if d:
            pt = d.get("ptune-rt", {})
            lines.append(f"| Compute ops per {label}, whole model (ptune-rt: top level / custom op expanded) | "
                         f"{_num(_get(d, 'base', 'compute'))} | {_num(_get(d, 'peft', 'compute'))} | "
                         f"{_num(pt.get('compute'))} / {_num(pt.get('compute_expanded'))} |  |  |  |")
    for key, label in (("train_step", "FLOPs per training step, dropout 0 (measured, GFLOP)"),
                       ("forward", "FLOPs per no-grad forward (measured, GFLOP)")):
        d = fl.get(key)
        if d:
            g = {n: f"{v['total'] / 1e9:.2f}" for n, v in d.items()}
            lines.append(f"| {label} | {g.get('base', '–')} | {g['peft']} | {g['ptune-rt']} |  |  |  |")
    return lines


def _speed_detail(results) -> list[str]:
    sp = results.get("speed", {})
    if not sp:
        return []
    lines = ["| Case | Variant | median ms | min ms | max ms | median CPU ms | runs (ms) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for key, d in sp.items():
        for n, v in d["variants"].items():
            runs = ", ".join(f"{t * 1e3:.1f}" for t in v["runs_s"])
            lines.append(f"| {key} | {n} | {_ms(v['median_s'])} | {_ms(v['min_s'])} | {_ms(v['max_s'])} | "
                         f"{_ms(v.get('cpu_median_s'))} | {runs} |")
    lines.append("")
    lines.append("| Case | ratio of medians (headline) | 95% interval | median of paired ratios | paired min | "
                 "paired max | ratio of fastest runs | ratio of median CPU times |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, d in sp.items():
        lines.append(f"| {key} | {_x(d['speedup'])} | {ci_cell(d)} | {_x(d['speedup_paired_median'])} | "
                     f"{_x(d['speedup_paired_min'])} | {_x(d['speedup_paired_max'])} | {_x(d.get('speedup_of_minima'))} | "
                     f"{_x(d.get('speedup_cpu_time'))} |")
    lines += ["", "All ratios are PEFT / ptune-rt (above 1: ptune-rt faster). *Paired*: per interleaved round. "
              "*Fastest runs*: contention only slows runs down, so the minima are the least disturbed. "
              "*CPU time*: process CPU seconds (all threads) per call, which excludes time spent waiting for a core "
              "but includes threads spinning at barriers."]
    g = sp.get("generate_per_token", {})
    if "same_tokens_ptune_vs_peft" in g:
        lines.append("")
        lines.append(f"Generated tokens identical (ptune-rt vs PEFT): {g['same_tokens_ptune_vs_peft']}; "
                     f"new tokens per variant: {g.get('new_tokens')}.")
    return lines


def _equality(results) -> list[str]:
    e = results.get("equality")
    if not e:
        return []
    return [
        "| Quantity (benchmark model, dropout 0, same weights and inputs) | Value |", "|---|---:|",
        f"| max abs diff of logits, ptune-rt vs PEFT | {_sci(e['logits_max_abs_diff_ptune_vs_peft'])} |",
        f"| max abs logit (scale) | {e['logits_max_abs']:.3f} |",
        f"| max abs change of the logits by the LoRA term (PEFT vs base; the adapter is not a no-op) | "
        f"{_sci(e['lora_effect_max_abs_logit_change'])} |",
        f"| logits: error to float64 PEFT, ptune-rt / PEFT fp32 / allowed bound | {_sci(e['logits_ptune_err_to_fp64'])} / "
        f"{_sci(e['logits_peft_err_to_fp64'])} / {_sci(e['logits_bound'])} |",
        f"| logits within the project's tolerance rule | {e['logits_within_tolerance_rule']} |",
        f"| argmax agreement over all positions | {e['argmax_agreement']:.4f} |",
        f"| loss, PEFT / ptune-rt | {e['loss_peft']:.6f} / {e['loss_ptune']:.6f} |",
        f"| abs loss difference | {_sci(e['loss_abs_diff'])} (within rule: {e['loss_within_tolerance_rule']}) |",
        f"| adapter gradients ({e['adapter_tensors_compared']} tensors): max abs diff ptune-rt vs PEFT / max abs grad | "
        f"{_sci(e['adapter_grad_max_abs_diff_ptune_vs_peft'])} / {_sci(e['adapter_grad_max_abs'])} |",
        f"| adapter gradients: error to float64, ptune-rt / PEFT fp32 / bound (within rule: "
        f"{e['adapter_grads_within_tolerance_rule']}) | {_sci(e['adapter_grad_ptune_err_to_fp64'])} / "
        f"{_sci(e['adapter_grad_peft_err_to_fp64'])} / {_sci(e['adapter_grad_bound'])} |",
    ]


def _memory_detail(results) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return []
    cols = [(k, n) for k in mem for n in ("peft", "ptune-rt")]
    mods: list[str] = []
    for k, n in cols:
        for m in mem[k][n]["activation_bytes_by_module_type"]:
            if m not in mods:
                mods.append(m)
    head = " | ".join(f"{'PEFT' if n == 'peft' else n} {k.replace('dropout', 'p=')}" for k, n in cols)
    lines = [f"| Saved by (innermost module) | {head} |", "|---|" + "---:|" * len(cols)]
    for m in mods:
        vals = " | ".join(_mib(mem[k][n]["activation_bytes_by_module_type"].get(m, 0)) for k, n in cols)
        lines.append(f"| {m} | {vals} |")
    tot = " | ".join(_mib(mem[k][n]["activation_bytes"]) for k, n in cols)
    lines.append(f"| **total activations** | {tot} |")
    par = " | ".join(_mib(mem[k][n]["parameter_bytes_by_reference"]) for k, n in cols)
    lines.append(f"| parameters (by reference, not counted) | {par} |")
    lines += ["", "MiB of unique storages saved for backward in one training step, by the innermost module running "
              "when autograd saved them (*LoRA linear*: anything inside PEFT's `lora.Linear` or ptune-rt's "
              "`LoRALinear`; *LlamaForCausalLM*: the LM-head output and the loss, computed in the top module)."]
    return lines


def _ops_detail(results) -> list[str]:
    ops = results.get("ops")
    if not ops:
        return []
    lines = ["| Step | Variant | all ops | compute ops | ops in LoRA linears (all / compute) | custom ops | "
             "compute ops inside the custom op | compute, custom op expanded |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for step in ("forward", "decode_step", "train_forward", "train_step"):
        for n, d in ops.get(step, {}).items():
            lines.append(f"| {step} | {n} | {d['all']} | {d['compute']} | {d['in_lora_all']} / {d['in_lora_compute']} | "
                         f"{d['custom']} | {d['inside_custom_compute']} | {d['compute_expanded']} |")
    lines += ["", "Ops dispatched per LoRA linear, by name (top level):", ""]
    for step in ("forward", "train_forward"):
        for n, d in ops.get(step, {}).items():
            per = d.get("per_lora_linear_ops") or {}
            if per:
                lines.append(f"- {step}, {n}: " + ", ".join(f"`{k}` x{_num(v)}" for k, v in per.items()))
    lines += ["",
              f"{ops['n_lora_linears']} LoRA linears; ptune-rt backend in this run: {ops.get('ptune_backend')}. "
              "Counted with a `TorchDispatchMode`, i.e. after autograd and after composite ops such as `aten::linear` "
              "are decomposed. *all*: every dispatched op; *compute*: all minus metadata-only ops (views, `detach`, "
              "`_unsafe_view`, a `.to` that returns its input), i.e. ops that launch a kernel in eager mode; "
              "*in LoRA linears*: dispatched while a LoRA module's forward runs (its frozen base linear included); "
              "*custom ops*: `ptune_rt::lora_linear_fwd`, counted once each in the top-level columns; "
              "*inside the custom op*: what its torch-path implementation dispatches (measured by entering it); "
              "*expanded*: the custom op replaced by its contents. In eager mode the torch path runs its BLAS "
              "calls without the custom op (a plain `autograd.Function` when training: the custom op's dispatch "
              "costs more than a small layer's matmuls on CPU); `torch.compile` and the Triton path see the custom "
              "op, which on the Triton path is 2 kernel launches per forward (see the Triton section). *Per LoRA "
              "linear* averages over the LoRA modules whose forward ran; in a training forward a SwiGLU MLP's down "
              "projection runs inside the MLP (`recompute_mlp`) and is left out."]
    return lines


def _triton(results) -> list[str]:
    t = results.get("triton")
    if not t:
        return []
    if "skipped" in t:
        return [f"Skipped: {t['skipped']}."]
    if "error" in t:
        return [f"The Triton-interpreter probe failed: `{' '.join(t['error'])}`."]
    e = t["equality"]
    w = t["workload"]
    return [
        f"Tiny model run by the Triton kernels in Triton's CPU interpreter (`TRITON_INTERPRET=1`, backend "
        f"{t['backends']}): {w['layers']} layer, hidden {w['hidden']}, {w['tokens_per_step']} tokens, r={w['r']}. "
        "Op counts do not depend on the shapes; speed does not mean anything here.",
        "",
        "| Quantity | Value |", "|---|---:|",
        f"| dispatched compute ops per LoRA linear per forward | {_num(t['compute_ops_per_lora_linear_forward'])} |",
        f"| all dispatched ops per LoRA linear per forward (views included) | "
        f"{_num(t['all_ops_per_lora_linear_forward'])} |",
        "| which ops (per LoRA linear per forward) | " + ", ".join(
            f"`{k}` x{_num(v)}" for k, v in t.get("ops_per_lora_linear_forward_by_name", {}).items()) + " |",
        f"| dispatched compute ops per LoRA linear, training forward | "
        f"{_num(t.get('compute_ops_per_lora_linear_train_forward'))} |",
        f"| Triton kernel launches per LoRA linear, forward | {_num(t['kernel_launches_per_lora_linear_forward'])} |",
        f"| Triton kernel launches per LoRA linear, backward (average; 4, or 3 where the input needs no "
        f"gradient) | {_num(t['kernel_launches_per_lora_linear_backward'])} |",
        f"| logits max abs diff vs PEFT (max abs logit) | {_sci(e['logits_max_abs_diff'])} ({e['logits_max_abs']:.3f}) |",
        f"| loss abs diff vs PEFT | {_sci(e['loss_abs_diff'])} |",
        f"| adapter gradient max abs diff vs PEFT (max abs grad) | {_sci(e['adapter_grad_max_abs_diff'])} "
        f"({_sci(e['adapter_grad_max_abs'])}) |",
    ]


def _analytic(results) -> list[str]:
    a = results.get("analytic")
    if not a:
        return []
    sb = a["seven_b"]
    hw = sb["hardware"]
    lines = [f"**Model, not a measurement.** One LoRA linear at 7B-class shapes, {sb['dtype']}, r={sb['r']}, "
             f"on an {hw['name']} ({hw['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16, {hw['hbm_bytes_per_s'] / 1e12:.2f} "
             "TB/s HBM3). Bytes = reads + writes of every kernel with ideal tiling; time bound = sum over the "
             "kernels of max(FLOPs / peak, bytes / bandwidth). *Unfused* = HF PEFT's eager chain with its default "
             "fp32 adapters (base GEMM, cast of x to fp32, dropout copy + mask, A GEMM, B GEMM, scale, cast back, "
             "add; backward: the autograd chain plus the dX accumulation); *fused* = ptune-rt's Triton kernels "
             "(shrink + GEMM with a low-rank epilogue counted at 3xTF32's cost, 6x a bf16 MMA of its size; "
             "backward G, dX GEMM with epilogue, dB, dA; dropout mask regenerated).",
             "",
             "| Shape (M x K -> N) | dropout | pass | kernels unfused / fused | HBM MB unfused | HBM MB fused | "
             "fused / unfused bytes | GFLOP (fused) | bound us unfused | bound us fused | bound speedup | frozen GEMM alone us |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sb["rows"]:
        for pass_ in ("forward", "backward"):
            d = r[pass_]
            u, f = d["unfused"], d["fused"]
            lines.append(f"| {r['shape']} (M={r['M']}) | {r['dropout']:g} | {pass_} | {u['kernels']} / {f['kernels']} | "
                         f"{u['bytes'] / 1e6:.1f} | {f['bytes'] / 1e6:.1f} | {d['bytes_ratio_fused_over_unfused']:.2f} | "
                         f"{f['flops'] / 1e9:.1f} | {u['bound_s'] * 1e6:.1f} | {f['bound_s'] * 1e6:.1f} | "
                         f"{d['bound_speedup_unfused_over_fused']:.2f}x | {d['frozen_gemm_alone_bound_s'] * 1e6:.1f} |")
    bm = a.get("bench_model_fp32")
    if bm:
        n_lin = results["workload"]["n_lora_linears"]
        lines += ["", f"Same model on the benchmark's own {n_lin} linears (fp32, one step, MB): " + "; ".join(
            f"dropout {k.removeprefix('dropout')}: forward {v['forward']['unfused'] / 1e6:.0f} unfused vs "
            f"{v['forward']['fused'] / 1e6:.0f} fused, backward {v['backward']['unfused'] / 1e6:.0f} vs "
            f"{v['backward']['fused'] / 1e6:.0f}" for k, v in bm.items()) + "."]
    return lines


def _flops_detail(results) -> list[str]:
    fl = results.get("flops")
    if not fl:
        return []
    an = fl["analytic_matmul_flops"]
    lines = ["FLOPs measured with `torch.utils.flop_counter.FlopCounterMode`, entering ptune-rt's custom op (its "
             "contents are aten ops) and adding in-place `addmm_` FLOPs, for which FlopCounterMode has no formula: "]
    for key in ("forward", "train_step"):
        for n, v in fl[key].items():
            lines.append(f"- {key}, {n}: {v['total'] / 1e9:.3f} GFLOP (FlopCounterMode {v['flop_counter_mode'] / 1e9:.3f} "
                         f"+ in-place addmm_ {v['extra_inplace_addmm'] / 1e9:.3f})")
    lines.append(f"- analytic: LoRA linears {an['lora_linears_forward'] / 1e9:.3f} GFLOP forward, "
                 f"{an['lora_linears_backward'] / 1e9:.3f} backward; LM head {an['lm_head_forward'] / 1e9:.3f} forward, "
                 f"{an['lm_head_backward_dx'] / 1e9:.3f} backward (dX). {an['note']}.")
    return lines


def finished_line(results: dict) -> str:
    """How long the run took beside the time its plan estimated at the start."""
    from ptune_rt.bench.timing import format_duration

    pl = results.get("plan") or {}
    wall = pl.get("wall_s", results["provenance"].get("wall_time_s"))
    if wall is None:
        return "finished"
    eta = pl.get("eta_at_start_s")
    return f"finished in {format_duration(wall)}" + (
        f" (estimated {format_duration(eta)} at the start)" if eta is not None else "")


def mode_label(results: dict) -> str:
    """The run mode as the reports print it, with the run's duration and the plan's estimate at the start."""
    return f"mode {results['mode']}, {finished_line(results)}"


def commit_label(pv: dict) -> str:
    """A run's commit as reports print it: 12 hex digits, marked when the tree had local changes."""
    return (pv.get("git_commit") or "unknown")[:12] + (" (dirty)" if pv.get("git_dirty") else "")


def load_label(pv: dict) -> str:
    """The 1-minute load averages at the start and end of a run, as reports print them."""
    l0, l1 = pv.get("load_average_at_start"), pv.get("load_average_at_end")
    return f"load average {l0[0]:.2f} at start, {l1[0]:.2f} at end" if l0 and l1 else "load unknown"


def peak_load(pv: dict) -> float:
    """The higher of a run's 1-minute load averages at start and end (0.0 when unknown)."""
    return max([x[0] for x in (pv.get("load_average_at_start"), pv.get("load_average_at_end")) if x] or [0.0])


def markdown(results: dict, title: bool = True) -> str:
    pv = results["provenance"]
    wl = results["workload"]
    v = pv["versions"]
    out = []
    if title:
        out += [f"# ptune-rt LoRA benchmark + equality report ({pv['device']}, {wl['dtype']})", ""]
    commit = commit_label(pv)
    out += [
        f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, "
        f"{load_label(pv)}); torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, peft "
        f"{v['peft']}; commit {commit}; {mode_label(results)}; {results['repeats']} interleaved runs per variant "
        f"after {results['warmup']} warm-up."
        if pv.get("load_average_at_start") and pv.get("load_average_at_end") else
        f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}); torch {v['torch']}, triton {v['triton']}, "
        f"transformers {v['transformers']}, peft {v['peft']}; commit {commit}; {mode_label(results)}.",
        "",
    ]
    if results.get("train_block", 1) > 1:
        out += [f"Training steps in steady state: per round each model ran {results['train_block']} steps in a row; "
                "the first (which pays for the switch from the other model) is untimed, the sample is the mean of "
                "the rest.", ""]
    out += [
        f"Workload: Llama-like model from a `LlamaConfig` with random weights (hidden {wl['hidden']}, intermediate "
        f"{wl['intermediate']}, {wl['layers']} layers, {wl['heads']} heads / {wl['kv_heads']} KV heads, vocab "
        f"{wl['vocab']}), {wl['dtype']}, batch {wl['batch']} x seq {wl['seq']}; LoRA r={wl['r']}, alpha={wl['alpha']:g} "
        f"on {', '.join(wl['targets'])} ({wl['n_lora_linears']} linears), identical non-zero adapter weights in HF PEFT "
        f"and ptune-rt; generate: batch {wl['gen_batch']}, {wl['gen_prompt']}-token prompt, {wl['gen_new_tokens']} new "
        "tokens, greedy.",
        "",
    ]
    qg = pv.get("quiet_gate")
    if qg:
        out += [f"Quiet gate: before each of the {qg['rounds']} timed rounds the run waited (up to "
                f"{qg['max_wait_s']:g} s) for the CPUs to be at least {qg['min_idle']:.0%} idle over one second; "
                f"{qg['rounds_quiet']} rounds started quiet, {qg['total_wait_s']:.0f} s spent waiting.", ""]
    cpus = pv.get("cpu_count") or 1
    top = peak_load(pv)
    if pv["device"].startswith("cpu") and top > 0.5 * cpus:
        out += [f"> Note: the 1-minute load average reached {top:.1f} on {cpus} CPUs during this run: other "
                "processes competed for the cores, so the timings are noisy (the runs are interleaved and medians "
                "reported, but treat small ratios with care).", ""]
    out += summary_table(results)
    out += ["",
            "Speed: median wall time of interleaved runs; *ptune-rt vs PEFT* = PEFT median / ptune-rt median "
            "(above 1: ptune-rt is faster); *ceiling* = PEFT median / base-model median, the ratio an adapter "
            "costing nothing at all would reach. Bytes: unique storages autograd saves for backward during one training "
            "step (`saved_tensors_hooks`); parameters are saved by reference and cost nothing extra, so they are "
            "listed apart and not in the ratio. Ops: see the op-count section; *top level* counts ptune-rt's custom "
            "op `ptune_rt::lora_linear_fwd` once."]
    tg = results.get("targets", [])
    if tg:
        out += ["", "## Targets", ""] + targets_table(tg)
    for head, body in (("Timing detail", _speed_detail(results)), ("Equality", _equality(results)),
                       ("Bytes saved for backward", _memory_detail(results)),
                       ("Op counts", _ops_detail(results)), ("Triton path (interpreter probe)", _triton(results)),
                       ("FLOPs", _flops_detail(results)),
                       ("Analytic HBM traffic and H100 roofline (7B-class shapes)", _analytic(results))):
        if body:
            out += ["", f"## {head}", ""] + body
    return "\n".join(out) + "\n"


def readme_section(results: dict, heading: str = "## Benchmark (CPU, fp32)",
                   results_path: str = "bench/results/lora_cpu") -> str:
    """The README's benchmark section: the summary table and the targets of one run."""
    pv = results["provenance"]
    v = pv["versions"]
    commit = (pv["git_commit"] or "unknown")[:12]
    words, cmd = pv.get("command", "ptune-rt bench").split(), []
    skip = False
    for w in words:  # the run's own command, minus where it wrote and the progress-bar switch
        if skip:
            skip = False
        elif w == "--out":
            skip = True
        elif w != "--no-progress":
            cmd.append(w)
    lines = [heading, "",
             f"HF PEFT vs ptune-rt on the same Llama-like model and weights ({results['workload']['layers']} layers, "
             f"hidden {results['workload']['hidden']}, batch {results['workload']['batch']} x seq "
             f"{results['workload']['seq']}, LoRA r={results['workload']['r']} on all seven projections), "
             f"{pv['device_name']}, {pv['torch_threads']} threads, torch {v['torch']}, transformers {v['transformers']}, "
             f"peft {v['peft']}, commit {commit}, {results['repeats']} interleaved runs per variant. Full report "
             f"(timing detail, equality, op counts, FLOPs, H100 HBM/roofline model): [`{results_path}.md`]"
             f"({results_path}.md), data: [`{results_path}.json`]({results_path}.json), plot: "
             f"[`{results_path}.png`]({results_path}.png). Reproduce with `{' '.join(cmd)}` "
             "(`--quick` for a smoke run).", ""]
    lines += summary_table(results)
    tg = results.get("targets", [])
    if tg:
        lines += [""] + targets_table(tg)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------


def bar_groups(ax, labels: list[str], series: list[tuple], ylabel: str, title: str, fontsize: int = 8) -> None:
    """Side-by-side bars: one group per label, one bar per ``(values, legend label, color)`` in
    ``series`` (PEFT first), with the x labels, axis label, title and legend every plot here uses."""
    xs = list(range(len(labels)))
    width = 0.8 / len(series)
    for k, (values, label, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width=width, label=label, color=color)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


_SPEED_LABELS = {"train_dropout0": "training step, dropout 0:", "train_dropout0.1": "training step, dropout 0.1:",
                 "forward_nograd": "no-grad forward", "generate_per_token": "greedy generate"}


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), dpi=110)
    FigureCanvasAgg(fig)
    axs = fig.subplots(2, 2)
    pv = results["provenance"]
    fig.suptitle(f"ptune-rt vs HF PEFT, LoRA r={results['workload']['r']} ({pv['device']}, "
                 f"{results['workload']['dtype']}, {results['mode']})")

    ax = axs[0][0]
    sp = results.get("speed", {})
    keys = [k for k in ("train_dropout0", "train_dropout0.1", "forward_nograd", "generate_per_token") if k in sp]
    goals = {"train_dropout0": 1.05, "train_dropout0.1": 1.10, "forward_nograd": 1.03, "generate_per_token": 1.10}
    if keys:
        vals = [sp[k]["speedup"] for k in keys]
        lo = [sp[k]["speedup"] - sp[k]["speedup_paired_min"] for k in keys]
        hi = [sp[k]["speedup_paired_max"] - sp[k]["speedup"] for k in keys]
        xs = range(len(keys))
        judged = {t["target"]: verdict_of(t) for t in results.get("targets", [])}
        colors = [next((VERDICT_COLORS.get(v, "tab:gray") for n, v in judged.items() if n.startswith(_SPEED_LABELS[k])),
                       "tab:blue") for k in keys]
        ax.bar(xs, vals, color=colors,
               yerr=[[max(0, v) for v in lo], [max(0, v) for v in hi]], capsize=4)
        ax.scatter(list(xs), [goals[k] for k in keys], marker="_", s=900, color="black", zorder=3, label="target")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
        ax.set_ylabel("speed vs PEFT (PEFT time / ptune-rt time)")
        ax.set_title("Speed ratio (median; bars: paired min-max; green PASS, red MISS, gray inconclusive)")
        ax.legend(loc="lower right", fontsize=8)

    ax = axs[0][1]
    mem = results.get("memory", {})
    if mem:
        labels, lora, rest = [], [], []
        for k, d in mem.items():
            for n in ("peft", "ptune-rt"):
                labels.append(f"{n}\n{k}")
                lora.append(d[n]["activation_bytes_in_lora_linears"] / MiB)
                rest.append(d[n]["activation_bytes_rest_of_model"] / MiB)
        xs = range(len(labels))
        ax.bar(xs, rest, label="rest of the model", color="tab:gray")
        ax.bar(xs, lora, bottom=rest, label="inside LoRA linears", color="tab:blue")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title("Activations saved for backward per training step")
        ax.legend(fontsize=8)

    ax = axs[1][0]
    ops = results.get("ops", {})
    f = ops.get("forward", {})
    if f:
        labels = ["PEFT", "ptune-rt\nno-grad\n(torch path)"]
        vals = [f["peft"]["per_lora_linear_compute"], f["ptune-rt"]["per_lora_linear_compute"]]
        tf = ops.get("train_forward", {}).get("ptune-rt")
        if tf:
            labels += ["ptune-rt\ntraining fwd\n(top level)", "ptune-rt\ntraining fwd\n(expanded)"]
            vals += [tf["per_lora_linear_compute"], tf["per_lora_linear_compute_expanded"]]
        tri = results.get("triton", {})
        if "kernel_launches_per_lora_linear_forward" in tri:
            labels.append("ptune-rt Triton\n(kernel launches)")
            vals.append(tri["kernel_launches_per_lora_linear_forward"])
        ax.bar(range(len(vals)), vals, color="tab:purple")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("per LoRA linear per forward")
        ax.set_title("Compute ops (or kernel launches) per LoRA linear")

    ax = axs[1][1]
    a = results.get("analytic", {}).get("seven_b")
    if a:
        rows = [r for r in a["rows"] if r["dropout"] > 0]
        labels, un, fu = [], [], []
        for r in rows:
            for pass_ in ("forward", "backward"):
                labels.append(f"{r['shape'].split(' ')[1]}\n{'fwd' if pass_ == 'forward' else 'bwd'}")
                un.append(r[pass_]["unfused"]["bound_s"] * 1e6)
                fu.append(r[pass_]["fused"]["bound_s"] * 1e6)
        bar_groups(ax, labels, [(un, "unfused (PEFT chain)", "tab:orange"), (fu, "fused (ptune-rt Triton)", "tab:blue")],
                   "roofline time bound, us",
                   f"MODEL: H100 SXM roofline, 7B shapes, bf16, dropout {rows[0]['dropout']:g}" if rows else "",
                   fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------


def check_finite(obj, where="results") -> None:
    """Raise if any number in ``obj`` is NaN or infinite (JSON would not even hold it)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {where}: {obj}")


def write_outputs(results: dict, out_dir: Path, stem: str, to_markdown, to_plot) -> list[Path]:
    """Check every number is finite, then write ``<stem>.json``, ``.md`` (``to_markdown(results)``)
    and ``.png`` (``to_plot(results, path)``) into ``out_dir``; shared by every benchmark suite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    check_finite(results)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(to_markdown(results), encoding="utf-8")
    to_plot(results, paths[2])
    return paths


def write_all(results: dict, out_dir: Path) -> list[Path]:
    return write_outputs(results, out_dir, file_stem(results), markdown, plot)
