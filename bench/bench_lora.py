"""LoRA benchmark script: regenerates the committed ``bench/results/lora_cpu.*`` (``ptune-rt bench --full
--out bench/results``); any other options pass through.

    python bench/bench_lora.py                       # the committed run: --full, into bench/results
    python bench/bench_lora.py --repeats 21          # --full with fewer rounds, into bench/results
    python bench/bench_lora.py --quick --out /tmp/b  # tiny shapes

The runner lives in the package (``ptune_rt.bench``) so the command works from a plain install;
``ptune-rt bench`` itself writes to ./ptune-rt-results and never into bench/results unless told to.
"""
import sys
from pathlib import Path

from ptune_rt.bench.common import committed_run_argv
from ptune_rt.bench.lora import main

if __name__ == "__main__":
    sys.exit(main(committed_run_argv(sys.argv[1:], Path(__file__).resolve().parent / "results")))
