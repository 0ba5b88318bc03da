"""The suites behind ``ptune-rt bench --suite NAME``: one line each, ``name: module``.

A suite module provides ``main(argv, command_argv)`` (its own options in ``argv``; ``command_argv``
is the whole command line, recorded in the results' provenance) and ``build_parser()``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "bitfit": "ptune_rt.bench.bitfit",
    "child-tuning": "ptune_rt.bench.child_tuning",
    "dora": "ptune_rt.bench.dora",
    "lora": "ptune_rt.bench.lora",
    "mixed-tasks": "ptune_rt.bench.mixed_tasks",
    "prefix": "ptune_rt.bench.prefix",
}
DEFAULT_SUITE = "lora"


def main(argv=None) -> int:
    """Run the suite named by ``--suite`` (default: LoRA) with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--suite", choices=tuple(SUITES), default=DEFAULT_SUITE)
    chosen, rest = pick.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(f"ptune-rt bench [--suite {{{','.join(SUITES)}}}] [suite options]: one benchmark suite "
              f"(default {DEFAULT_SUITE}); the options of --suite {chosen.suite} follow.\n")
    suite = importlib.import_module(SUITES[chosen.suite])
    return suite.main(rest, command_argv=argv)
