import subprocess
import sys


def test_check_command_reports_every_kernel_case_and_passes():
    proc = subprocess.run([sys.executable, "-m", "ptune_rt.cli", "check"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    passed, failed = int(last.split()[0]), int(last.split()[2])
    assert failed == 0 and passed >= 96, last
    assert "Triton interpreter on CPU" in proc.stdout
