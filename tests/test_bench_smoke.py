"""Smoke test of ``ptune-rt bench --quick``: every section is produced, with finite numbers, plus the
markdown report and the plot. No timing assertions (timings on a shared CPU mean nothing here)."""
import json
import math

from ptune_rt.cli import main as cli_main

SECTIONS = ("provenance", "workload", "equality", "speed", "memory", "ops", "flops", "analytic", "triton", "targets")


def _numbers(obj, where="results"):
    """Yield (path, number) for every int/float in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def test_bench_quick_writes_every_section(tmp_path):
    rc = cli_main(["bench", "--quick", "--out", str(tmp_path), "--repeats", "2", "--warmup", "0", "--no-progress"])
    assert rc == 0
    js, md, png = (tmp_path / f"lora_cpu_quick.{ext}" for ext in ("json", "md", "png"))
    for f in (js, md, png):
        assert f.is_file() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(js.read_text())
    for sec in SECTIONS:
        assert res.get(sec), f"section {sec!r} missing or empty"
    assert "error" not in res["triton"], res["triton"]
    nums = list(_numbers(res))
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
    assert res["speed"]["generate_per_token"]["same_tokens_ptune_vs_peft"]
    # bytes saved for backward: dropout regenerated from a seed saves less than PEFT's dropout copy
    mem = res["memory"]
    assert mem["dropout0.1"]["ptune-rt"]["activation_bytes"] < mem["dropout0.1"]["peft"]["activation_bytes"]
    assert mem["dropout0"]["ptune-rt"]["activation_bytes"] > 0
    # ops: in a training forward ptune-rt's fused op is dispatched once per LoRA linear
    ops = res["ops"]
    n = ops["n_lora_linears"]
    for step in ("forward", "decode_step", "train_forward", "train_step"):
        assert ops[step]["peft"]["compute"] > 0 and ops[step]["ptune-rt"]["compute"] > 0
    # the eager torch path runs a plain autograd.Function (no custom op): mm, mm, addmm_ per linear
    assert ops["train_forward"]["ptune-rt"]["custom"] == 0
    assert ops["train_forward"]["ptune-rt"]["per_lora_linear_compute"] == 3
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

    text = md.read_text()
    for head in ("## Targets", "## Equality", "## Op counts", "## Analytic HBM traffic", "PEFT", "ptune-rt"):
        assert head in text
    assert "model, not a measurement" in text.lower()
