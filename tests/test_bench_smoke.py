"""Smoke test of ``ptune-rt bench --quick``: every section is produced, with finite numbers, plus the
markdown report and the plot; where results go by default, the run modes, the verdict rule and the
plan behind the ETA. No timing assertions (timings on a shared CPU mean nothing here)."""
import json
import math
from pathlib import Path

import pytest

from ptune_rt.cli import main as cli_main

from helpers_bench import check_mode_and_plan, check_speed_verdicts, json_numbers, run_quick

CHECKOUT = Path(__file__).resolve().parents[1]

SECTIONS = ("provenance", "workload", "equality", "speed", "memory", "ops", "flops", "analytic", "triton", "targets")


def test_bench_quick_writes_every_section(tmp_path):
    res, text = run_quick(tmp_path, "lora_cpu_quick", "--repeats", "2", "--warmup", "0")

    for sec in SECTIONS:
        assert res.get(sec), f"section {sec!r} missing or empty"
    assert "error" not in res["triton"], res["triton"]
    nums = list(json_numbers(res))
    assert len(nums) > 100
    bad = [(p, v) for p, v in nums if not math.isfinite(v)]
    assert not bad, bad[:5]

    # provenance
    pv = res["provenance"]
    assert pv["device"] == "cpu" and pv["versions"]["torch"] and pv["versions"]["peft"] and pv["timestamp_utc"]
    # speed: every case has both implementations and a ratio
    for case in ("train_dropout0", "train_dropout0.1", "forward_nograd", "generate_per_token"):
        d = res["speed"][case]
        assert {"peft", "ptune-rt"} <= set(d["variants"]) and d["speedup"] > 0
        assert len(d["variants"]["peft"]["runs_s"]) == 2
        lo, hi = d["speedup_ci95"]
        assert lo <= d["speedup"] <= hi
    assert res["speed"]["generate_per_token"]["same_tokens_ptune_vs_peft"]
    # bytes saved for backward: dropout regenerated from a seed saves less than PEFT's dropout copy
    mem = res["memory"]
    assert mem["dropout0.1"]["ptune-rt"]["activation_bytes"] < mem["dropout0.1"]["peft"]["activation_bytes"]
    assert mem["dropout0"]["ptune-rt"]["activation_bytes"] > 0
    # ops: every LoRA module runs as a module in a no-grad forward; in a training forward the SwiGLU
    # MLPs' down projections run inside their MLP (recompute_mlp)
    ops = res["ops"]
    n = ops["n_lora_linears"]
    from ptune_rt.ops.lora_dispatch import SMALL_BATCH_ROWS  # the quick run trains on the full run's path

    assert res["workload"]["batch"] * res["workload"]["seq"] > SMALL_BATCH_ROWS
    for step in ("forward", "decode_step", "train_forward", "train_step"):
        assert ops[step]["peft"]["compute"] > 0 and ops[step]["ptune-rt"]["compute"] > 0
    assert ops["forward"]["ptune-rt"]["lora_module_calls"] == n
    assert ops["train_forward"]["ptune-rt"]["lora_module_calls"] == n - res["workload"]["layers"]
    # the eager torch path runs plain autograd.Functions (no custom op): mm, mm, addmm_ per linear,
    # but q/k/v and gate/up train as projection groups (one cat of the A's and one shrink per group,
    # then mm + addmm_ per member): per layer 8 + 3 (o_proj) + 6 ops over the 6 linears run as modules
    assert ops["train_forward"]["ptune-rt"]["custom"] == 0
    assert ops["train_forward"]["ptune-rt"]["per_lora_linear_compute"] == pytest.approx(17 / 6)
    assert ops["forward"]["peft"]["custom"] == 0
    assert res["triton"]["compute_ops_per_lora_linear_train_forward"] >= 1
    assert res["triton"]["kernel_launches_per_lora_linear_forward"] == 2
    # FLOPs: both implementations do the same matrix products
    f = res["flops"]["train_step"]
    assert f["peft"]["total"] == f["ptune-rt"]["total"] > 0
    # analytic model
    assert len(res["analytic"]["seven_b"]["rows"]) >= 3
    # equality: ptune-rt within the project's tolerance rule vs float64, like PEFT
    eq = res["equality"]
    assert eq["logits_within_tolerance_rule"] and eq["loss_within_tolerance_rule"]
    assert eq["adapter_grads_within_tolerance_rule"]
    assert eq["lora_effect_max_abs_logit_change"] > 0
    # targets are evaluated: the 2-round speed targets inconclusive whatever was measured, counts PASS / MISS
    assert {t["unit"] for t in res["targets"]} <= {"x", "ops"} and len(res["targets"]) == 6
    check_speed_verdicts(res["targets"], rounds=2)
    check_mode_and_plan(res, "quick")
    assert set(res["plan"]["kinds"]) == {"build", "train_dropout0", "train_dropout0.1", "forward_nograd",
                                         "generate_per_token", "memory", "ops", "flops", "equality", "analytic",
                                         "triton"}
    assert res["plan"]["kinds"]["train_dropout0"]["calls"] == 2 * (0 + 2)  # 2 variants x (warm-up + rounds)

    for head in ("## Targets", "## Equality", "## Op counts", "## Analytic HBM traffic", "PEFT", "ptune-rt",
                 "inconclusive (noise)", "mode quick, finished in"):
        assert head in text
    assert "model, not a measurement" in text.lower()


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mode", ["default", "full"])
def test_bench_writes_to_ptune_rt_results_never_into_the_checkout(tmp_path, monkeypatch, mode):
    """Without --out every run writes to ./ptune-rt-results, in a checkout too (the analytic section
    alone: no model is built); the mode and its settings are recorded."""
    from ptune_rt.bench.common import default_out_dir

    committed = CHECKOUT / "bench" / "results"
    before = _tree(committed)
    monkeypatch.chdir(tmp_path)
    assert default_out_dir() == tmp_path / "ptune-rt-results"
    args = ["bench", "--sections", "analytic", "--no-progress"] + (["--full"] if mode == "full" else [])
    assert cli_main(args) == 0
    out = tmp_path / "ptune-rt-results"
    assert sorted(p.name for p in out.iterdir()) == ["lora_cpu.json", "lora_cpu.md", "lora_cpu.png"]
    res = json.loads((out / "lora_cpu.json").read_text())
    check_mode_and_plan(res, mode)
    assert (res["repeats"], res["train_block"]) == ((61, 2) if mode == "full" else (6, 1))
    assert res["analytic"] and "speed" not in res
    assert _tree(committed) == before  # nothing written into the committed results


