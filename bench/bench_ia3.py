"""IA3 benchmark script: regenerates ``bench/results/ia3_cpu.*`` (``python -m ptune_rt.bench.ia3 --full
--out bench/results``); any other options pass through.

    python bench/bench_ia3.py                       # the committed run: --full, into bench/results
    python bench/bench_ia3.py --quick --out /tmp/b  # tiny shapes

The runner lives in the package (``ptune_rt.bench.ia3``) so the command works from a plain install.
"""
import sys
from pathlib import Path

from ptune_rt.bench.common import committed_run_argv
from ptune_rt.bench.ia3 import main

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
