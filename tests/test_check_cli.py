import json
import subprocess
import sys


def test_check_command_reports_kernel_cases_and_passes(tmp_path):
    out = tmp_path / "check.json"
    # run outside the checkout, so the installed package (not the source tree) is what runs
    proc = subprocess.run([sys.executable, "-m", "ptune_rt.cli", "check", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    passed, failed = int(last.split()[0]), int(last.split()[2])
    # --quick: 2 cases x 3 dtypes per kernel; LoRA checks 4 outputs, attention 7, IA3 and the LoRA
    # embedding 3 each.
    assert failed == 0 and passed == 2 * 3 * 4 + 2 * 3 * 7 + 2 * 3 * 3 + 2 * 3 * 3, last
    assert "Triton interpreter on CPU" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"lora", "prefix", "ia3", "lora_embedding"} and all(r["ok"] for r in rows)
    assert {r["output"] for r in rows if r["kernel"] == "ia3"} == {"y", "dx", "dl"}
    assert {r["output"] for r in rows if r["kernel"] == "lora_embedding"} == {"y", "dA", "dB"}
    assert all(r["err"] <= r["bound"] for r in rows)


def test_every_command_shows_its_own_options(capsys):
    """``ptune-rt <command> --help`` is the command's own help (its options), not a stub."""
    import pytest

    from ptune_rt.cli import main

    for cmd, option in (("check", "--quick"), ("bench", "--repeats"), ("compile-report", "--arch")):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert option in capsys.readouterr().out, cmd
