"""The benchmark's ratio statistics (no timing here: fixed numbers in, known answers out)."""
import statistics

import pytest

from ptune_rt.bench.timing import bootstrap_ratio_ci, summarize


def test_interval_of_a_constant_ratio_is_that_ratio():
    base = [2.0, 4.0, 6.0, 8.0, 10.0]
    assert bootstrap_ratio_ci(base, [b / 2 for b in base]) == (2.0, 2.0)
    assert bootstrap_ratio_ci(base, base) == (1.0, 1.0)


def test_interval_brackets_the_ratio_and_narrows_with_quieter_runs():
    noisy_b = [1.00, 1.30, 0.95, 1.20, 1.05, 1.40, 0.90, 1.10, 1.25]
    noisy_c = [1.10, 0.90, 1.00, 1.25, 0.95, 1.05, 1.20, 0.92, 1.00]
    quiet_b = [1.10, 1.11, 1.09, 1.10, 1.12, 1.10, 1.08, 1.11, 1.10]
    quiet_c = [1.00, 1.01, 0.99, 1.00, 1.00, 1.02, 0.99, 1.00, 1.01]
    lo, hi = bootstrap_ratio_ci(noisy_b, noisy_c)
    ratio = statistics.median(noisy_b) / statistics.median(noisy_c)
    assert lo < ratio < hi
    qlo, qhi = bootstrap_ratio_ci(quiet_b, quiet_c)
    assert 1.05 < qlo <= qhi < 1.15 and (qhi - qlo) < (hi - lo) / 3
    assert bootstrap_ratio_ci(noisy_b, noisy_c) == (lo, hi)  # deterministic


def test_summarize_reports_the_interval():
    out = summarize({"peft": [2.0, 2.2, 2.1], "ptune-rt": [1.0, 1.1, 1.0]})
    lo, hi = out["speedup_ci95"]
    assert lo <= out["speedup"] <= hi


def test_unpaired_runs_are_refused():
    with pytest.raises(ValueError, match="paired runs of one length"):
        bootstrap_ratio_ci([1.0, 2.0], [1.0])


def test_block_mode_times_steady_state():
    """block=N: per round each function runs N times in a row, the first untimed, and the sample is
    the mean of the other N - 1; every call still gets its setup."""
    from ptune_rt.bench.timing import interleaved

    calls = {"a": 0, "b": 0}
    setups = []

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=1, setup=setups.append, block=4)
    assert [len(times[n]) for n in "ab"] == [3, 3]
    assert calls == {"a": 1 + 3 * 4, "b": 1 + 3 * 4}
    assert len(setups) == 2 * (1 + 3 * 4)
    cpu = {}
    interleaved({"a": make("a")}, repeats=2, warmup=0, cpu_times=cpu, block=3)
    assert len(cpu["a"]) == 2  # one CPU-time sample per timed sample
    with pytest.raises(ValueError, match="block must be an integer >= 1"):
        interleaved({"a": make("a")}, repeats=1, block=0)
