"""Mixed-task serving benchmark script: the same run as ``ptune-rt bench --suite mixed-tasks``
(all options pass through).

    python bench/bench_mixed_tasks.py --repeats 3            # full CPU/CUDA run into bench/results
    python bench/bench_mixed_tasks.py --quick --out /tmp/b   # tiny shapes

The runner lives in the package (``ptune_rt.bench.mixed_tasks``) so the command works from a plain
install; this script only calls it.
"""
import sys

from ptune_rt.bench.mixed_tasks import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
