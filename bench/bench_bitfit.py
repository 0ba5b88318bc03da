"""BitFit benchmark script: the same run as ``ptune-rt bench --suite bitfit`` (all options pass through).

    python bench/bench_bitfit.py                              # full CPU/CUDA run into bench/results
    python bench/bench_bitfit.py --models bert --repeats 11   # one model, fewer rounds
    python bench/bench_bitfit.py --quick --out /tmp/b         # tiny shapes

The runner lives in the package (``ptune_rt.bench.bitfit``) so the command works from a plain
install; this script only calls it.
"""
import sys

from ptune_rt.bench.bitfit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
