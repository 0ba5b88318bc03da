"""What every ``ptune-rt bench`` suite shares: where results go, what a run ran on (provenance),
the common command-line options, the run modes (``--quick`` / default / ``--full``) and waiting for a
quiet machine."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional


def _looks_like_checkout(d: Path) -> bool:
    return (d / "setup.py").is_file() and (d / "ptune_rt").is_dir() and (d / "bench").is_dir()


def find_checkout() -> Optional[Path]:
    """The source checkout this runs from: the package's own parent (editable install) or the cwd."""
    import ptune_rt

    pkg_parent = Path(ptune_rt.__file__).resolve().parent.parent
    for d in (pkg_parent, Path.cwd().resolve()):
        if _looks_like_checkout(d):
            return d
    return None


#: Where a run writes unless ``--out`` says otherwise, relative to the working directory. Never the
#: committed ``bench/results`` of a checkout: a run writes there only when asked (``--out bench/results``).
DEFAULT_OUT = "ptune-rt-results"


def default_out_dir() -> Path:
    """``./ptune-rt-results`` in the working directory, for every suite."""
    return Path.cwd() / DEFAULT_OUT


def _git(root: Optional[Path], *args) -> Optional[str]:
    if root is None:
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:
        return None


def provenance(device, argv) -> dict:
    import torch

    import ptune_rt

    root = find_checkout()
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev_name = torch.cuda.get_device_name(dev)
    else:
        dev_name = _cpu_name()
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": dev_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"ptune_rt": ptune_rt.__version__, "torch": torch.__version__, "triton": _version("triton"),
                     "transformers": _version("transformers"), "peft": _version("peft"),
                     "matplotlib": _version("matplotlib")},
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "command": "ptune-rt bench " + " ".join(argv),
    }


def add_common_arguments(p: argparse.ArgumentParser, *, max_wait: float, full: Optional[str] = None,
                         plan: bool = False) -> None:
    """The options every ``ptune-rt bench`` suite takes, with one meaning each: --quick, --out,
    --device, --threads, --no-progress, --wait-for-load and --max-wait (default ``max_wait``).

    A suite with a ``--full`` mode (the configuration of its committed results) passes ``full``, the
    help text saying what it runs; ``plan=True`` adds ``--dry-run`` (print the plan and its time
    estimate, run nothing)."""
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, seconds)")
    if full is not None:
        modes.add_argument("--full", action="store_true", help=full)
    if plan:
        p.add_argument("--dry-run", action="store_true",
                       help="print what the run would do and its time estimate, then stop (nothing runs or is written)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default: ./{DEFAULT_OUT}; a checkout's committed bench/results only "
                        "when given as --out bench/results)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                   help="CPU runs: first wait (up to --max-wait s) until the 1-minute load average is below LOAD")
    p.add_argument("--max-wait", type=float, default=max_wait, help="longest wait for --wait-for-load (s)")


def wait_for_quiet(load: float, max_wait: float) -> dict:
    """Sleep until the 1-minute load average drops below ``load`` (or ``max_wait`` passes)."""
    t0 = time.monotonic()
    while True:
        cur = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if cur < load or waited >= max_wait:
            return {"threshold": load, "waited_s": waited, "load_when_started": cur, "quiet": cur < load}
        time.sleep(10)


# ----------------------------------------------------------------------------------------
# run modes
# ----------------------------------------------------------------------------------------

#: --quick: tiny shapes, seconds (a smoke test); default: the suite's real shapes sized to finish in
#: under 5 minutes on a 2-core CPU; --full: the configuration of the suite's committed results.
RUN_MODES = ("quick", "default", "full")


def run_mode(args: argparse.Namespace) -> str:
    """``quick``, ``full`` or ``default``: which of :data:`RUN_MODES` the parsed options ask for."""
    if getattr(args, "quick", False):
        return "quick"
    return "full" if getattr(args, "full", False) else "default"


def given_options(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the options ``argv`` gives explicitly (whatever their value)."""
    unset = object()
    ns = argparse.Namespace(**{d: unset for d in vars(parser.parse_args([]))})  # argparse keeps what is set
    return {d for d, v in vars(parser.parse_args(list(argv), namespace=ns)).items() if v is not unset}


def resolve_mode(args: argparse.Namespace, parser: argparse.ArgumentParser, argv, settings: dict) -> str:
    """Fill in the run mode's settings (``settings[mode]``: option destination -> value) wherever the
    command line did not give that option itself; set and return ``args.mode``."""
    mode = run_mode(args)
    given = given_options(parser, argv)
    for dest, value in settings.get(mode, {}).items():
        if dest not in given:
            setattr(args, dest, value)
    args.mode = mode
    return mode


def committed_run_argv(argv, results_dir: Path) -> list:
    """The arguments a ``bench/bench_<suite>.py`` script runs its suite with: the run behind the
    committed results (``--full``, written into ``results_dir``) unless the command line chooses a
    mode or an output directory itself; a ``--quick`` run is left to the default output directory."""
    argv = list(argv)
    if "--quick" in argv:
        return argv
    if "--full" not in argv:
        argv.insert(0, "--full")
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(results_dir)]
    return argv
