"""gpu-check's report: JSON with provenance, markdown tables and a plot (when matplotlib is there)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ptune_rt.gpu_check import cases as C
from ptune_rt.gpu_check import plan as PL

JSON_NAME, MD_NAME, PNG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.png"
DRY_RUN = "not run: dry run"
GOLD_POLICY = ("Gold: the eager reference in float64 for every case whose float64 run fits in half of the free GPU "
               "memory (on an 80 GB-class GPU, all of them; prefix attention is referenced one KV head at a time, "
               "which is exact and keeps its score matrices at 1/8). A bf16/fp16 case that does not fit takes an "
               "fp32 (IEEE, TF32 off) reference as gold instead, whose own error is ~1000x below half precision's; "
               "fp32 cases always take float64. Each numerics row says which gold it used. float64 costs little "
               "time here: the gold's two big products run at the H100/H200's 67 TFLOP/s fp64 tensor-core rate.")


def _provenance(argv, device: str) -> dict:
    import torch

    from ptune_rt.bench.common import provenance
    from ptune_rt.kernels._triton_utils import fp32_input_precision

    pv = provenance(device, argv)
    pv["command"] = "ptune-rt gpu-check " + " ".join(argv)
    pv["cuda_version"] = torch.version.cuda
    pv["fp32_matmul_precision_outside_numerics"] = fp32_input_precision()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        pv["device_capability"] = f"sm_{props.major}{props.minor}"
        pv["device_memory_gb"] = props.total_memory / 1e9
    return pv


def _hardware(device_name: str) -> dict:
    from ptune_rt.bench.analytic import hardware_for

    hw, note = hardware_for(device_name)
    return {"hardware": hw, "note": note + "; analytic roofline, a model, not a measurement"}


def _base(plan, budget, argv, device: str) -> dict:
    from ptune_rt.testing import TOLERANCES

    pv = _provenance(argv, device)
    return {"tool": "ptune-rt gpu-check", "provenance": pv, "roofline_model": _hardware(pv["device_name"]),
            "gold_policy": GOLD_POLICY,
            "tolerance_rule": {str(d).replace("torch.", ""): {"factor": t.factor, "floor": t.floor}
                               for d, t in TOLERANCES.items()},
            "plan": PL.plan_summary(plan, budget), "numerics": [], "timings": [], "failures": [], "skipped": []}


def start_results(plan, budget, argv, device: str = "cuda") -> dict:
    return _base(plan, budget, argv, device)


def dry_run_results(plan, budget, argv) -> dict:
    from ptune_rt.bench.analytic import H100_SXM, HARDWARE_BY_DEVICE_NAME

    res = _base(plan, budget, argv, "cpu")
    models = ", ".join(f"{hw['name']} when the device name has '{key}'" for key, hw in HARDWARE_BY_DEVICE_NAME)
    res["roofline_model"] = {"hardware": H100_SXM, "note": f"dry run: the model is picked by the GPU's name at run "
                             f"time ({models}; else the H100 SXM model stands in); shown: H100 SXM; analytic "
                             "roofline, a model, not a measurement"}
    res.update(status=DRY_RUN, exit_code=0, sections={s.id: {"est_s": s.est_s, "budget_s": s.budget_s,
                                                             "status": DRY_RUN} for s in plan})
    return res


def _finite(obj):
    """JSON without NaN/inf (an unlimited budget is written as null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_NAME, out / MD_NAME]
    png_note = plot(results, out / PNG_NAME) if results.get("timings") else "no timings in this run: no plot"
    if png_note is None:
        paths.append(out / PNG_NAME)
    results["plot"] = png_note or PNG_NAME
    paths[0].write_text(json.dumps(_finite(results), indent=1, default=str))
    paths[1].write_text(markdown(results))
    return paths


# ----------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------


