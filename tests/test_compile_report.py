"""``ptune-rt compile-report``: every shipped kernel config compiles for sm_80 and sm_90 with no
spills, and the parts of the report that could silently pass are checked on their own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ptune_rt.compile_report import collect_variants, i32_index_offsets, main, mma_summary, parse_ptxas
from ptune_rt.kernels._aot import specialize_arg

PTXAS_SPILLING = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fused_lowrank_matmul_kernel' for 'sm_90a'
ptxas info    : Function properties for _fused_lowrank_matmul_kernel
    112 bytes stack frame, 96 bytes spill stores, 128 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 112 bytes cumulative stack size
ptxas info    : Compile time = 180.880 ms
"""

PTXAS_CLEAN = """\
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 472 bytes cmem[0]
"""


def test_parse_ptxas_sees_spills():
    r = parse_ptxas(PTXAS_SPILLING)
    assert r["registers"] == 255
    assert (r["spill_stores"], r["spill_loads"], r["stack_frame"]) == (96, 128, 112)
    r = parse_ptxas(PTXAS_CLEAN)
    assert (r["registers"], r["spill_stores"], r["spill_loads"], r["static_smem"]) == (168, 0, 0, 1024)


def test_parse_ptxas_rejects_output_without_register_count():
    with pytest.raises(ValueError, match="registers"):
        parse_ptxas("ptxas info    : 0 bytes gmem\n")


def test_mma_summary_reads_operand_types():
    ptx = ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd2, %rd3, p, 1, 1, 0, 1;\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
           "wgmma.fence.sync.aligned;\n")
    assert mma_summary(ptx) == {"wgmma": ["bf16"], "mma": ["tf32"]}
    assert mma_summary("fma.rn.f32 %f1, %f2, %f3, %f4;") == {"wgmma": [], "mma": []}


TTIR_OFFSETS = """\
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %0 = arith.muli %pid, %c64_i32 : i32 loc(#loc2)
    %1 = tt.splat %0 : i32 -> tensor<64xi32> loc(#loc3)
    %2 = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc4)
    %3 = arith.addi %1, %2 : tensor<64xi32> loc(#loc5)
    %4 = arith.muli %3, %stride : tensor<64xi32> loc(#loc6)
    %5 = tt.splat %x_ptr : !tt.ptr<f16> -> tensor<64x!tt.ptr<f16>> loc(#loc7)
    %x_ptrs = tt.addptr %5, %4 : tensor<64x!tt.ptr<f16>>, tensor<64xi32> loc(#loc8)
    %6 = arith.extsi %0 : i32 to i64 loc(#loc9)
    %7 = arith.muli %6, %stride64 : i64 loc(#loc10)
    %8 = tt.addptr %y_ptr, %7 : !tt.ptr<f16>, i64 loc(#loc11)
    %9 = arith.muli %2, %stride_t : tensor<64xi32> loc(#loc12)
    %10 = tt.splat %8 : !tt.ptr<f16> -> tensor<64x!tt.ptr<f16>> loc(#loc13)
    %y_ptrs = tt.addptr %10, %9 : tensor<64x!tt.ptr<f16>>, tensor<64xi32> loc(#loc14)
    %task = tt.load %task_ptr : !tt.ptr<i32> loc(#loc15)
    %11 = arith.muli %task, %stride_t : i32 loc(#loc16)
    %12 = tt.addptr %p_ptr, %11 : !tt.ptr<f32>, i32 loc(#loc17)
"""


def test_i32_index_offsets_finds_pid_and_loaded_index_products():
    """A 32-bit offset fed by a program id (x_ptrs) or a loaded task id (%12) is flagged; an int64
    tile origin plus 32-bit in-tile offsets (y_ptrs) is not."""
    bad = i32_index_offsets(TTIR_OFFSETS)
    assert len(bad) == 2, bad
    assert bad[0].startswith("%x_ptrs = tt.addptr") and bad[1].startswith("%12 = tt.addptr")


def test_specialization_matches_triton_launcher():
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend
    import torch
    values = [0, 1, 7, 16, -16, 2**31 - 16, 2**31, 2**63, 0.5, True,
              torch.empty(4, dtype=torch.float16), torch.empty(8, dtype=torch.bfloat16)[1:],
              torch.empty((4, 4), dtype=torch.float32, device="meta").t()]
    for v in values:
        for spec, align in ((True, True), (False, True), (True, False)):
            assert specialize_arg(v, specialize=spec, align=align) == \
                tuple(native(BaseBackend, v, False, spec, align)), (v, spec, align)


def test_checks_flag_spills_shared_memory_and_missing_tensor_cores():
    from ptune_rt.compile_report import AotVariant, check_result
    v = AotVariant("k", None, {}, {}, {}, 4, 3, "bf16 fwd", "64x64", mma_dtypes=("bf16",), wgmma_on_sm90=True)
    clean = {"arch": 90, "aligned": True, "ok": True, "registers": 128, "spill_stores": 0, "spill_loads": 0,
             "shared": 1024, "wgmma": ["bf16"], "mma": []}
    assert check_result(v, clean) == []
    problems = check_result(v, {**clean, "spill_stores": 8, "shared": 300_000, "wgmma": [], "mma": ["f32"]})
    assert len(problems) == 4
    assert any("spills (8 bytes stored" in p for p in problems)
    assert any("shared memory" in p for p in problems)
    assert any("bf16" in p and "tensor-core" in p for p in problems)
    assert any("no wgmma" in p for p in problems)
    # the unaligned fallback only has to compile
    assert check_result(v, {**clean, "aligned": False, "spill_stores": 8}) == []
    assert check_result(v, {**clean, "aligned": False, "ok": False, "error": "boom"})


