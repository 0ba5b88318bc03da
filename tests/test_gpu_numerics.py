"""``pytest -m gpu``: gpu-check's numerics on CUDA (its case list, pytest-sized, and its checker).

The cases are ``ptune_rt.gpu_check.cases.numerics_cases("pytest")`` and the checker is
``ptune_rt.gpu_check.numerics.check``, run through ``ptune-rt gpu-check --subset pytest --sections
numerics`` once per session in a child process: this suite's conftest sets TRITON_INTERPRET=1 for
the CPU tests before any kernel is decorated, and on a GPU the kernels must run compiled. Each case
is one test; without CUDA they skip.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ptune_rt.gpu_check.cases import numerics_cases

pytestmark = pytest.mark.gpu

CASES = [c for cs in numerics_cases("pytest").values() for c in cs]


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path_factory.mktemp("gpu-check")
    cmd = [sys.executable, "-m", "ptune_rt.cli", "gpu-check", "--subset", "pytest", "--sections", "numerics",
           "--budget-s", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True,
                          timeout=1800)
    path = out / "gpu_check.json"
    assert path.exists(), (f"gpu-check wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    res = json.loads(path.read_text())
    return {n["case"]: n for n in res["numerics"]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_within_tolerance_on_gpu(gpu_results, case):
    res = gpu_results[case.id]
    assert not res.get("error"), res["error"]
    bad = [f"{r['output']}: " + r.get("error", f"error {r['err']:.3e} > bound {r['bound']:.3e}")
           for r in res["rows"] if not r["ok"]]
    assert res["ok"] and not bad, bad
