"""``ptune-rt gpu-check`` without a GPU: the dry-run plan and report, the refusal without CUDA, the
numerics checker on tiny cases under the Triton interpreter (it passes correct results and flags a
wrong one), the timing implementations and the report on CPU, and the roofline model it uses."""
import json

import pytest
import torch

from ptune_rt.bench import analytic as A
from ptune_rt.cli import main as cli_main
from ptune_rt.gpu_check import cases as C
from ptune_rt.gpu_check import numerics, report, roofline, timing
from ptune_rt.gpu_check.plan import PlannedCase, Section, build_plan
from ptune_rt.gpu_check.run import EXIT_FAIL, EXIT_INCOMPLETE, EXIT_OK, execute, exit_code

TINY_LORA = C.LoraCase(19, 40, 24, 8, "float32")
TINY_ATTN = C.AttentionCase(2, 4, 2, 9, 9, 3, 32, "float32")
TINY_IA3 = C.IA3Case(19, 40, 24, "float32")
TINY_EMBEDDING = C.LoraEmbeddingCase(23, 50, 40, 4, "float32")
TINY_CHILD = C.ChildAdamwCase(37, 45, "float32", "F", 0.5)
TINY = [TINY_LORA, C.LoraCase(33, 40, 24, 8, "bfloat16", 0.3), C.LoraCase(1, 40, 24, 8, "float16"), TINY_ATTN,
        C.AttentionCase(2, 4, 2, 9, 9, 3, 32, "bfloat16", padding="right"),
        C.AttentionCase(3, 4, 2, 1, 12, 3, 32, "float16", padding="left"), C.GatherCase(2, 5, 3, 50, 32, 2, "float32"),
        C.DoraCase(19, 40, 24, 8, "float32"), C.DoraCase(17, 40, 24, 8, "bfloat16"),
        C.DoraCase(21, 40, 24, 8, "float16", 0.3), TINY_IA3, C.IA3Case(17, 40, 24, "bfloat16", True),
        C.IA3Case(1, 40, 24, "float16"), TINY_EMBEDDING, C.LoraEmbeddingCase(23, 50, 40, 4, "bfloat16"), TINY_CHILD,
        C.ChildAdamwCase(37, 45, "bfloat16", "D", 0.5), C.ChildAdamwCase(37, 45, "float32", "D", 0.5)]
#: outputs of a check that are not a tensor compared with the rule (mask rates, untouched entries)
MASK_ROWS = {"dropout rate", "dropped share", "outside the child"}


# ----------------------------------------------------------------------------------------
# dry run and refusal
# ----------------------------------------------------------------------------------------


def _planned(res, prefix):
    return [c for s in res["plan"]["sections"] if s["id"].startswith(prefix) for c in s["cases"]]