def test_unknown_kernel_filter_is_an_error(capsys):
    assert main(["--kernel", "no_such_kernel"]) == 2
    assert "no kernel variant" in capsys.readouterr().err


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The full report for sm_80 and sm_90, run the way CI runs it (the test environment has
    TRITON_INTERPRET=1, which the report must cope with)."""
    out = tmp_path_factory.mktemp("compile_report") / "report.json"
    assert os.environ.get("TRITON_INTERPRET") == "1"
    proc = subprocess.run([sys.executable, "-m", "ptune_rt.cli", "compile-report", "--arch", "sm_80,sm_90",
                           "--json", str(out)], capture_output=True, text=True, timeout=3600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_report_passes(report):
    proc, data = report
    assert proc.returncode == 0, f"compile-report failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert data is not None and not data["problems"]
    assert "compile-report: OK" in proc.stdout


def test_every_aligned_build_is_measured_and_spill_free(report):
    _, data = report
    aligned = [r for r in data["results"] if r["aligned"]]
    assert aligned
    for r in aligned:
        assert r["ok"], r
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    fallback = [r for r in data["results"] if not r["aligned"]]
    assert fallback and all(r["ok"] and r["registers"] > 0 for r in fallback)


def test_every_shipped_config_is_covered(report):
    from ptune_rt.kernels import lora as L
    from ptune_rt.kernels.lora_aot import _config_name
    _, data = report
    seen = {(r["kernel"], r["config"], r["arch"], r["label"].split()[0]) for r in data["results"] if r["aligned"]}
    for dtype, short in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for kernel, configs, block_rs in (
                ("_fused_lowrank_matmul_kernel", L.fused_configs(dtype) + [L.FUSED_DECODE_CONFIG], L.FUSED_BLOCK_R),
                ("_skinny_matmul_kernel", L.SKINNY_CONFIGS + [L.SKINNY_DECODE_CONFIG], L.SKINNY_BLOCK_R)):
            for config in configs:
                for block_r in block_rs:
                    for arch in ("sm_80", "sm_90a"):
                        assert (kernel, _config_name(config, block_r), arch, short) in seen, \
                            (kernel, str(config), block_r, arch, short)


def test_every_shipped_prefix_attention_config_is_covered(report):
    """Every configuration the runtime can launch is built: each kernel x each of its shipped configs
    for that activation dtype and head dim (fp32 has its own lists, smaller at the 128-wide head tile)
    x every head dim of HEAD_DIMS x fp16 / bf16 / fp32 (fp32 with IEEE and with TF32 dots) x sm_80 /
    sm_90."""
    import torch

    from ptune_rt.kernels import prefix_attention as PA

    def parts(label):  # "fp16 D64 fwd causal", "fp32 tf32 D128 bwd dq ...": (dtype, dot precision, head dim)
        words = label.split()
        head = next((w for w in words if w[:1] == "D" and w[1:].isdigit()), None)
        return words[0], "tf32" if words[1] == "tf32" else "ieee", head

    _, data = report
    seen = {(r["kernel"], r["config"], r["arch"], *parts(r["label"])) for r in data["results"]
            if r["aligned"] and r["kernel"].startswith("_attn")}
    kernels = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
    cases = [(torch.float16, "fp16", "ieee"), (torch.bfloat16, "bf16", "ieee"), (torch.float32, "fp32", "ieee"),
             (torch.float32, "fp32", "tf32")]
    for name, kernel in kernels.items():
        for dtype, short, precision in cases:
            for head_dim in PA.HEAD_DIMS:
                for config in PA.shipped_configs(name, dtype, head_dim):
                    for arch in ("sm_80", "sm_90a"):
                        want = (kernel, str(config), arch, short, precision, f"D{head_dim}")
                        assert want in seen, want


def test_every_shipped_input_builder_config_is_covered(report):
    from ptune_rt.kernels import prompt_inputs as PI
    _, data = report
    seen = {(r["kernel"], r["config"], r["arch"], r["label"]) for r in data["results"] if r["aligned"]}
    for config in PI.CONFIGS:
        for arch in ("sm_80", "sm_90a"):
            for dtype in ("fp16", "bf16", "fp32"):
                for tasks in ("one task", "tasks"):  # one prompt, and a per-row task stack
                    want = ("_build_inputs_kernel", str(config), arch, f"{dtype} {tasks}")
                    assert want in seen, want


def test_sm90_half_gemms_use_wgmma_and_keep_their_dtype(report):
    _, data = report
    fused = [r for r in data["results"] if r["aligned"] and r["kernel"] == "_fused_lowrank_matmul_kernel"]
    half = [r for r in fused if r["label"].split()[0] in ("fp16", "bf16")]
    assert half
    for r in half:
        dtype = {"fp16": "f16", "bf16": "bf16"}[r["label"].split()[0]]
        assert dtype in r["wgmma"] + r["mma"], r  # bf16 dots stay bf16 on tensor cores
        block_m = int(r["config"].split("x")[0])
        if r["arch"] == "sm_90a" and block_m >= 64:  # a warpgroup tile: must be wgmma
            assert r["wgmma_on_sm90"] and dtype in r["wgmma"], r
    assert any(r["arch"] == "sm_90a" and r["wgmma"] for r in half)


def test_variant_lists_agree_with_and_without_interpreter():
    """The report lists variants under TRITON_INTERPRET=1, its workers without it."""
    here = [v.key for v in collect_variants()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from ptune_rt.compile_report import collect_variants; print('\\n'.join(v.key for v in collect_variants()))"
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert here == there.stdout.splitlines()
