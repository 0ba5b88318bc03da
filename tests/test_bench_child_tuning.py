"""Smoke test of ``ptune-rt bench --suite child-tuning --quick``: both modes, both variants, the
analytic bytes (the fused step moves 7 fp32 passes, 1 bit more per parameter in mode D), the D mask
memory (1 bit per parameter), the untouched entries outside the D child, ratios with intervals and
honest verdicts, the markdown report and the plot. No timing assertions (timings on a shared CPU mean
nothing here)."""
import math

from helpers_bench import json_numbers, run_quick


def test_bench_child_tuning_quick(tmp_path):
    res, text = run_quick(tmp_path, "child_tuning_cpu_quick", "--suite", "child-tuning", "--repeats", "3",
                          "--warmup", "0")
    bad = [(p, v) for p, v in json_numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    pv, wl = res["provenance"], res["workload"]
    assert pv["device"] == "cpu" and "--suite child-tuning" in pv["command"]
    assert res["mode"] == "quick" and res["repeats"] == 3 and set(res["modes"]) == {"F", "D"}
    n = wl["parameters"]
    ab = res["analytic_bytes"]
    assert ab["fused_F"] == 28 * n and ab["fused_D"] == 28 * n + math.ceil(n / 8)
    assert ab["eager_F"] > ab["eager_D"] > ab["eager_adamw_only"] > ab["fused_D"]
    mm = res["mask_memory"]
    assert mm["packed_bits"] == math.ceil(n / 8) and mm["bool_tensor"] == n and mm["float_mask"] == 4 * n
    assert res["modes"]["D"]["outside_child_unchanged"] == {"ptune-rt": True, "eager": False}
    for mode, d in res["modes"].items():
        assert d["backend"].startswith("triton interpreter") or d["backend"].startswith("torch path")
        r = d["speed"]["ratio"]
        lo, hi = r["ci95"]
        assert r["ratio"] > 0 and lo <= r["ratio"] <= hi
        assert r["verdict"].startswith("inconclusive")  # 3 rounds: too few for any verdict
        for v in ("eager", "ptune-rt"):
            assert len(d["speed"]["variants"][v]["runs_s"]) == 3
    assert len(res["verdicts"]) == 2
    for head in ("## Step time", "## Bytes moved per step", "## D mask memory", "ChildTuningAdamW"):
        assert head in text
