"""Smoke test of ``ptune-rt bench --suite mixed-tasks --quick``: every section with finite numbers, the
markdown report and the plot, equality of the mixed batch with PEFT task by task, op counts. No
timing assertions (timings on a shared CPU mean nothing here)."""
import math

import pytest

from ptune_rt.cli import main as cli_main

from helpers_bench import check_mode_and_plan, check_speed_verdicts, json_numbers, run_quick

pytestmark = pytest.mark.filterwarnings("ignore:.*right-padding was detected.*")


def test_bench_mixed_tasks_quick(tmp_path):
    res, text = run_quick(tmp_path, "mixed_tasks_cpu_quick", "--suite", "mixed-tasks", "--repeats", "3",
                          "--warmup", "0")
    for sec in ("provenance", "workload", "equality", "ops", "speed", "targets"):
        assert res.get(sec), f"section {sec!r} missing or empty"
    bad = [(p, v) for p, v in json_numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    pv = res["provenance"]
    assert pv["device"] == "cpu" and pv["versions"]["peft"] and "--suite mixed-tasks" in pv["command"]
    wl = res["workload"]
    assert wl["batch"] == wl["tasks"] * wl["rows_per_task"] and wl["tasks"] > 1
    for method in ("prompt_tuning", "prefix_tuning"):
        eq = res["equality"][method]
        assert eq["all_generated_tokens_identical"] and eq["generated_rows_identical"] == wl["batch"]
        assert eq["logits_max_abs_diff"] <= 1e-5 * max(1.0, eq["logits_max_abs"])
        assert eq["task_effect_max_abs_logit_change"] > 1e-3  # the tasks really differ
        for case in ("generate", "forward"):
            d = res["speed"][method][case]
            assert {"peft", "ptune-rt", "base"} <= set(d["variants"]) and d["throughput_ratio"] > 0
            assert len(d["variants"]["peft"]["runs_s"]) == 3
        ops = res["ops"][method]
        # one batch instead of one per task: fewer dispatched ops
        assert ops["ptune-rt"]["forward"]["compute"] < ops["peft"]["forward"]["compute"]
        assert ops["ptune-rt"]["generate"]["compute"] < ops["peft"]["generate"]["compute"]
        assert ops["ptune-rt"]["forward"]["custom"] >= 1
    # LoRA: both sides run one mixed batch (PEFT's adapter_names); same logits and tokens, no target
    eq = res["equality"]["lora"]
    assert eq["all_generated_tokens_identical"] and eq["generated_rows_identical"] == wl["batch"]
    assert eq["logits_max_abs_diff"] <= 1e-5 * max(1.0, eq["logits_max_abs"])
    assert eq["task_effect_max_abs_logit_change"] > 1e-3
    assert {"peft", "ptune-rt", "base"} <= set(res["speed"]["lora"]["generate"]["variants"])
    assert not any(t["target"].startswith("lora") for t in res["targets"])
    # prefix tuning: one fused attention op per layer for all rows and tasks
    assert res["ops"]["prefix_tuning"]["ptune-rt"]["forward"]["custom"] == wl["layers"]
    assert len(res["targets"]) == 4 and {t["unit"] for t in res["targets"]} == {"x"}
    check_speed_verdicts(res["targets"], rounds=3)
    check_mode_and_plan(res, "quick")
    assert res["methods"] == ["prompt_tuning", "prefix_tuning", "lora"]
    for head in ("## Dispatched ops", "## Equality", "throughput ratio", "| inconclusive (noise) |",
                 "mode quick, finished in"):
        assert head in text


def test_bench_mixed_tasks_refuses_too_few_repeats(tmp_path):
    with pytest.raises(SystemExit, match="--repeats must be >= 3"):
        cli_main(["bench", "--suite", "mixed-tasks", "--quick", "--out", str(tmp_path), "--repeats", "2",
                  "--no-progress"])
    with pytest.raises(SystemExit, match="--methods must name some of"):
        cli_main(["bench", "--suite", "mixed-tasks", "--quick", "--out", str(tmp_path), "--methods", "adapters",
                  "--no-progress"])


def test_bench_mixed_tasks_modes():
    """Default: the methods with a target, in rounds enough for a verdict; --full: the committed run's command."""
    from ptune_rt.bench import mixed_tasks

    full = mixed_tasks.parse(["--full"])
    assert (full.mode, full.repeats, mixed_tasks.chosen_methods(full)) == ("full", 7, list(mixed_tasks.METHODS))
    default = mixed_tasks.parse([])
    assert (default.mode, default.repeats, mixed_tasks.chosen_methods(default)) == (
        "default", 6, list(mixed_tasks.TASK_BY_TASK))
    assert mixed_tasks.chosen_methods(mixed_tasks.parse(["--methods", "lora"])) == ["lora"]
