"""The README's quick start runs as written."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 LoRA modules" in proc.stdout
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()


def test_readme_opens_with_the_two_commands_ci_runs():
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert "ptune-rt bench" in blocks[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1] in ci  # .ci/run runs the README's test command exactly