def test_modes_fill_in_what_the_command_line_leaves_open():
    from ptune_rt.bench import lora

    full = lora.parse(["--full"])
    assert (full.mode, full.repeats, full.train_block, full.quiet_gate, full.gate_max_wait) == ("full", 61, 2, 0.85, 60)
    mixed = lora.parse(["--full", "--repeats", "3", "--gate-max-wait", "120"])  # given options win
    assert (mixed.repeats, mixed.train_block, mixed.gate_max_wait) == (3, 2, 120)
    default = lora.parse([])
    assert (default.mode, default.repeats, default.train_block, default.quiet_gate) == ("default", 6, 1, None)
    assert lora.parse(["--quick"]).mode == "quick"
    with pytest.raises(SystemExit):
        lora.parse(["--quick", "--full"])


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", "--full", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mode full: 61 timed rounds" in out and "| speed: train_dropout0 | 246 |" in out and "**total**" in out
    assert not (tmp_path / "ptune-rt-results").exists()


def test_committed_run_argv():
    from ptune_rt.bench.common import committed_run_argv

    res = Path("bench/results")
    assert committed_run_argv([], res) == ["--full", "--out", "bench/results"]
    assert committed_run_argv(["--repeats", "3"], res) == ["--full", "--repeats", "3", "--out", "bench/results"]
    assert committed_run_argv(["--out", "/tmp/x"], res) == ["--full", "--out", "/tmp/x"]
    assert committed_run_argv(["--quick"], res) == ["--quick"]  # a smoke run goes to ./ptune-rt-results


