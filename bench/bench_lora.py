"""LoRA benchmark script: the same run as ``ptune-rt bench`` (all options pass through).

    python bench/bench_lora.py --repeats 5          # full CPU/CUDA run into bench/results
    python bench/bench_lora.py --quick --out /tmp/b # tiny shapes

The runner lives in the package (``ptune_rt.bench``) so the command works from a plain install;
this script only calls it.
"""
import sys

from ptune_rt.bench.lora import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
