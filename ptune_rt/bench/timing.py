"""Interleaved wall-clock timing.

CPU timings on a shared machine drift with load, so the variants of one case are never timed in
separate blocks: every round runs each variant once, in an order that rotates from round to round,
and the report uses medians (and the median of the per-round ratios as a second opinion).
On CUDA each call is bracketed by CUDA events after a synchronize.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def _timer(device: torch.device, cpu_times: Optional[list] = None):
    """A function ``run(fn) -> seconds``; on CPU it also appends the process CPU time of the call
    (all threads) to ``cpu_times``: a second opinion on a busy machine, where wall time includes
    the time our threads waited for a core."""
    if device.type == "cuda":
        def run(fn):
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
            return t
    return run


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu"), setup: Optional[Callable[[str], None]] = None,
                tick: Optional[Callable[[], None]] = None,
                cpu_times: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, measured round-robin.

    ``setup(name)`` runs (untimed) before each call, e.g. to clear gradients; ``tick()`` after each
    timed call (progress bar). On CPU, ``cpu_times`` (if given) receives the process CPU seconds of
    every timed call, per name.
    """
    names = list(fns)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    runs = {n: _timer(torch.device(device), cpu[n]) for n in names}
    for _ in range(warmup):
        for n in names:
            if setup:
                setup(n)
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            if setup:
                setup(n)
            times[n].append(runs[n](fns[n]))
            if tick:
                tick()
    if cpu_times is not None:
        cpu_times.update({n: v for n, v in cpu.items() if v})
    return times


def summarize(times: dict[str, list[float]], baseline: str = "peft", candidate: str = "ptune-rt",
              per: float = 1.0, cpu_times: Optional[dict[str, list[float]]] = None) -> dict:
    """Medians (divided by ``per``, e.g. tokens), spread, and the speed ratio baseline / candidate.

    Besides the ratio of medians (the headline), the ratio of the fastest runs (contention only
    ever slows a run down, so minima are the least disturbed) and, on CPU, the ratio of median
    process CPU times are reported.
    """
    out: dict = {"variants": {}}
    for n, ts in times.items():
        ts_per = [t / per for t in ts]
        out["variants"][n] = {"median_s": statistics.median(ts_per), "min_s": min(ts_per), "max_s": max(ts_per),
                              "runs_s": ts_per}
        if cpu_times and n in cpu_times:
            cs = [c / per for c in cpu_times[n]]
            out["variants"][n]["cpu_median_s"] = statistics.median(cs)
            out["variants"][n]["cpu_runs_s"] = cs
    if baseline in times and candidate in times:
        mb = out["variants"][baseline]["median_s"]
        mc = out["variants"][candidate]["median_s"]
        out["speedup"] = mb / mc
        paired = [b / c for b, c in zip(times[baseline], times[candidate])]
        out["speedup_paired_median"] = statistics.median(paired)
        out["speedup_paired_min"] = min(paired)
        out["speedup_paired_max"] = max(paired)
        out["speedup_of_minima"] = min(times[baseline]) / min(times[candidate])
        if "base" in times:  # what an adapter costing nothing at all would reach
            out["ceiling_speedup_zero_cost_adapter"] = mb / out["variants"]["base"]["median_s"]
        if cpu_times and baseline in cpu_times and candidate in cpu_times:
            out["speedup_cpu_time"] = statistics.median(cpu_times[baseline]) / statistics.median(cpu_times[candidate])
    return out
