"""Interleaved wall-clock timing.

CPU timings on a shared machine drift with load, so the variants of one case are never timed in
separate blocks: every round runs each variant once, in an order that rotates from round to round,
and the report uses medians (and the median of the per-round ratios as a second opinion).
On CUDA each call is bracketed by CUDA events after a synchronize.
"""
from __future__ import annotations

import random
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


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def cpu_idle_fraction(interval: float = 1.0) -> Optional[float]:
    """Fraction of all CPUs' time that was idle during the next ``interval`` seconds (Linux only)."""
    a = _cpu_jiffies()
    if a is None:
        return None
    time.sleep(interval)
    b = _cpu_jiffies()
    total = b[1] - a[1]
    return (b[0] - a[0]) / total if total > 0 else None


class QuietGate:
    """Before each timed round, wait (sleeping, so we do not load the machine ourselves) until the
    CPUs were at least ``min_idle`` idle over a one-second window, for at most ``max_wait`` seconds.

    On a shared machine other jobs come in bursts; gating every round keeps most rounds out of
    them, while interleaving keeps whatever contention remains fair between the variants.
    """

    def __init__(self, min_idle: float, max_wait: float = 60.0):
        self.min_idle = min_idle
        self.max_wait = max_wait
        self.log: list[dict] = []

    def __call__(self) -> None:
        t0 = time.monotonic()
        idle = cpu_idle_fraction()
        while idle is not None and idle < self.min_idle and time.monotonic() - t0 < self.max_wait:
            idle = cpu_idle_fraction()
        self.log.append({"waited_s": round(time.monotonic() - t0, 2), "idle": None if idle is None else round(idle, 3)})

    def summary(self) -> dict:
        idles = [e["idle"] for e in self.log if e["idle"] is not None]
        return {"min_idle": self.min_idle, "max_wait_s": self.max_wait, "rounds": len(self.log),
                "rounds_quiet": sum(1 for i in idles if i >= self.min_idle),
                "total_wait_s": round(sum(e["waited_s"] for e in self.log), 1),
                "idle_before_rounds": idles}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu"), setup: Optional[Callable[[str], None]] = None,
                tick: Optional[Callable[[], None]] = None,
                cpu_times: Optional[dict[str, list[float]]] = None,
                gate: Optional[Callable[[], None]] = None, block: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, measured round-robin.

    ``setup(name)`` runs (untimed) before each call, e.g. to clear gradients; ``tick()`` after each
    timed sample (progress bar). On CPU, ``cpu_times`` (if given) receives the process CPU seconds of
    every timed sample, per name. ``gate()`` runs before every timed round (see :class:`QuietGate`).

    ``block`` > 1 measures steady state, as a training loop sees it: in every round each function
    runs ``block`` times in a row, the first call untimed (it pays for the switch from the other
    variant: caches, allocator state) and the sample is the mean of the other ``block - 1``.
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
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
        if gate:
            gate()
        k = i % len(names)
        for n in names[k:] + names[:k]:
            if block > 1:  # the switch-over call, untimed
                if setup:
                    setup(n)
                fns[n]()
            got, cpu_before = [], len(cpu[n])
            for _ in range(max(block - 1, 1)):
                if setup:
                    setup(n)
                got.append(runs[n](fns[n]))
            times[n].append(statistics.fmean(got))
            if cpu[n][cpu_before:]:  # one CPU-time sample per timed sample, like the wall time
                cpu[n][cpu_before:] = [statistics.fmean(cpu[n][cpu_before:])]
            if tick:
                tick()
    if cpu_times is not None:
        cpu_times.update({n: v for n, v in cpu.items() if v})
    return times


