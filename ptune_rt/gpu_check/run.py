"""The command line and the section runner: budgets, progress with an ETA, exit codes."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ptune_rt.gpu_check import plan as PL

EXIT_OK, EXIT_FAIL, EXIT_REFUSED, EXIT_INCOMPLETE = 0, 1, 2, 3  # 2: no CUDA, or a bad --out
DEFAULT_OUT = "ptune-rt-gpu-check"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptune-rt gpu-check",
        description="GPU acceptance run: numerics of every fused kernel at 7B-class shapes (bf16/fp16/fp32 vs a "
                    "float64 gold, the project's tolerance rule), timings beside HF PEFT and the eager reference "
                    "with the analytic roofline, a JSON + markdown + plot report. Needs CUDA (exit 2 without); "
                    "exit 1 on any numerics miss or error, 3 when numerics cases were left out by the time budget.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: write the plan (every case, estimated cost) and an empty report, exit 0")
    p.add_argument("--budget-s", type=float, default=PL.DEFAULT_BUDGET_S,
                   help=f"total time budget in seconds (default {PL.DEFAULT_BUDGET_S:g}); 0: no limit")
    p.add_argument("--sections", default="numerics,timing", help="comma-separated: numerics, timing")
    p.add_argument("--subset", choices=("full", "pytest"), default="full",
                   help="'pytest': the smaller case list of `pytest -m gpu`")
    return p


def _refuse_out(out: Path) -> Optional[str]:
    """gpu-check never writes into the checkout's committed bench/results."""
    from ptune_rt.bench.common import find_checkout

    root = find_checkout()
    if root is not None and out.resolve().is_relative_to((root / "bench" / "results").resolve()):
        return f"gpu-check does not write into the committed {root / 'bench' / 'results'}: pass another --out"
    return None


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _say(line: str) -> None:
    print(line, flush=True)


class Progress:
    """Prints one line per case: the run's clock and an ETA (the remaining cases' estimates scaled
    by how the run keeps to its estimates so far, at most the time left in the budget)."""

    def __init__(self, plan, t0: float, log: Callable[[str], None]):
        self.remaining = sum(p.est_s for s in plan for p in s.cases)
        self.end = t0 + sum(s.budget_s for s in plan)
        self.done_est = self.done_real = 0.0
        self.t0, self.log = t0, log
        self.total = sum(len(s.cases) for s in plan)
        self.count = 0

    def case_done(self, section, planned, seconds: float, verdict: str, ran: bool) -> None:
        self.count += 1
        self.remaining -= planned.est_s
        if ran:
            self.done_est += planned.est_s
            self.done_real += seconds
        pace = min(3.0, max(0.3, self.done_real / self.done_est)) if self.done_est else 1.0
        now = time.perf_counter()
        eta = max(0.0, min(self.remaining * pace, self.end - now))
        self.log(f"[{self.count}/{self.total}] {section.id}: {planned.case.id} ... {verdict} ({seconds:.1f} s) | "
                 f"elapsed {_fmt_s(now - self.t0)}, ETA {_fmt_s(eta)}")


def _run_numerics(planned, device, perturb) -> tuple[dict, list]:
    from ptune_rt.gpu_check.cases import describe
    from ptune_rt.gpu_check.numerics import check

    res = {"case": planned.case.id, **describe(planned.case)}
    try:
        res.update(check(planned.case, device, perturb))
    except Exception as err:  # noqa: BLE001 - a crash is a failure of that case, not of the run
        res.update(ok=False, rows=[], error=f"{type(err).__name__}: {err}")
    fails = [f"{res['case']}: {r['output']}: " + r.get("error", f"error {r['err']:.3e} > bound {r['bound']:.3e}")
             for r in res["rows"] if not r["ok"]]
    if "error" in res:
        fails.append(f"{res['case']}: {res['error']}")
    return res, fails


def _run_timing(planned, device, hw) -> tuple[list, list]:
    from ptune_rt.gpu_check.timing import time_case

    try:
        return time_case(planned.case, planned.modes, hw, device), []
    except Exception as err:  # noqa: BLE001
        return [], [f"timing {planned.case.id}: {type(err).__name__}: {err}"]


