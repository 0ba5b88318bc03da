"""The registry entries of the two soft-prompt methods: prompt tuning and P-tuning v1."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.method import Method
from ptune_rt.methods.prompt import checkpoint, inject, report
from ptune_rt.methods.prompt.config import PromptTuningConfig, PTuningConfig
from ptune_rt.report_format import prompt_learning_cells


def disable(model: nn.Module):
    """Run the model without its soft prompt; returns the function that switches it back on."""
    fwd = model.__dict__["forward"]
    before = fwd.disabled
    fwd.disabled = True

    def enable() -> None:
        fwd.disabled = before
    return enable


def _entry(config_class) -> Method:
    name = config_class.METHOD

    def is_applied(model: nn.Module) -> bool:
        return inject.is_prompt_model(model) and model.__dict__["forward"].method == name

    def trainable(model: nn.Module) -> list:  # a prompt model trains its prompt and heads
        return [p for p in model.parameters() if p.requires_grad]

    def rows(model: nn.Module) -> list[dict]:
        return [r for r in report.prompt_rows(model) if r["method"] == name]

    return Method(name=name, config_class=config_class, apply=inject.apply_prompt, remove=inject.remove_prompt,
                  is_applied=is_applied, trainable=trainable, report_rows=rows, cells=prompt_learning_cells,
                  summary=report.prompt_summary, checkpoint=checkpoint.make_handler(name),
                  example=lambda: config_class(num_virtual_tokens=4), peft_types=(checkpoint.PEFT_TYPES[name],),
                  disable=disable)


PROMPT_TUNING = _entry(PromptTuningConfig)
P_TUNING = _entry(PTuningConfig)
