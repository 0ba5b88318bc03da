"""Prefix-tuning benchmark script: the same run as ``ptune-rt bench --suite prefix`` (all options pass through).

    python bench/bench_prefix.py                              # full CPU/CUDA run into bench/results
    python bench/bench_prefix.py --long-train-repeats 3       # fewer runs of the slowest case
    python bench/bench_prefix.py --quick --out /tmp/b         # tiny shapes

The runner lives in the package (``ptune_rt.bench.prefix``) so the command works from a plain
install; this script only calls it.
"""
import sys

from ptune_rt.bench.prefix import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
