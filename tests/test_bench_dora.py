"""Smoke test of ``ptune-rt bench --suite dora --quick``: PEFT's DoRA allocates N x K temporaries (B A,
W + s B A) in every forward and ptune-rt's none, ptune-rt saves fewer activation bytes, logits and the
A / B / magnitude gradients agree by the tolerance rule, ratios come with intervals and honest verdicts,
the markdown report and the plot are written. No timing assertions (timings on a shared CPU mean
nothing here)."""
import dataclasses
import math

import pytest

from helpers_bench import check_mode_and_plan, check_speed_verdicts, json_numbers, run_quick


def test_bench_dora_quick(tmp_path):
    res, text = run_quick(tmp_path, "dora_cpu_quick", "--suite", "dora", "--repeats", "2", "--warmup", "0")
    bad = [(p, v) for p, v in json_numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    pv, wl = res["provenance"], res["workload"]
    assert pv["device"] == "cpu" and pv["versions"]["peft"] and "--suite dora" in pv["command"]
    check_mode_and_plan(res, "quick")
    assert res["repeats"] == 2 and res["backends"] == ["torch"]
    peft, ours = res["memory"]["peft"], res["memory"]["ptune-rt"]
    assert ours["nk_allocations"] == 0 and ours["nk_bytes"] == 0
    # at least B A, s * (B A) and W + s B A in every DoRA layer's forward
    assert peft["nk_allocations"] >= 3 * wl["n_lora_linears"], peft["nk_allocations_by_op_and_shape"]
    assert peft["nk_bytes"] > 0 and peft["largest_target_weight_bytes"] > 0
    assert 0 < ours["activation_bytes"] < peft["activation_bytes"]
    assert ours["allocated_bytes"] < peft["allocated_bytes"]
    eq = res["equality"]
    assert eq["passed"] and set(eq["checks"]) == {"logits", "grad_lora_A", "grad_lora_B",
                                                  "grad_lora_magnitude_vector"}
    for case in ("train", "forward_nograd"):
        sp = res["speed"][case]
        lo, hi = sp["speedup_ci95"]
        assert sp["speedup"] > 0 and lo <= sp["speedup"] <= hi
        assert all(len(sp["variants"][n]["runs_s"]) == 2 for n in ("peft", "ptune-rt"))
    check_speed_verdicts(res["targets"], 2)
    assert [t["verdict"] for t in res["targets"] if t["ci95"] is None] == ["PASS"]  # ptune-rt: no N x K tensor
    for head in ("## Targets", "## Memory", "HF PEFT DoRA", "ptune-rt DoRA", "Equality check passed"):
        assert head in text


def test_dora_bench_refuses_ambiguous_shapes():
    """An activation with a target weight's element count would be counted as an N x K temporary."""
    from ptune_rt.bench import dora

    wl = dataclasses.replace(dora.DoRAWorkload.quick(), batch=2, seq=32)  # 64 tokens x hidden 64 = q_proj's 64 x 64
    with pytest.raises(ValueError, match="a target weight's count"):
        dora.check_shapes(wl)
    dora.check_shapes(dora.DoRAWorkload.quick())
    dora.check_shapes(dora.DoRAWorkload.default())
