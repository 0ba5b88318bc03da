"""The Triton kernels ship as ptune_rt.kernels only: a top-level ``kernels`` module would shadow
Hugging Face's own ``kernels`` package, which transformers probes."""
import os
import subprocess
import sys

PROBE = ("import importlib.util as u, ptune_rt, ptune_rt.kernels.lora, ptune_rt.kernels.prefix_attention;"
         "print(u.find_spec('kernels') is None, ptune_rt.kernels.__name__)")


def _run(cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_no_top_level_kernels_module(tmp_path):
    assert _run(tmp_path) == ["True", "ptune_rt.kernels"]


def test_transformers_does_not_see_a_kernels_package(tmp_path):
    code = "import ptune_rt; from transformers.utils import is_kernels_available; print(is_kernels_available())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "False", proc.stdout + proc.stderr[-2000:]
