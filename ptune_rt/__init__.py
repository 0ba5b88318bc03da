"""ptune-rt: fused Triton kernels and a module-swap runtime for parameter-efficient fine-tuning."""
import os as _os

from ptune_rt import _source_layout

_source_layout.install(_os.path.dirname(_os.path.abspath(__file__)))
from ptune_rt.methods.lora import LoRAConfig, LoRALinear
from ptune_rt.methods.lora.adapters import add_weighted_adapter, merge, mixed_adapters, set_adapter, unmerge
from ptune_rt.io import load_adapter, save_adapter
from ptune_rt.methods.prefix import PrefixConfig, PrefixEncoder
from ptune_rt.methods.prompt import PromptTuningConfig, PTuningConfig, remove_prompt
from ptune_rt.methods.bitfit import BitFitConfig
from ptune_rt.methods.ln_tuning import LNTuningConfig
from ptune_rt.methods.ia3 import IA3Config
from ptune_rt.methods.child_tuning import ChildTuningAdamW, ChildTuningConfig, ChildTuningOptimizer, child_mask_from_data
from ptune_rt import registry as _registry
from ptune_rt.registry import accelerate, apply, format_report, report, restore
from ptune_rt.io import adapters as _adapters
from ptune_rt.adapter_tools import (disable_adapter, merge_and_unload, print_trainable_parameters,
                                    trainable_parameters)

_adapters.register_handlers(*_registry.checkpoint_handlers())

from ptune_rt._version import __version__


__all__ = ["LoRAConfig", "LoRALinear", "apply", "accelerate", "format_report", "merge", "report", "restore",
           "mixed_adapters", "set_adapter", "unmerge", "add_weighted_adapter", "__version__"]
__all__ += ["load_adapter", "save_adapter"]
__all__ += ["PrefixConfig", "PrefixEncoder"]
__all__ += ["PromptTuningConfig", "PTuningConfig", "remove_prompt"]
__all__ += ["BitFitConfig", "LNTuningConfig", "IA3Config"]
__all__ += ["ChildTuningAdamW", "ChildTuningConfig", "ChildTuningOptimizer", "child_mask_from_data"]
__all__ += ["disable_adapter", "merge_and_unload", "print_trainable_parameters", "trainable_parameters"]
