"""Smoke test of ``ptune-rt bench --suite bitfit --quick``: the three variants on both models, the
backward GEMM counts (BitFit runs no weight-gradient GEMM of a frozen weight, full fine-tuning one per
linear), the equality of PEFT-style masking and ptune-rt's BitFit, ratios with intervals and honest
verdicts, the markdown report and the plot. No timing assertions (timings on a shared CPU mean nothing
here)."""
import math

import pytest

from helpers_bench import json_numbers, run_quick

VARIANTS = {"full", "masked", "ptune-rt"}


def test_bench_bitfit_quick(tmp_path):
    res, text = run_quick(tmp_path, "bitfit_cpu_quick", "--suite", "bitfit", "--repeats", "3", "--warmup", "0")
    bad = [(p, v) for p, v in json_numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    pv, wl = res["provenance"], res["workload"]
    assert pv["device"] == "cpu" and pv["versions"]["torch"] and "--suite bitfit" in pv["command"]
    assert set(res["models"]) == {"bert", "llama"} and res["equality_passed"]
    assert res["mode"] == "quick" and res["repeats"] == 3  # the option given wins over the mode's 7
    # linears whose weights BitFit freezes: 6 per BERT layer and the pooler; 7 per Llama layer and the LM head
    body_linears = {"bert": 6 * wl["bert_layers"] + 1, "llama": 7 * wl["layers"] + 1}
    for fam, d in res["models"].items():
        assert set(d["variants"]) == set(d["speed"]["variants"]) == set(d["ops"]) == set(d["memory"]) == VARIANTS
        n = {v: d["variants"][v]["trainable_parameters"] for v in VARIANTS}
        assert n["masked"] == n["ptune-rt"] < n["full"] == d["variants"]["full"]["total_parameters"]
        ops = d["ops"]
        # full fine-tuning: one weight-gradient GEMM per linear; BitFit and the masking: none of a frozen weight
        assert ops["full"]["weight_grad_gemms_frozen_under_bitfit"] == body_linears[fam]
        for v in ("masked", "ptune-rt"):
            assert ops[v]["weight_grad_gemms_frozen_under_bitfit"] == 0, (fam, v, ops[v]["by_output_shape"])
            assert ops[v]["weight_grad_gemms_head"] == (1 if fam == "bert" else 0)  # the classifier trains whole
            assert 0 < ops[v]["gemms"] < ops["full"]["gemms"]
            assert ops[v]["backward_gflop"] < ops["full"]["backward_gflop"]
            assert d["memory"][v]["activation_bytes"] < d["memory"]["full"]["activation_bytes"]
        assert ops["masked"]["gemms"] == ops["ptune-rt"]["gemms"]
        assert ops["masked"]["by_op"] == ops["ptune-rt"]["by_op"]
        eq = d["equality"]
        assert eq["passed"] and eq["same_trainable_parameters"]
        assert eq["loss_within_tolerance_rule"] and eq["grads_within_tolerance_rule"]
        assert eq["full_ft_same_tensors_within_tolerance_rule"]
        assert eq["bias_tensors"] > 0 and eq["head_tensors"] == (1 if fam == "bert" else 0)  # classifier.weight
        for key, r in d["speed"]["ratios"].items():
            lo, hi = r["ci95"]
            assert r["ratio"] > 0 and lo <= r["ratio"] <= hi, (fam, key, r)
            assert r["verdict"].startswith("inconclusive")  # 3 rounds: too few for any verdict
        for v in VARIANTS:
            assert len(d["speed"]["variants"][v]["runs_s"]) == 3
            assert math.isfinite(d["speed"]["loss_after_timing"][v])
    assert len(res["verdicts"]) == 6
    for head in ("## Summary", "full fine-tuning", "requires_grad masking", "ptune-rt BitFit", "Equality check passed"):
        assert head in text


def test_verdict_says_inconclusive_when_the_interval_straddles_one():
    from ptune_rt.bench.bitfit import MIN_ROUNDS_FOR_VERDICT, verdict
    from ptune_rt.bench.report import INCONCLUSIVE

    n = MIN_ROUNDS_FOR_VERDICT
    assert verdict(1.3, [1.1, 1.5], n) == "faster"
    assert verdict(0.8, [0.7, 0.95], n) == "slower"
    assert verdict(1.04, [0.97, 1.12], 41) == INCONCLUSIVE
    assert verdict(1.3, [1.1, 1.5], n - 1) == INCONCLUSIVE  # all rounds may agree by chance
    assert verdict(1.5, None, 1).startswith("inconclusive")


def test_bitfit_bench_refuses_ambiguous_shapes():
    """A row count equal to a weight dimension would make an input gradient look like a weight gradient."""
    import dataclasses

    from ptune_rt.bench import bitfit

    wl = dataclasses.replace(bitfit.BitFitWorkload.quick(), batch=2, seq=32)  # 64 tokens = hidden 64
    model, _, _ = bitfit.build_base(wl, "llama", "cpu")
    with pytest.raises(ValueError, match="equal a linear's dimension"):
        bitfit.check_shapes(model, wl, "llama", set())
