"""Smoke test of ``ptune-rt bench --suite prefix --quick``: every section present with finite numbers, the
markdown report and the plot. No timing assertions (timings on a shared CPU mean nothing here)."""
import math

import pytest

from ptune_rt.cli import main as cli_main

from helpers_bench import check_mode_and_plan, check_speed_verdicts, json_numbers, run_quick

SECTIONS = ("provenance", "workload", "cases", "generate", "ops", "float64", "attention_flops_model", "analytic",
            "targets")


def test_bench_prefix_quick(tmp_path):
    res, text = run_quick(tmp_path, "prefix_cpu_quick", "--suite", "prefix", "--repeats", "2", "--warmup", "0")

    for sec in SECTIONS:
        assert res.get(sec), f"section {sec!r} missing or empty"
    nums = list(json_numbers(res))
    assert len(nums) > 200
    bad = [(p, v) for p, v in nums if not math.isfinite(v)]
    assert not bad, bad[:5]
    pv = res["provenance"]
    assert pv["device"] == "cpu" and pv["versions"]["peft"] and "--suite prefix" in pv["command"]

    wl = res["workload"]
    assert [[c["P"], c["seq"]] for c in res["cases"]] == wl["cases"] and len(wl["cases"]) == 4
    for c in res["cases"]:
        for key in ("train", "forward"):
            d = c["speed"][key]
            want = {"peft", "ptune-rt", "base"} if key == "forward" else {"peft", "ptune-rt"}
            assert set(d["variants"]) == want and d["speedup"] > 0
            assert len(d["variants"]["peft"]["runs_s"]) == 2
        fw = c["speed"]["forward"]  # the frozen base model runs alongside: PEFT / base is the ceiling
        assert fw["ceiling_speedup_zero_cost_adapter"] == pytest.approx(
            fw["variants"]["peft"]["median_s"] / fw["variants"]["base"]["median_s"])
        mem = c["memory"]
        for side in ("peft", "ptune-rt"):
            assert mem[side]["activation_bytes"] > 0 and mem[side]["largest"]
        # the fused op keeps no attention-matrix-sized tensor, mask or concatenated K/V for backward;
        # PEFT keeps its concatenated (GQA-repeated) K/V and its mask
        assert mem["ptune-rt"]["quadratic_count"] == 0 and mem["ptune-rt"]["concat_kv_count"] == 0
        assert mem["peft"]["concat_kv_count"] > 0 and mem["peft"]["mask_count"] > 0
        eq = c["equality"]
        assert eq["logits_max_abs_diff"] <= 1e-5 * max(1.0, eq["logits_max_abs"])
        assert eq["prefix_grad_max_abs_diff"] <= 1e-5 * max(1.0, eq["prefix_grad_max_abs"])

    for P in map(str, wl["prefix_lengths"]):
        g = res["generate"][P]
        assert g["same_tokens_ptune_vs_peft"] and set(g["new_tokens"].values()) == {wl["gen_new_tokens"]}
        ops = res["ops"][P]
        # one fused attention op per layer per forward; PEFT dispatches none
        assert ops["ptune-rt"]["forward"]["custom"] == wl["layers"]
        assert ops["ptune-rt"]["train_step"]["custom"] == 2 * wl["layers"]
        assert ops["peft"]["forward"]["custom"] == 0
        assert ops["ptune-rt"]["forward"]["compute_expanded"] > ops["ptune-rt"]["forward"]["compute"]
        f64 = res["float64"][P]
        assert f64["logits_within_tolerance_rule"] and f64["prefix_effect_max_abs_logit_change"] > 1e-3

    for row in res["analytic"]["rows"]:
        for pass_ in ("forward", "backward"):
            assert row[pass_]["fused"]["bytes"] < row[pass_]["unfused"]["bytes"]
    assert res["analytic"]["rows"][0]["batch"] == 1
    assert len(res["targets"]) == 3 * len(wl["cases"])
    assert {t["unit"] for t in res["targets"]} == {"x", "tensors"}
    check_speed_verdicts(res["targets"], rounds=2)
    assert all(t["verdict"] == "PASS" for t in res["targets"] if t["measure"] == "saved")
    check_mode_and_plan(res, "quick")
    assert res["plan"]["kinds"]["P4_seq40_forward"]["calls"] == 3 * (0 + 2)  # 3 variants x (warm-up + rounds)

    for head in ("## Targets", "## Bytes saved for backward", "## Dispatched ops", "## Equality",
                 "## Analytic HBM traffic", "Largest saved activations, PEFT", "Largest saved activations, ptune-rt",
                 "inconclusive (noise)", "mode quick, finished in"):
        assert head in text, head
    assert "model, not a measurement" in text.lower()


def test_bench_prefix_refuses_bad_repeats(tmp_path):
    with pytest.raises(SystemExit, match="must be >= 1"):
        cli_main(["bench", "--suite", "prefix", "--quick", "--out", str(tmp_path), "--repeats", "0", "--no-progress"])


def test_bench_prefix_modes():
    """Default: one prefix length in rounds enough for a verdict; --full: the committed run's command."""
    from ptune_rt.bench import prefix

    full = prefix.parse(["--full"])
    assert (full.mode, full.repeats, full.long_train_repeats, full.wait_for_load, full.max_wait) == (
        "full", 9, 5, 1.5, 300)
    assert prefix.workload(full).prefix_lengths == (32, 128)
    default = prefix.parse([])
    assert (default.mode, default.repeats, default.long_train_repeats) == ("default", 6, None)
    wl = prefix.workload(default)
    assert wl.prefix_lengths == (32,) and wl.seqs == (256, 1024)
    assert prefix.workload(prefix.parse(["--prefix-lengths", "32,128"])).prefix_lengths == (32, 128)
    assert prefix.parse(["--quick"]).mode == "quick"