@pytest.mark.parametrize("ci, rounds, want", [
    ([1.06, 1.20], 6, "PASS"),                 # the whole interval at or above the goal
    ([1.05, 1.20], 6, "PASS"),                 # the goal itself passes (>=)
    ([0.90, 1.04], 6, "MISS"),                 # the whole interval below the goal
    ([0.10, 3.93], 6, "inconclusive (noise)"),  # the goal inside the interval
    ([1.00, 1.06], 61, "inconclusive (noise)"),
    ([1.06, 1.20], 5, "inconclusive (noise)"),  # too few rounds for any verdict
    ([0.90, 1.04], 2, "inconclusive (noise)"),
    (None, 6, "inconclusive (noise)"),          # timed, but no interval
])
def test_verdict_needs_the_interval_on_one_side_of_the_goal(ci, rounds, want):
    from ptune_rt.bench.report import judge, verdict

    assert verdict(1.1, 1.05, True, ci, rounds) == want
    row = judge(1.1, 1.05, True, ci, rounds)
    assert row["verdict"] == want and row["pass"] == {"PASS": True, "MISS": False}.get(want)
    # an at-most goal: the same interval mirrored around the goal gets the same verdict
    mirrored = [2 * 1.05 - ci[1], 2 * 1.05 - ci[0]] if ci else None
    assert verdict(1.0, 1.05, False, mirrored, rounds) == want


def test_verdict_of_exact_measurements_and_labels():
    from ptune_rt.bench.report import verdict, verdict_counts

    assert verdict(0.54, 0.60, at_least=False) == "PASS"   # bytes: no noise, judged by the value
    assert verdict(2, 1, at_least=False) == "MISS"
    assert verdict(1.3, 1.0, True, [1.1, 1.5], 6, labels=("faster", "slower")) == "faster"
    assert verdict(0.8, 1.0, True, [0.7, 0.95], 6, labels=("faster", "slower")) == "slower"
    rows = [{"verdict": v} for v in ("MISS", "PASS", "inconclusive (noise)", "PASS")]
    assert verdict_counts(rows) == "2 PASS, 1 MISS, 1 inconclusive (noise)"


def test_plan_eta_comes_from_measured_calls():
    """Each kind's cost per call becomes its measured mean; kinds not reached yet scale with how the
    measured ones compared with their priors (bounded)."""
    from ptune_rt.bench.timing import Plan, format_duration

    plan = Plan()
    plan.add("a", 4, 10.0)
    plan.add("b", 2, 30.0)
    assert plan.remaining_s() == pytest.approx(100.0)
    plan.start(disable=True)
    assert plan.eta_at_start_s == pytest.approx(100.0)
    plan.begin("a")
    plan.advance(2)  # two calls in (nearly) no time: far faster than the prior
    assert plan.per_call_s("a") < 1.0
    assert plan.machine_factor() == pytest.approx(Plan.FACTOR_RANGE[0])
    assert plan.remaining_s() == pytest.approx(2 * plan.per_call_s("a") + 2 * 30.0 * Plan.FACTOR_RANGE[0])
    plan.advance(2)
    plan.begin("b")
    plan.advance(2)
    plan.close()
    s = plan.summary()
    assert s["eta_at_start_s"] == pytest.approx(100.0) and s["wall_s"] < 5
    assert {k: v["done"] for k, v in s["kinds"].items()} == {"a": 4, "b": 2}
    with pytest.raises(KeyError):
        plan.begin("c")
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def _load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eager_swap_is_peft_without_bookkeeping():
    """bench/ceilings.py's hand-written eager swap computes PEFT's logits and its adapter gradients
    (on PEFT's own tensors), so its timing is that of the same math."""
    import torch

    from ptune_rt.bench import workload as W

    ceilings = _load_script("ceilings")
    s = W.build(W.Workload.quick(), dropout=0.0, device="cpu")
    eager = ceilings.eager_swap(s.peft)
    assert sum(isinstance(m, ceilings.EagerLoRA) for m in eager.modules()) == W.Workload.quick().n_lora_linears
    ids = s.input_ids
    grads = {}
    for name, model in (("peft", s.peft), ("eager", eager)):
        W.zero_grads(s.peft)
        model.train()
        loss = W.train_step(model, ids)
        grads[name] = (loss, [p.grad.clone() for p in W.trainable_parameters(s.peft)])
    torch.testing.assert_close(grads["eager"][0], grads["peft"][0], rtol=1e-5, atol=1e-6)
    assert len(grads["peft"][1]) == 2 * W.Workload.quick().n_lora_linears
    for g_eager, g_peft in zip(grads["eager"][1], grads["peft"][1]):
        torch.testing.assert_close(g_eager, g_peft, rtol=1e-4, atol=1e-6)