def _g(x, fmt=".3e") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def summary(res: dict) -> str:
    nums = res.get("numerics", [])
    bad = sum(not n["ok"] for n in nums)
    lines = [f"ptune-rt gpu-check: {res['status']} ({len(nums) - bad} of {len(nums)} numerics cases within the "
             f"tolerance rule, {len(res.get('timings', []))} timing rows, {len(res.get('skipped', []))} cases left "
             f"out by the time budget, {_g(res.get('elapsed_s'), '.0f')} s)"]
    if res.get("failures"):
        lines += ["FAILING:"] + [f"  - {f}" for f in res["failures"]]
    if res.get("skipped"):
        lines += ["LEFT OUT (time budget):"] + [f"  - {s['section']}: {s['case']}" for s in res["skipped"]]
    return "\n".join(lines)


def _header(res: dict) -> list[str]:
    pv, v = res["provenance"], res["provenance"]["versions"]
    commit = (pv.get("git_commit") or "unknown")[:12] + (" (dirty)" if pv.get("git_dirty") else "")
    return [f"# ptune-rt gpu-check: {res['status']}", "",
            f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}); torch {v['torch']} (CUDA "
            f"{pv.get('cuda_version')}), triton {v['triton']}, transformers {v['transformers']}, peft {v['peft']}; "
            f"commit {commit}; `{pv['command']}`.", "",
            f"Roofline: {res['roofline_model']['note']} ({res['roofline_model']['hardware']['peak_flops'] / 1e12:.0f} "
            f"TFLOP/s dense bf16, {res['roofline_model']['hardware']['hbm_bytes_per_s'] / 1e12:.2f} TB/s).", ""]


