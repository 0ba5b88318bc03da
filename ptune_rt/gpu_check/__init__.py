"""``ptune-rt gpu-check``: the GPU acceptance run, in one command, in under 8 minutes.

On CUDA: (a) numerics of the fused LoRA linear, prefix attention and prompt-input gather at
7B-class shapes in bf16 / fp16 / fp32 against a float64 gold by the project's tolerance rule,
(b) timings beside HF PEFT and the eager reference (``triton.testing.do_bench``), (c) the analytic
roofline beside each timing, (d) JSON with provenance + markdown + plot in ``--out``.
``--dry-run`` writes the plan and an empty report without a GPU. ``pytest -m gpu`` checks the
same cases (a smaller subset) with the same checker.

Modules: ``cases`` (what runs), ``plan`` (cost model, budgets), ``numerics`` (the checker),
``timing``, ``roofline``, ``report``, ``run`` (command line, section runner).
"""
from ptune_rt.gpu_check.run import main

__all__ = ["main"]