def test_dry_run_writes_every_planned_case(tmp_path):
    assert cli_main(["gpu-check", "--dry-run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert res["status"] == "not run: dry run" and res["numerics"] == [] and res["timings"] == []
    assert res["plan"]["estimated_total_s"] < 8 * 60
    assert all(s["budget_s"] >= s["est_s"] for s in res["plan"]["sections"])

    lora = [c for c in _planned(res, "numerics") if c["kind"] == "lora"]
    assert {(c["K"], c["N"]) for c in lora} == {(4096, 4096), (4096, 11008), (11008, 4096)}
    assert {c["M"] for c in lora} == {1, 16, 4096, 16384}
    assert {c["r"] for c in lora} == {8, 16, 64}
    assert {c["dtype"] for c in lora} == {"bfloat16", "float16", "float32"}
    assert any(c["dropout"] > 0 for c in lora) and sum(c["dropout"] > 0 for c in lora) == 1
    for K, N in ((4096, 4096), (4096, 11008)):  # the full M x r grid in bf16 on both 4096-in linears
        grid = {(c["M"], c["r"]) for c in lora if (c["K"], c["N"], c["dtype"]) == (K, N, "bfloat16")}
        assert grid >= {(M, r) for M in (1, 16, 4096, 16384) for r in (8, 16, 64)}

    attn = [c for c in _planned(res, "numerics") if c["kind"] == "attention"]
    seven_b = [c for c in attn if (c["Hq"], c["Hkv"], c["D"], c["P"]) == (32, 8, 128, 128) and c["causal"]]
    assert {c["dtype"] for c in seven_b if c["L"] == c["S"] == 4096} == {"bfloat16", "float16", "float32"}
    assert {c["dtype"] for c in seven_b if c["L"] == 1 and c["S"] == 4096} == {"bfloat16", "float16", "float32"}
    gather = [c for c in _planned(res, "numerics") if c["kind"] == "gather"]
    assert gather and all((c["V"], c["H"]) == (32000, 4096) for c in gather)
    ia3 = [c for c in _planned(res, "numerics") if c["kind"] == "ia3"]
    assert {(c["dtype"], c["feedforward"]) for c in ia3} == {(dt, ff) for dt in C.DTYPES for ff in (False, True)}
    assert {(c["K"], c["N"]) for c in ia3 if c["feedforward"]} == {(11008, 4096)}
    embedding = [c for c in _planned(res, "numerics") if c["kind"] == "lora_embedding"]
    assert {c["dtype"] for c in embedding} == set(C.DTYPES)
    assert all((c["M"], c["V"], c["H"], c["r"]) == (4096, 32000, 4096, 16) for c in embedding)
    child = [c for c in _planned(res, "numerics") if c["kind"] == "child_adamw"]
    assert {(c["dtype"], c["mode"]) for c in child} == {(dt, m) for dt in ("float32", "bfloat16") for m in "FD"}
    assert all((c["N"], c["K"]) == (11008, 4096) for c in child)

    timed = _planned(res, "timing")
    assert {(c["K"], c["N"], c["M"]) for c in timed if c["kind"] == "lora"} >= {
        (K, N, M) for K, N in ((4096, 4096), (4096, 11008)) for M in (1, 16, 4096, 16384)}
    assert any(c["kind"] == "attention" and c["L"] == 4096 and c["modes"] == ["train", "forward"] for c in timed)
    assert any(c["kind"] == "attention" and c["L"] == 1 for c in timed)

    every = _planned(res, "")
    assert md.count("not run: dry run") >= len(every)
    for c in every:
        assert c["id"] in md
    assert "model, not a measurement" in md and "Time budget per section" in md


def test_without_cuda_it_refuses_with_exit_code_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli_main(["gpu-check", "--out", str(tmp_path / "r")]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_never_writes_into_committed_results(capsys):
    from ptune_rt.bench.common import find_checkout

    root = find_checkout()
    if root is None:
        pytest.skip("not run from a checkout")
    assert cli_main(["gpu-check", "--dry-run", "--out", str(root / "bench" / "results" / "gc")]) == 2
    assert "bench" in capsys.readouterr().err and not (root / "bench" / "results" / "gc").exists()


def test_gpu_check_shows_its_own_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["gpu-check", "--help"])
    assert info.value.code == 0 and "--dry-run" in capsys.readouterr().out


def test_pytest_subset_comes_from_the_same_case_list():
    full = [c for cs in C.numerics_cases().values() for c in cs]
    small = [c for cs in C.numerics_cases("pytest").values() for c in cs]
    assert {c.kind for c in small} == {c.kind for c in full} == set(numerics.CHECKS)
    assert len(small) < len(full) and {c.dtype for c in small} == set(C.DTYPES)


# ----------------------------------------------------------------------------------------
# the checker, under the Triton interpreter
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.id)
def test_checker_passes_the_kernels_on_tiny_cases(case):
    res = numerics.check(case, "cpu")
    assert res["ok"], res["rows"]
    assert res["gold"] == "float64"
    grads = {"dq", "dk", "dv", "dprefix_k", "dprefix_v"} if getattr(case, "L", 1) > 1 else set()
    expected = {"lora": {"y", "dx", "dA", "dB"}, "dora": {"y", "dx", "dA", "dB", "dm"}, "gather": {"out", "dprompts"},
                "attention": {"out"} | grads, "ia3": {"y", "dx", "dl"}, "lora_embedding": {"y", "dA", "dB"},
                "child_adamw": {"param", "exp_avg", "exp_avg_sq"}}
    names = {r["output"] for r in res["rows"]} - MASK_ROWS
    assert names == expected[case.kind]
    if case.kind == "child_adamw":  # mode F checks its mask's drop rate, mode D the entries it leaves alone
        assert {r["output"] for r in res["rows"]} & MASK_ROWS == {"dropped share" if case.mode == "F"
                                                                  else "outside the child"}


@pytest.mark.parametrize("case,name", [(TINY_LORA, "y"), (TINY_LORA, "dA"), (TINY_ATTN, "out"),
                                       (C.DoraCase(19, 40, 24, 8, "float32"), "dm"),
                                       (TINY_ATTN, "dprefix_v"), (C.GatherCase(2, 5, 3, 50, 32, 2, "float32"),
                                                                  "dprompts"),
                                       (TINY_IA3, "dl"), (C.IA3Case(19, 40, 24, "float32", True), "y"),
                                       (TINY_EMBEDDING, "y"), (TINY_EMBEDDING, "dA"), (TINY_CHILD, "param"),
                                       (C.ChildAdamwCase(37, 45, "float32", "D", 0.5), "exp_avg_sq")])
def test_checker_flags_an_output_off_by_one_percent(case, name):
    res = numerics.check(case, "cpu", perturb=lambda n, t: t * 1.01 if n == name else t)
    assert not res["ok"]
    assert [r["output"] for r in res["rows"] if not r["ok"]] == [name]


def _tiny_plan(budget=float("inf")):
    secs = [Section("numerics_lora", [PlannedCase(TINY_LORA, 1.0)]),
            Section("numerics_attention", [PlannedCase(TINY_ATTN, 1.0)])]
    for s in secs:
        s.budget_s = budget
    return secs


def test_run_fails_loudly_on_a_numerics_miss(tmp_path):
    plan = _tiny_plan()
    res = report.start_results(plan, None, ["--out", str(tmp_path)], device="cpu")
    res.update(execute(plan, "cpu", perturb=lambda n, t: t * 1.01 if n == "y" else t, log=lambda _: None))
    assert exit_code(res) == EXIT_FAIL
    assert len(res["failures"]) == 1 and TINY_LORA.id in res["failures"][0] and ": y:" in res["failures"][0]
    res.update(status="FAIL", exit_code=EXIT_FAIL)
    report.write(res, tmp_path)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "# ptune-rt gpu-check: FAIL" in md and "FAILING:" in md and "**NO**" in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["numerics_lora"]["failed"] == 1


def test_run_passes_and_leaves_out_what_exceeds_the_budget():
    res = execute(_tiny_plan(), "cpu", log=lambda _: None)
    assert exit_code(res) == EXIT_OK and len(res["numerics"]) == 2 and all(n["ok"] for n in res["numerics"])
    res = execute(_tiny_plan(budget=0.0), "cpu", log=lambda _: None)
    assert exit_code(res) == EXIT_INCOMPLETE and len(res["skipped"]) == 2 and not res["numerics"]


# ----------------------------------------------------------------------------------------
# timings (do_bench needs CUDA: replaced by one call) and the report
# ----------------------------------------------------------------------------------------

TIMED = [(C.LoraCase(19, 40, 24, 8, "float32"), ("train", "forward")),
         (C.LoraCase(19, 40, 24, 8, "float32", 0.3), ("train",)),
         (C.AttentionCase(2, 4, 2, 9, 9, 3, 32, "float32"), ("train", "forward")),
         (C.AttentionCase(2, 4, 2, 1, 12, 3, 32, "float32"), ("forward",)),
         (C.GatherCase(2, 5, 3, 50, 32, 1, "float32"), ("train", "forward")),
         (C.DoraCase(19, 40, 24, 8, "float32"), ("train", "forward"))]


@pytest.mark.parametrize("case", [c for c, _ in TIMED if not getattr(c, "dropout", 0)], ids=lambda c: c.id)
def test_timed_implementations_compute_the_same_thing(case):
    impls, grad = timing.BUILDERS[case.kind](case, "cpu")
    assert timing._agreement(impls) < 1e-5  # ptune-rt vs PEFT's module / path, same weights
    with torch.no_grad():
        ours = impls["ptune-rt"].run(False)
        if impls["eager"] is not None:
            torch.testing.assert_close(impls["eager"].run(False), ours, rtol=1e-5, atol=1e-5)
    grads = {}
    for name, impl in impls.items():
        if impl is None or case.kind == "attention" and case.L == 1:
            continue
        impl.prepare(True)
        impl.run(True).backward(grad)
        grads[name] = [t.grad.clone() for t in impl.leaves[:3]]  # the leaves all three share first
        for t in impl.leaves:
            t.grad = None
    for name, g in grads.items():
        for a, b in zip(g, grads["ptune-rt"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_peft_module_keeps_fp32_adapters_on_a_half_base():
    layer = timing.peft_lora_linear(C.LoraCase(4, 40, 24, 8, "bfloat16"), "cpu")
    assert layer.base_layer.weight.dtype == torch.bfloat16 and not layer.base_layer.weight.requires_grad
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32


def test_timing_rows_and_report_with_plot(tmp_path, monkeypatch):
    calls = []

    def one_call(fn, grad_to_none=None):
        fn()
        calls.append(fn)
        return {"median_ms": 2.0 if len(calls) % 3 == 2 else 1.0, "q20_ms": 0.9, "q80_ms": 2.2}

    monkeypatch.setattr(timing, "bench", one_call)
    plan = [Section("timing_lora", [PlannedCase(c, 1.0, m) for c, m in TIMED[:2]]),
            Section("timing_attention", [PlannedCase(c, 1.0, m) for c, m in TIMED[2:4]]),
            Section("timing_gather", [PlannedCase(c, 1.0, m) for c, m in TIMED[4:5]]),
            Section("timing_dora", [PlannedCase(c, 1.0, m) for c, m in TIMED[5:]])]
    for s in plan:
        s.budget_s = float("inf")
    res = report.start_results(plan, None, [], device="cpu")
    res.update(execute(plan, "cpu", A.H200, log=lambda _: None))
    assert not res["failures"], res["failures"]
    rows = res["timings"]
    assert len(rows) == 3 * sum(len(m) for _, m in TIMED)
    timed = [r for r in rows if "median_ms" in r]
    assert all(r["bound_us"] > 0 and 0 < r["fraction_of_bound"] for r in timed)
    assert {r["speedup_vs_peft"] for r in timed if r["impl"] == "PEFT"} == {1.0}
    untimed = [r for r in rows if r["kind"] == "gather" and r["impl"] == "eager"]  # the per-element Python loop
    assert [r for r in rows if "median_ms" not in r] == untimed
    res.update(status="PASS", exit_code=0)
    paths = report.write(res, tmp_path)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Timings" in md and "% of bound" in md and TIMED[0][0].id in md
    pytest.importorskip("matplotlib")
    assert tmp_path / "gpu_check.png" in paths and (tmp_path / "gpu_check.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------
# the roofline model
# ----------------------------------------------------------------------------------------


def test_roofline_model_is_picked_by_device_name():
    assert A.hardware_for("NVIDIA H200")[0] is A.H200
    assert A.hardware_for("NVIDIA H100 80GB HBM3")[0] is A.H100_SXM
    hw, note = A.hardware_for("NVIDIA A100-SXM4-80GB")
    assert hw is A.H100_SXM and "stands in" in note
    assert A.H200["peak_flops"] == 989e12 and A.H200["hbm_bytes_per_s"] == 4.8e12


def test_peft_chain_runs_its_low_rank_path_in_fp32_adapters():
    M, K, N, r = 8192, 4096, 4096, 16
    fp32_adapters = A._chain(A.unfused_kernels(M, K, N, r, e=2), A.H100_SXM)
    half_adapters = A._chain(A.unfused_kernels(M, K, N, r, e=2, a=2), A.H100_SXM)
    names = [k.name for k in A.unfused_kernels(M, K, N, r, e=2)]
    assert "cast x to the adapter dtype" in names and "cast y back to the base dtype" in names
    # the B GEMM writes an fp32 M x N term; scale and add read and write it in fp32
    assert fp32_adapters["bytes"] - half_adapters["bytes"] > 4 * M * N * 2
    # an fp32 model has no casts: the same chain as before
    assert not any("cast" in k.name for k in A.unfused_kernels(M, K, N, r, e=4))


@pytest.mark.parametrize("r", [8, 16, 64])
def test_fused_epilogue_costs_six_bf16_mmas_per_flop(r):
    M, K, N = 8192, 4096, 4096
    gemm = A.fused_kernels(M, K, N, r)[1]
    base = 2 * M * N * K / A.H100_SXM["peak_flops"]
    assert gemm.tf32x3_flops == 2 * M * N * r
    assert gemm.flop_time_s(A.H100_SXM) == pytest.approx(base * (1 + 6 * r / K))


def test_bounds_for_every_planned_timing_case():
    for sec in build_plan(sections=("timing",)):
        for p in sec.cases:
            b = roofline.bounds(p.case, A.H200)
            for impl in ("ptune-rt", "PEFT", "eager"):
                assert all(b[impl][m] > 0 for m in p.modes), (p.case.id, impl)
            if p.case.kind != "lora" or p.case.M >= 4096:  # where bytes matter, fused moves fewer
                assert all(b["ptune-rt"][m] < b["PEFT"][m] for m in p.modes), p.case.id
