"""Smoke test of the IA3 benchmark (``python -m ptune_rt.bench.ia3 --quick``): both variants in both
phases, equality of PEFT's and ptune-rt's IA3, ratios with intervals and honest verdicts, the
analytic bytes (fused below PEFT's chain), the markdown report and the plot. No timing assertions."""
import json
import math

from helpers_bench import json_numbers

from ptune_rt.bench import ia3


def test_bench_ia3_quick(tmp_path):
    assert ia3.main(["--quick", "--repeats", "3", "--warmup", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "ia3_cpu_quick.json").read_text())
    text = (tmp_path / "ia3_cpu_quick.md").read_text()
    assert (tmp_path / "ia3_cpu_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isfinite(v) for _, v in json_numbers(res))
    eq = res["equality"]
    assert eq["same_parameters"] and eq["vectors"] == 3 * res["workload"]["layers"]
    assert eq["max_abs_logits"] <= 1e-4 and eq["max_abs_vector_grads"] <= 1e-4
    for phase in ia3.PHASES:
        s = res["speed"][phase]
        assert all(len(s["runs_s"][n]) == 3 for n in ia3.VARIANTS)
        lo, hi = s["ratio"]["ci95"]
        assert lo <= s["ratio"]["ratio"] <= hi and s["ratio"]["verdict"].startswith("inconclusive")
    for shapes in res["hbm_bytes"].values():
        for phase in shapes.values():
            assert 0 < phase["model_fused"] < phase["model_peft"]
    assert "## Summary" in text and "Analytic HBM bytes" in text


def test_analytic_bytes_count_peft_s_extra_round_trip():
    e, M, K, N = 2, 10, 6, 4
    out = ia3.layer_bytes(M, K, N, False, e, training=False)
    assert out["peft"] - out["fused"] == 2 * e * M * N  # PEFT writes the base output and reads it back
    ff = ia3.layer_bytes(M, K, N, True, e, training=True)
    assert ff["peft"] - ff["fused"] == 2 * e * M * K  # x * l written and read back
    assert ia3.layer_bytes(M, K, N, False, e, training=True)["fused"] == out["fused"] + e * M * N  # z_out
