"""Trainable tables and linears stacked on a leading task dimension: one per task of a mixed-task
batch, shared by the prompt-learning methods (soft prompts, prefix encoders)."""
from __future__ import annotations

import math

import torch
from torch import nn


class PromptTable(nn.Module):
    """``weight``: [P, hidden] for one task (PEFT's embedding.weight), [T, P, hidden] for T tasks."""

    def __init__(self, num_tasks: int, num_virtual_tokens: int, hidden: int, device=None, dtype=None):
        super().__init__()
        shape = (num_virtual_tokens, hidden) if num_tasks == 1 else (num_tasks, num_virtual_tokens, hidden)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        nn.init.normal_(self.weight)

    def stacked(self) -> torch.Tensor:
        """[T, P, hidden] (a view)."""
        return self.weight if self.weight.dim() == 3 else self.weight.unsqueeze(0)


class TaskLinear(nn.Module):
    """One nn.Linear per task, stacked: weight [T, out, in], bias [T, out]; x [T, n, in] -> [T, n, out]."""

    def __init__(self, num_tasks: int, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_tasks, out_features, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            for t in range(num_tasks):  # nn.Linear's initialisation, task by task
                nn.init.kaiming_uniform_(self.weight[t], a=math.sqrt(5))
                self.bias[t].uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