def _free_memory(device) -> Optional[float]:
    """Release the case's memory; its peak allocation in GB (CUDA only)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def _run_case(section, planned, device, hw, perturb, res: dict) -> list:
    """Run one planned case into ``res``; its failure messages."""
    from ptune_rt.gpu_check.numerics import ieee_fp32

    c0 = time.perf_counter()
    if section.id.startswith("numerics"):
        with ieee_fp32():
            out, fails = _run_numerics(planned, device, perturb)
        res["numerics"].append({**out, "section": section.id, "seconds": time.perf_counter() - c0,
                                "peak_memory_gb": _free_memory(device)})
    else:
        rows, fails = _run_timing(planned, device, hw)
        res["timings"] += rows
        _free_memory(device)
    res["failures"] += fails
    return fails


def execute(plan, device="cuda", hw: Optional[dict] = None, perturb=None, log=_say) -> dict:
    """Run every section of ``plan`` on ``device``, each case only if it fits the section's
    deadline (its budget plus what earlier sections left); the results (no files)."""
    t0 = time.perf_counter()
    progress = Progress(plan, t0, log)
    res = {"numerics": [], "timings": [], "failures": [], "skipped": [], "sections": {}}
    deadline = t0
    for section in plan:
        deadline += section.budget_s
        s0, counts = time.perf_counter(), {"run": 0, "skipped": 0, "failed": 0}
        log(f"== {section.id}: {len(section.cases)} cases, estimated {section.est_s:.0f} s, "
            f"budget {section.budget_s:.0f} s")
        for planned in section.cases:
            c0 = time.perf_counter()
            if c0 + planned.est_s > deadline:
                res["skipped"].append({"section": section.id, "case": planned.case.id,
                                       "reason": "left out: the section's time budget would be exceeded"})
                counts["skipped"] += 1
                progress.case_done(section, planned, 0.0, "LEFT OUT (time budget)", False)
                continue
            fails = _run_case(section, planned, device, hw, perturb, res)
            counts["run"] += 1
            counts["failed"] += bool(fails)
            progress.case_done(section, planned, time.perf_counter() - c0, "FAIL" if fails else "ok", True)
        res["sections"][section.id] = {"est_s": section.est_s, "budget_s": section.budget_s,
                                       "elapsed_s": time.perf_counter() - s0, **counts}
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def exit_code(res: dict) -> int:
    if res["failures"]:
        return EXIT_FAIL
    if any(s["section"].startswith("numerics") for s in res["skipped"]):
        return EXIT_INCOMPLETE
    return EXIT_OK


STATUS = {EXIT_OK: "PASS", EXIT_FAIL: "FAIL", EXIT_INCOMPLETE: "INCOMPLETE"}


def _no_cuda_reason() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return ("ptune-rt gpu-check needs a CUDA GPU (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}). Use --dry-run to write the plan without one.")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "ptune-rt gpu-check runs the compiled kernels: unset TRITON_INTERPRET (it is 1)."
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    refusal = _refuse_out(out)
    if refusal:
        print(refusal, file=sys.stderr)
        return EXIT_REFUSED
    budget = args.budget_s or None
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    plan = PL.build_plan(args.subset, sections, budget)
    from ptune_rt.gpu_check import report

    if args.dry_run:
        results = report.dry_run_results(plan, budget, argv)
        paths = report.write(results, out)
        print(f"ptune-rt gpu-check --dry-run: {sum(len(s.cases) for s in plan)} cases planned, estimated "
              f"{results['plan']['estimated_total_s']:.0f} s; wrote {', '.join(map(str, paths))}")
        return EXIT_OK
    reason = _no_cuda_reason()
    if reason:
        print(reason, file=sys.stderr)
        return EXIT_REFUSED
    results = report.start_results(plan, budget, argv)
    print(f"ptune-rt gpu-check on {results['provenance']['device_name']}: {sum(len(s.cases) for s in plan)} cases, "
          f"estimated {results['plan']['estimated_total_s']:.0f} s, budget {_fmt_s(budget) if budget else 'none'}; "
          f"roofline: {results['roofline_model']['note']}", flush=True)
    results.update(execute(plan, "cuda", results["roofline_model"]["hardware"]))
    code = exit_code(results)
    results.update(status=STATUS[code], exit_code=code)
    paths = report.write(results, out)
    print(report.summary(results) + f"\nwrote {', '.join(map(str, paths))}")
    return code


if __name__ == "__main__":
    sys.exit(main())
