"""Child-tuning (Xu et al., 2021, "Raise a Child in Large Language Model"): full fine-tuning in which
each step updates only a child network of the parameters.

* Child-tuning_F (``mode="F"``, task-free): every step multiplies each gradient by a fresh
  Bernoulli(reserve_p) mask and scales the kept entries by 1 / reserve_p.
* Child-tuning_D (``mode="D"``, task-driven): the child is the reserve_p fraction of parameters with
  the largest Fisher information (the sum over a pass of the task data of squared gradients,
  :func:`estimate_fisher`), chosen once before training (or again every ``mask_every`` steps).

``ptune_rt.apply(model, ChildTuningConfig(...))`` makes the parameters trainable (all of them, or
those of ``target_modules``) and records them for ``restore`` and checkpoints; the child is chosen
by the optimizer:

* :class:`ChildTuningOptimizer` wraps any torch optimizer: it masks the gradients in place, then
  calls the base optimizer's ``step`` (the paper's own recipe), and works as HF Trainer's
  ``optimizers=(optimizer, scheduler)``;
* :class:`ChildTuningAdamW` is AdamW with the mask fused into one Triton kernel per parameter tensor
  (``ptune_rt.kernels.child_adamw``): mode F draws its mask from a Philox counter in the kernel (no
  mask tensor, no masked gradient copy), mode D reads the child as packed bits (1 bit per
  parameter, :class:`ChildMask`) and leaves every entry outside it untouched. On CPU without
  ``TRITON_INTERPRET=1`` it runs the same step in torch ops (``ptune_rt.reference.child_tuning``).

Design: the mode F mask of element ``i`` of the optimizer's ``stream``-th parameter in step ``s`` is
a pure function of (``step_seed(seed, s)``, ``stream``, ``i``), so the wrapper, the fused step and
the eager reference draw the very same mask from one seed (the wrapper and the reference through a
small Triton kernel that writes only the mask), and nothing is stored between steps but mode D's
bits. See :class:`ChildTuningAdamW` for the exact semantics of each mode.

Mode D, end to end::

    mask = child_mask_from_data(model, fisher_batches, reserve_p=0.3)
    opt = ChildTuningAdamW(model.parameters(), ChildTuningConfig(mode="D", reserve_p=0.3), lr=2e-5, mask=mask)
"""
from ptune_rt.methods.child_tuning.config import ChildTuningConfig
from ptune_rt.methods.child_tuning.mask import (ChildMask, child_mask_from_data, estimate_fisher, fisher_mask,
                                                pack_bits, unpack_bits)
from ptune_rt.methods.child_tuning.method import METHOD
from ptune_rt.methods.child_tuning.optim import ChildTuningAdamW, ChildTuningOptimizer

__all__ = ["ChildMask", "ChildTuningAdamW", "ChildTuningConfig", "ChildTuningOptimizer", "METHOD",
           "child_mask_from_data", "estimate_fisher", "fisher_mask", "pack_bits", "unpack_bits"]
