"""Smoke test of ``ptune-rt bench --quick``: every section is produced, with finite numbers, plus the
markdown report and the plot. No timing assertions (timings on a shared CPU mean nothing here)."""
import math

import pytest

from helpers_bench import json_numbers, run_quick

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
    # targets are evaluated (PASS or MISS, whatever was measured)
    assert {t["unit"] for t in res["targets"]} <= {"x", "ops"} and len(res["targets"]) == 6

    for head in ("## Targets", "## Equality", "## Op counts", "## Analytic HBM traffic", "PEFT", "ptune-rt"):
        assert head in text
    assert "model, not a measurement" in text.lower()


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
