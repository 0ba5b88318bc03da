"""Soft prompts at the input: prompt tuning (Lester et al., 2021) and P-tuning v1 (Liu et al., 2021),
with mixed-task batches (``task_ids``, also through ``generate``).

``config``: :class:`PromptTuningConfig`, :class:`PTuningConfig`; ``template``: P-tuning templates
such as ``"[P*3] {input} [P*2] Capital: {anchor}"``; ``encoders``: the trainable modules (PEFT's
parameter names); ``forward``: the model's forward / generate building ``inputs_embeds`` with the
prompt-input op; ``inject``: into and out of a model; ``report``; ``checkpoint``.
"""
from ptune_rt.methods.prompt.config import PromptTuningConfig, PTuningConfig
from ptune_rt.methods.prompt.encoders import PTuningEncoder, SoftPromptEmbedding, TaskLSTM
from ptune_rt.methods.prompt.inject import apply_prompt, is_prompt_model, prompt_report, remove_prompt
from ptune_rt.methods.prompt.method import P_TUNING, PROMPT_TUNING
from ptune_rt.methods.prompt.template import parse_template
from ptune_rt.task_modules import PromptTable, TaskLinear

__all__ = ["PromptTuningConfig", "PTuningConfig", "SoftPromptEmbedding", "PTuningEncoder", "PromptTable",
           "TaskLinear", "TaskLSTM", "apply_prompt", "remove_prompt", "is_prompt_model", "prompt_report",
           "parse_template", "PROMPT_TUNING", "P_TUNING"]
