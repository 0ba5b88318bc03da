"""The benchmark behind ``ptune-rt bench``: HF PEFT vs ptune-rt side by side, plus equality checks.

``workload`` builds the models and inputs (one setup factory for every measurement),
``timing`` / ``memory`` / ``opcount`` / ``flops`` measure, ``analytic`` models HBM traffic and the
H100 roofline, ``common`` holds what every suite shares, ``suites`` lists the suites
(``lora``, ``mixed_tasks``, ``prefix``) and ``report`` writes JSON, markdown and a plot.
"""
from ptune_rt.bench.suites import main

__all__ = ["main"]
