"""DoRA benchmark script: regenerates the committed ``bench/results/dora_cpu.*`` (``ptune-rt bench
--suite dora --full --out bench/results``); any other options pass through.

    python bench/bench_dora.py                          # the committed run: --full, into bench/results
    python bench/bench_dora.py --repeats 11             # --full, fewer rounds
    python bench/bench_dora.py --quick --out /tmp/d     # tiny shapes

The runner lives in the package (``ptune_rt.bench.dora``) so the command works from a plain install;
``ptune-rt bench`` itself writes to ./ptune-rt-results and never into bench/results unless told to.
"""
import sys
from pathlib import Path

from ptune_rt.bench.common import committed_run_argv
from ptune_rt.bench.dora import main

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
