"""Prefix-tuning benchmark script: regenerates the committed ``bench/results/prefix_cpu.*`` (``ptune-rt bench
--suite prefix --full --out bench/results``); any other options pass through.

    python bench/bench_prefix.py                              # the committed run: --full, into bench/results
    python bench/bench_prefix.py --long-train-repeats 3       # fewer runs of the slowest case
    python bench/bench_prefix.py --quick --out /tmp/b         # tiny shapes

The runner lives in the package (``ptune_rt.bench.prefix``) so the command works from a plain
install; ``ptune-rt bench`` itself writes to ./ptune-rt-results and never into bench/results unless told to.
"""
import sys
from pathlib import Path

from ptune_rt.bench.common import committed_run_argv
from ptune_rt.bench.prefix import main

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
