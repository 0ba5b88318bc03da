"""BitFit benchmark script: regenerates the committed ``bench/results/bitfit_cpu.*`` (``ptune-rt bench
--suite bitfit --full --out bench/results``); any other options pass through.

    python bench/bench_bitfit.py                              # the committed run: --full, into bench/results
    python bench/bench_bitfit.py --models bert --repeats 11   # --full, one model, fewer rounds
    python bench/bench_bitfit.py --quick --out /tmp/b         # tiny shapes

The runner lives in the package (``ptune_rt.bench.bitfit``) so the command works from a plain
install; ``ptune-rt bench`` itself writes to ./ptune-rt-results and never into bench/results unless told to.
"""
import sys
from pathlib import Path

from ptune_rt.bench.bitfit import main
from ptune_rt.bench.common import committed_run_argv

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
