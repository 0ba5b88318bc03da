"""BitFit's config."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from ptune_rt.methods._config import check_module_names
from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods.config_base import MethodConfig


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """bias_modules: None trains every bias of the model; a list trains the biases of the modules it
    names (suffix match: ``"query"``, ``"value"``, ``"intermediate.dense"`` as in the BitFit paper);
    a string is a regex matched against the full module name.
    modules_to_save: modules trained whole next to the biases: None picks a classification / QA
    model's task head (its head starts random), as PEFT's modules_to_save; ``[]`` none."""

    METHOD = "bitfit"

    bias_modules: Optional[Union[Sequence[str], str]] = None
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        if isinstance(self.bias_modules, (list, tuple)):
            self.bias_modules = list(self.bias_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        super().__post_init__()

    def validate(self) -> None:
        check_modules_to_save("BitFitConfig", self.modules_to_save)
        check_module_names("BitFitConfig.bias_modules", self.bias_modules)