def test_ceilings_script_writes_its_table(tmp_path):
    import json

    ceilings = _load_script("ceilings")
    assert ceilings.main(["--quick", "--rounds", "2", "--cases", "lora,lora-inference", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "ceilings_cpu.json").read_text())
    assert [c["case"].split(",")[0] for c in res["cases"]] == [
        "LoRA r=8", "LoRA no-grad forward", "LoRA greedy generate"]
    for c in res["cases"]:
        assert set(c["ratio_peft_over"]) == {"ptune-rt", "eager swap", "base"}
        for n, r in c["ratio_peft_over"].items():
            lo, hi = c["ratio_peft_over_ci95"][n]
            assert r > 0 and lo <= r <= hi
    md = (tmp_path / "ceilings_cpu.md").read_text()
    assert "| eager swap vs PEFT |" in md and md.count("\n| LoRA") == 3
    with pytest.raises(SystemExit):
        ceilings.main(["--cases", "lora,nonsense", "--out", str(tmp_path)])


def test_prefix_decode_script_writes_its_table(tmp_path):
    import json

    script = _load_script("prefix_decode")
    assert script.main(["--quick", "--rounds", "2", "--loop-rounds", "3", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "prefix_decode_cpu_quick.json").read_text())
    (c,) = res["cases"]
    assert c["same_tokens"] and set(c["median_step_s"]) == set(script.VARIANTS)
    for key in ("speedup_vs_peft", "speedup_vs_concatenating"):
        lo, hi = c[f"{key}_ci95"]
        assert c[key] > 0 and lo <= c[key] <= hi
    assert all(len(v) == 2 for v in c["runs_s"].values())
    assert all(len(v) == 3 for v in c["loop"]["runs_s"].values()) and c["loop"]["speedup_vs_concatenating"] > 0
    md = (tmp_path / "prefix_decode_cpu_quick.md").read_text()
    assert md.count("\n| 4 | 16 |") == 2
    with pytest.raises(SystemExit):
        script.main(["--contexts", "a,b", "--out", str(tmp_path)])


def test_profile_script_profiles_the_benchmarked_path(capsys):
    """bench/profile_lora.py profiles ptune-rt on the path the benchmark times: with projection groups
    (fewer low-rank GEMMs than PEFT's per-layer ones), and prints its medians over rounds."""
    import re

    prof = _load_script("profile_lora")
    assert prof.main(["--case", "train", "--quick", "--gemm-shapes", "--rounds", "2", "--steps", "1",
                      "--rows", "1"]) == 0
    out = capsys.readouterr().out
    calls = {name: int(n) for name, n in re.findall(r"^(peft|ptune-rt): low-rank GEMMs [\d.]+ ms per step \((\d+) "
                                                     r"calls\)", out, re.M)}
    assert set(calls) == {"peft", "ptune-rt"} and 0 < calls["ptune-rt"] < calls["peft"]
    assert "Medians over 2 alternating rounds" in out and "| ptune-rt |" in out
