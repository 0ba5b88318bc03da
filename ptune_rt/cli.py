"""The ``ptune-rt`` command line: bench (the main job), check, compile-report, gpu-check."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptune-rt", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", add_help=False,
                   help="numerical-equality report of every kernel vs its eager reference (ptune-rt check --help)")
    sub.add_parser("bench", add_help=False,
                   help="benchmark + equality report, HF PEFT vs ptune-rt: --suite lora (default), prefix, "
                        "mixed-tasks or bitfit (ptune-rt bench --help)")
    sub.add_parser("compile-report", add_help=False,
                   help="compile every shipped kernel config for sm_80/sm_90 without a GPU and report "
                        "registers, spills and shared memory (ptune-rt compile-report --help)")
    sub.add_parser("gpu-check", add_help=False,
                   help="GPU acceptance run: numerics at 7B-class shapes vs float64, timings vs HF PEFT with the "
                        "roofline model, JSON + markdown + plot (ptune-rt gpu-check --help)")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "check":
        from ptune_rt.check import main as run
    elif args.cmd == "bench":
        from ptune_rt.bench.suites import main as run
    elif args.cmd == "gpu-check":
        from ptune_rt.gpu_check import main as run
    else:  # compile-report (argparse refuses any other command)
        from ptune_rt.compile_report import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
