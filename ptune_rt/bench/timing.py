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


def _timer(device: torch.device):
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
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu"), setup: Optional[Callable[[str], None]] = None,
                tick: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, measured round-robin.

    ``setup(name)`` runs (untimed) before each call, e.g. to clear gradients; ``tick()`` after each
    timed call (progress bar).
    """
    run = _timer(torch.device(device))
    names = list(fns)
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
            times[n].append(run(fns[n]))
            if tick:
                tick()
    return times


def summarize(times: dict[str, list[float]], baseline: str = "peft", candidate: str = "ptune-rt",
              per: float = 1.0) -> dict:
    """Medians (divided by ``per``, e.g. tokens), spread, and the speed ratio baseline / candidate."""
    out: dict = {"variants": {}}
    for n, ts in times.items():
        ts_per = [t / per for t in ts]
        out["variants"][n] = {"median_s": statistics.median(ts_per), "min_s": min(ts_per), "max_s": max(ts_per),
                              "runs_s": ts_per}
    if baseline in times and candidate in times:
        mb = out["variants"][baseline]["median_s"]
        mc = out["variants"][candidate]["median_s"]
        out["speedup"] = mb / mc
        paired = [b / c for b, c in zip(times[baseline], times[candidate])]
        out["speedup_paired_median"] = statistics.median(paired)
        out["speedup_paired_min"] = min(paired)
        out["speedup_paired_max"] = max(paired)
    return out
