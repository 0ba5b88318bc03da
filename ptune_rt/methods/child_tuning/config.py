"""Child-tuning's config."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from ptune_rt.methods._config import check_choice, check_int, check_module_names, check_number
from ptune_rt.methods.config_base import MethodConfig

MODES = ("F", "D")


@dataclasses.dataclass
class ChildTuningConfig(MethodConfig):
    """mode: ``"F"`` (task-free: a fresh Bernoulli(reserve_p) mask on every gradient each step, the kept
    entries scaled by 1 / reserve_p) or ``"D"`` (task-driven: a fixed mask of the reserve_p fraction of
    parameters with the largest Fisher information, estimated from a pass over the task data).
    reserve_p: the fraction of parameters in the child network, in (0, 1] (1 is plain fine-tuning).
    mask_every: mode ``"D"`` only: re-estimate the mask every that many optimizer steps (None: once,
    before training, as in the paper); mode ``"F"`` draws a new mask every step and takes None only.
    target_modules: None trains every parameter of the model (full fine-tuning, the paper's setting); a
    list trains the parameters of the modules it names (suffix match), a string is a regex matched
    against the full module name."""

    METHOD = "child_tuning"

    mode: str = "F"
    reserve_p: float = 0.3
    mask_every: Optional[int] = None
    target_modules: Optional[Union[Sequence[str], str]] = None

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()

    def validate(self) -> None:
        check_choice("ChildTuningConfig.mode", self.mode, MODES)
        check_number("ChildTuningConfig.reserve_p", self.reserve_p, 0.0, 1.0, low_open=True, high_open=False)
        check_int("ChildTuningConfig.mask_every", self.mask_every, optional=True)
        if self.mode == "F" and self.mask_every is not None:
            raise ValueError(f"ChildTuningConfig.mask_every must be None for mode='F' (Child-tuning_F draws a new "
                             f"mask every step; mask_every re-estimates mode 'D''s Fisher mask), got "
                             f"{self.mask_every!r}")
        check_module_names("ChildTuningConfig.target_modules", self.target_modules)