def _sections_table(res: dict) -> list[str]:
    lines = ["## Time budget per section", "",
             f"Estimated total {res['plan']['estimated_total_s']:.0f} s (start-up {PL.STARTUP_S:.0f} s included) "
             f"by the cost model in `ptune_rt/gpu_check/plan.py` (first run, empty Triton cache); budget "
             f"{_g(res['plan']['budget_s'], '.0f')} s.", "",
             "| section | cases | estimated s | budget s | elapsed s | run | left out | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["plan"]["sections"]:
        got = res.get("sections", {}).get(s["id"], {})
        elapsed = _g(got["elapsed_s"], ".1f") if "elapsed_s" in got else DRY_RUN
        lines.append(f"| {s['title']} | {len(s['cases'])} | {s['est_s']:.1f} | {_g(s['budget_s'], '.1f')} | "
                     f"{elapsed} | {got.get('run', '–')} | "
                     f"{got.get('skipped', '–')} | {got.get('failed', '–')} |")
    return lines + [""]


def _planned_cases(res: dict) -> list[str]:
    lines = ["## Planned cases", "", "| section | case | estimated s | status |", "|---|---|---:|---|"]
    for s in res["plan"]["sections"]:
        for c in s["cases"]:
            modes = f" ({', '.join(c['modes'])})" if c.get("modes") else ""
            lines.append(f"| {s['id']} | {c['id']}{modes} | {c['est_s']:.2f} | {DRY_RUN} |")
    return lines + [""]


def _numerics_table(res: dict) -> list[str]:
    rule = "; ".join(f"{d}: factor {t['factor']:g}, floor {t['floor']:g}" for d, t in res["tolerance_rule"].items())
    lines = ["## Numerics", "",
             "Rule: max|op - gold| <= factor * max|eager - gold| + floor * max(1, max|gold|) (" + rule + "); dA, dB "
             "and the fp32 parameters' gradients of the prefix and prompts follow the rule of their arithmetic. The "
             "dropout case's reference takes the keep-mask the kernels regenerate from the seed (materialized once by "
             "`ptune_rt.kernels._triton_utils.dropout_mask`): a mask that differs between forward and backward fails "
             "dx and dA, and the *dropout rate* row checks the mask drops about p.", "",
             res["gold_policy"], "",
             "| case | gold | output | op error | eager error | bound | within |", "|---|---|---|---:|---:|---:|---|"]
    for n in res["numerics"]:
        if n.get("error"):
            lines.append(f"| {n['case']} | – | – | – | – | – | **ERROR** {n['error']} |")
        for r in n["rows"]:
            ok = "yes" if r["ok"] else "**NO**"
            lines.append(f"| {n['case']} | {n.get('gold', '–')} | {r['output']} | {_g(r.get('err'))} | "
                         f"{_g(r.get('ref_err'))} | {_g(r.get('bound'))} | {ok} |")
    return lines + [""]


def _timings_table(res: dict) -> list[str]:
    lines = ["## Timings", "",
             "`triton.testing.do_bench` (CUDA events, 25 ms warmup, 100 ms of repeats, L2 flushed): median and "
             "0.2-0.8 quantiles. *train* = forward + backward, *forward* = no-grad forward. The bound is the analytic "
             "roofline of the kernels each implementation launches (model, not a measurement); *% of bound* = "
             "bound / median.", "",
             "| case | mode | implementation | median ms | q20 - q80 ms | bound us | % of bound | speed vs PEFT |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for t in res["timings"]:
        if "median_ms" not in t:
            lines.append(f"| {t['case']} | {t['mode']} | {t['impl']} | – | – | – | – | {t.get('note', '')} |")
            continue
        frac = t.get("fraction_of_bound")
        lines.append(f"| {t['case']} | {t['mode']} | {t['impl']} | {t['median_ms']:.4f} | {t['q20_ms']:.4f} - "
                     f"{t['q80_ms']:.4f} | {_g(t.get('bound_us'), '.4g')} | {_g(frac and 100 * frac, '.0f')} | "
                     f"{_g(t.get('speedup_vs_peft'), '.2f')}x |")
    return lines + [""]


def markdown(res: dict) -> str:
    lines = _header(res)
    if res["status"] == DRY_RUN:
        lines += [f"**{DRY_RUN}**: the plan below lists every case the run would check or time.", "",
                  res["gold_policy"], ""]
        lines += _sections_table(res) + _planned_cases(res)
        return "\n".join(lines) + "\n"
    lines += ["## Summary", "", "```", summary(res), "```", ""]
    lines += _sections_table(res) + _numerics_table(res) + _timings_table(res)
    plot_note = res.get("plot", "")
    lines += ["## Plot", "", f"![timings]({PNG_NAME})" if plot_note == PNG_NAME else plot_note, ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------


def plot(res: dict, path: Path) -> Optional[str]:
    """Median times per implementation with the roofline bound; None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the tables above hold every number)"
    groups = [(k, m) for k in C.KINDS for m in ("train", "forward")
              if any(t["kind"] == k and t["mode"] == m and "median_ms" in t for t in res["timings"])]
    fig, axs = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)), squeeze=False)
    colors = {"ptune-rt": "tab:blue", "PEFT": "tab:orange", "eager": "tab:gray"}
    for ax, (kind, mode) in zip(axs[:, 0], groups):
        rows = [t for t in res["timings"] if t["kind"] == kind and t["mode"] == mode and "median_ms" in t]
        cases = list(dict.fromkeys(t["case"] for t in rows))
        for j, impl in enumerate(colors):
            pts = [(cases.index(t["case"]), t) for t in rows if t["impl"] == impl]
            xs = [i + (j - 1) * 0.27 for i, _ in pts]
            ax.bar(xs, [t["median_ms"] for _, t in pts], width=0.27, color=colors[impl], label=impl)
            ax.scatter(xs, [t["bound_us"] / 1e3 if t.get("bound_us") else float("nan") for _, t in pts],
                       marker="_", s=200, color="black", label="roofline bound (model)" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.split(" ", 1)[1] for c in cases], fontsize=7, rotation=15)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{kind}: {mode}", fontsize=9)
        ax.legend(fontsize=7)
    hw = res["roofline_model"]["hardware"]["name"]
    fig.suptitle(f"{res['provenance']['device_name']}: do_bench medians; black: {hw} roofline bound (MODEL, "
                 "not a measurement)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
