"""LayerNorm tuning (PEFT's LN_TUNING): train only the normalization layers' weights and biases.

Nothing is swapped: the base model's norm parameters (and a classification model's task head)
become the only trainable parameters. Checkpoints read and write PEFT's LN_TUNING layout
(``<module>.ln_tuning_layers.<weight|bias>``) as well as the own format.
"""
from ptune_rt.methods.ln_tuning.config import LNTuningConfig
from ptune_rt.methods.ln_tuning.method import METHOD

__all__ = ["LNTuningConfig", "METHOD"]