def bootstrap_ratio_ci(baseline: list[float], candidate: list[float], level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Confidence interval of median(baseline) / median(candidate) by a paired bootstrap: the
    interleaved rounds (one run of each variant) are resampled with replacement, so round-to-round
    drift of the machine moves both sides together. Deterministic for a given ``seed``."""
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"baseline and candidate must be paired runs of one length, got {len(baseline)} "
                         f"and {len(candidate)}")
    rng = random.Random(seed)
    n = len(baseline)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(baseline[i] for i in idx) / statistics.median(candidate[i] for i in idx))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int(round((1.0 - tail) * (resamples - 1)))]


def summarize(times: dict[str, list[float]], baseline: str = "peft", candidate: str = "ptune-rt",
              per: float = 1.0, cpu_times: Optional[dict[str, list[float]]] = None) -> dict:
    """Medians (divided by ``per``, e.g. tokens), spread, and the speed ratio baseline / candidate.

    Besides the ratio of medians (the headline) and its 95% paired-bootstrap interval, the ratio of the fastest runs (contention only
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
        if len(times[baseline]) == len(times[candidate]):
            out["speedup_ci95"] = list(bootstrap_ratio_ci(times[baseline], times[candidate]))
        if "base" in times:  # what an adapter costing nothing at all would reach
            out["ceiling_speedup_zero_cost_adapter"] = mb / out["variants"]["base"]["median_s"]
        if cpu_times and baseline in cpu_times and candidate in cpu_times:
            out["speedup_cpu_time"] = statistics.median(cpu_times[baseline]) / statistics.median(cpu_times[candidate])
    return out


# ----------------------------------------------------------------------------------------
# the plan of a run and its ETA
# ----------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``M:SS`` (``H:MM:SS`` from an hour on)."""
    s = int(round(max(0.0, seconds)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Plan:
    """What a benchmark run will do, and a progress bar whose ETA comes from it.

    A run is planned as kinds of work (a timed case, a model build, an untimed section), each with
    the number of calls it will make and a prior cost per call: seconds on the 2-core CPU of the
    committed results. While the run goes, :meth:`advance` charges the wall time since the previous
    advance to the current kind, so a kind's cost per call becomes what its calls measured (the first
    round of a case calibrates its remaining rounds), and kinds not reached yet are scaled by how the
    measured kinds compared with their priors (a faster or slower machine, a busy one). The ETA is the
    estimated cost of every call still to come; ``summary()`` keeps the ETA at the start, and at the
    start of every kind, beside the actual wall time.
    """

    def __init__(self):
        self.kinds: dict[str, dict] = {}
        self.bar = None
        self.eta_at_start_s: Optional[float] = None
        self.eta_log: list[dict] = []
        self._t0: Optional[float] = None
        self._last: Optional[float] = None
        self._current: Optional[str] = None
        self._end: Optional[float] = None

    def add(self, kind: str, calls: int, prior_s: float, label: Optional[str] = None) -> None:
        """Plan ``calls`` more calls of ``kind``, ``prior_s`` seconds each before any is measured."""
        if calls < 0 or prior_s < 0:
            raise ValueError(f"calls and prior_s must be >= 0, got {calls} and {prior_s} for {kind!r}")
        k = self.kinds.setdefault(kind, {"label": label or kind, "calls": 0, "prior_s": float(prior_s), "done": 0,
                                         "seconds": 0.0})
        k["calls"] += calls

    #: bounds of :meth:`machine_factor`: a few odd first calls do not move the whole estimate further
    FACTOR_RANGE = (1 / 3, 3.0)
    #: the priors' own weight in :meth:`machine_factor`, as a fraction of the plan's prior total: a short
    #: first kind (a model build) moves the estimate of the rest a little, the first timed cases a lot
    PRIOR_WEIGHT = 0.05

    def machine_factor(self) -> float:
        """Measured / prior cost over the calls measured so far, the priors themselves counting as
        ``PRIOR_WEIGHT`` of the plan at ratio 1 (so 1.0 before any call), within :data:`FACTOR_RANGE`."""
        prior = sum(k["prior_s"] * k["done"] for k in self.kinds.values() if k["done"] and k["prior_s"] > 0)
        spent = sum(k["seconds"] for k in self.kinds.values() if k["done"] and k["prior_s"] > 0)
        w = max(1.0, self.PRIOR_WEIGHT * self.total_prior_s())
        lo, hi = self.FACTOR_RANGE
        return min(max((spent + w) / (prior + w), lo), hi)

    def per_call_s(self, kind: str) -> float:
        """The current estimate of one call of ``kind``: its measured mean, else its prior scaled."""
        k = self.kinds[kind]
        return k["seconds"] / k["done"] if k["done"] else k["prior_s"] * self.machine_factor()

    def remaining_s(self) -> float:
        """Estimated seconds of every planned call not done yet."""
        return sum(max(k["calls"] - k["done"], 0) * self.per_call_s(n) for n, k in self.kinds.items())

    def total_prior_s(self) -> float:
        return sum(k["calls"] * k["prior_s"] for k in self.kinds.values())

    def start(self, disable: bool = False, file=None) -> "Plan":
        """Start the clock (and the bar, unless ``disable``); the ETA at this point is kept."""
        import sys

        from tqdm.auto import tqdm

        self._t0 = self._last = time.perf_counter()
        self.eta_at_start_s = self.remaining_s()
        self.bar = tqdm(total=max(self.eta_at_start_s, 1e-9), disable=disable, file=file or sys.stderr,
                        dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")
        self._show()
        return self

    def begin(self, kind: str, text: Optional[str] = None) -> None:
        """The calls from now on are ``kind``'s (the time since the last advance is charged to it too)."""
        if kind not in self.kinds:
            raise KeyError(f"{kind!r} is not planned (planned: {sorted(self.kinds)})")
        if kind != self._current and self._t0 is not None:
            self.eta_log.append({"kind": kind, "elapsed_s": round(time.perf_counter() - self._t0, 2),
                                 "eta_s": round(self.remaining_s(), 2)})
        self._current = kind
        self.status(text or self.kinds[kind]["label"])

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
            self._show()

    def advance(self, calls: int = 1) -> None:
        """``calls`` calls of the current kind are done: charge them the wall time since the last advance."""
        now = time.perf_counter()
        k = self.kinds[self._current]
        k["done"] += calls
        k["seconds"] += now - self._last
        self._last = now
        self._show()

    def ticker(self, calls_per_tick: int = 1, first_extra: int = 0):
        """A ``tick()`` for :func:`interleaved`: each tick is ``calls_per_tick`` calls (``block``), the
        first one ``first_extra`` more (the warm-up calls of every variant run before it)."""
        first = [True]

        def tick():
            self.advance(calls_per_tick + (first_extra if first[0] else 0))
            first[0] = False

        return tick

    def _show(self) -> None:
        if self.bar is None or self.bar.disable:
            return
        elapsed = time.perf_counter() - self._t0
        left = self.remaining_s()
        self.bar.total = max(elapsed + left, 1e-9)
        self.bar.n = elapsed
        self.bar.set_postfix_str(f"about {format_duration(left)} left", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self._end is None and self._t0 is not None:
            self._end = time.perf_counter()
        if self.bar is not None:
            self.bar.close()

    def wall_s(self) -> float:
        return ((self._end or time.perf_counter()) - self._t0) if self._t0 is not None else 0.0

    def summary(self) -> dict:
        """The ETA at the start beside the actual wall time; the ETA when each kind began (``elapsed_s``
        + ``eta_s`` = the total the plan expected then); per kind: calls planned and done, prior and
        measured seconds per call."""
        return {"eta_at_start_s": self.eta_at_start_s, "wall_s": self.wall_s(), "prior_total_s": self.total_prior_s(),
                "eta_log": self.eta_log,
                "kinds": {n: {"calls": k["calls"], "done": k["done"], "prior_s_per_call": k["prior_s"],
                              "measured_s_per_call": k["seconds"] / k["done"] if k["done"] else None}
                          for n, k in self.kinds.items()}}

    def table(self) -> list[str]:
        """The plan as markdown lines: what runs, how often, for how long (before anything is measured)."""
        lines = ["| Work | calls | s per call (prior) | s |", "|---|---:|---:|---:|"]
        for k in self.kinds.values():
            lines.append(f"| {k['label']} | {k['calls']} | {k['prior_s']:.3g} | {k['calls'] * k['prior_s']:.0f} |")
        lines.append(f"| **total** |  |  | **{self.total_prior_s():.0f}** ({format_duration(self.total_prior_s())}) |")
        return lines

    def finished_line(self) -> str:
        eta = self.eta_at_start_s
        return (f"finished in {format_duration(self.wall_s())} (estimated {format_duration(eta)} at the start)"
                if eta is not None else f"finished in {format_duration(self.wall_s())}")
