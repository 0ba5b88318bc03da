"""Child-tuning benchmark script: the optimizer step of ptune-rt's ChildTuningAdamW against an eager
masked AdamW (``ptune-rt bench --suite child-tuning --full --out bench/results``); any other options
pass through.

    python bench/bench_child_tuning.py                          # --full, into bench/results
    python bench/bench_child_tuning.py --modes D --repeats 11   # --full, mode D only, fewer rounds
    python bench/bench_child_tuning.py --quick --out /tmp/c     # tiny shapes

The runner lives in the package (``ptune_rt.bench.child_tuning``) so the command works from a plain
install; ``ptune-rt bench`` itself writes to ./ptune-rt-results and never into bench/results unless told to.
"""
import sys
from pathlib import Path

from ptune_rt.bench.child_tuning import main
from ptune_rt.bench.common import committed_run_argv

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
