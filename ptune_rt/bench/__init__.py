"""The benchmark behind ``ptune-rt bench``: HF PEFT vs ptune-rt side by side, plus equality checks.

``workload`` builds the models and inputs (one setup factory for every measurement),
``timing`` / ``memory`` / ``opcount`` / ``flops`` measure, ``analytic`` models HBM traffic and the
H100 roofline, ``runner`` drives a run and ``report`` writes JSON, markdown and a plot.
"""
from ptune_rt.bench.runner import main

__all__ = ["main"]
