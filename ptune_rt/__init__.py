"""ptune-rt: fused Triton kernels and a module-swap runtime for parameter-efficient fine-tuning."""
import os as _os

from ptune_rt import _source_layout

_source_layout.install(_os.path.dirname(_os.path.abspath(__file__)))
from ptune_rt.methods.lora import LoRAConfig, LoRALinear
from ptune_rt.swap import format_report, merge, mixed_adapters, report, restore, set_adapter, unmerge
from ptune_rt.swap import accelerate_peft as accelerate
from ptune_rt.swap import apply_lora as _apply_lora
from ptune_rt.io import load_adapter, save_adapter
from ptune_rt.methods.prefix import PrefixConfig, PrefixEncoder
from ptune_rt.methods.prefix import check_model_dtype as _check_prefix_dtype
from ptune_rt import hf_attention as _prefix
from ptune_rt.methods.prompt import PromptTuningConfig, PTuningConfig, remove_prompt
from ptune_rt.methods.prompt import apply_prompt as _apply_prompt

__version__ = "0.1.0"


def apply(model, config):
    """Swap the target modules of ``model`` (in place) for fused ones, freeze the base, return the model."""
    if isinstance(config, LoRAConfig):
        return _prefix.keep_prefix_trainable(_apply_lora(model, config))
    if isinstance(config, PrefixConfig):
        _check_prefix_dtype(model)
        return _prefix.apply_prefix(model, config)
    if isinstance(config, (PromptTuningConfig, PTuningConfig)):
        return _apply_prompt(model, config)
    raise TypeError(f"config must be a ptune_rt config (LoRAConfig, PrefixConfig, PromptTuningConfig or "
                    f"PTuningConfig), got {type(config).__name__}")


__all__ = ["LoRAConfig", "LoRALinear", "apply", "accelerate", "format_report", "merge", "report", "restore",
           "mixed_adapters", "set_adapter", "unmerge", "__version__"]
__all__ += ["load_adapter", "save_adapter"]
__all__ += ["PrefixConfig", "PrefixEncoder"]
__all__ += ["PromptTuningConfig", "PTuningConfig", "remove_prompt"]
