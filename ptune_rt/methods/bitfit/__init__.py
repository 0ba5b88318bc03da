"""BitFit (Ben Zaken et al., 2022): train only bias terms, all of them or those of chosen modules.

Nothing is swapped: the base model's own biases become the only trainable parameters. With frozen
weights autograd already computes just ``dX = dY W`` and the bias gradient (the column sum of
``dY``) in a linear's backward: no weight-gradient GEMM runs (``tests`` count them). Checkpoints
are the own format only (PEFT has no BitFit).
"""
from ptune_rt.methods.bitfit.config import BitFitConfig
from ptune_rt.methods.bitfit.method import METHOD

__all__ = ["BitFitConfig", "METHOD"]
