"""The modules holding a soft prompt's trainable parameters (PEFT's parameter names), one table or
encoder per task stacked on a leading task dimension when there are several tasks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptune_rt.task_modules import PromptTable, TaskLinear


class SoftPromptEmbedding(nn.Module):
    """Prompt tuning's parameters: the virtual-token embeddings themselves."""

    def __init__(self, num_tasks: int, num_virtual_tokens: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.num_tasks, self.num_virtual_tokens = num_tasks, num_virtual_tokens
        self.embedding = PromptTable(num_tasks, num_virtual_tokens, hidden, device, dtype)

    def prompts(self) -> torch.Tensor:
        """[P, hidden] for one task, [T, P, hidden] for T tasks."""
        return self.embedding.weight


class TaskLSTM(nn.Module):
    """A bidirectional, batch-first nn.LSTM per task, stacked on a leading task dimension.

    Parameters carry nn.LSTM's names (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...) with shapes
    [T, ...]; x [T, n, in] -> [T, n, 2 * hidden]; same gate order (input, forget, cell, output) and
    math as nn.LSTM, all tasks stepping together.
    """

    def __init__(self, num_tasks: int, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, float(dropout)
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else 2 * hidden_size
            for sfx in ("", "_reverse"):
                for name, shape in ((f"weight_ih_l{layer}{sfx}", (4 * hidden_size, in_size)),
                                    (f"weight_hh_l{layer}{sfx}", (4 * hidden_size, hidden_size)),
                                    (f"bias_ih_l{layer}{sfx}", (4 * hidden_size,)),
                                    (f"bias_hh_l{layer}{sfx}", (4 * hidden_size,))):
                    p = nn.Parameter(torch.empty((num_tasks,) + shape, device=device, dtype=dtype))
                    nn.init.uniform_(p, -bound, bound)
                    self.register_parameter(name, p)

    def _direction(self, x: torch.Tensor, layer: int, sfx: str) -> torch.Tensor:
        w_ih, w_hh = getattr(self, f"weight_ih_l{layer}{sfx}"), getattr(self, f"weight_hh_l{layer}{sfx}")
        b = getattr(self, f"bias_ih_l{layer}{sfx}") + getattr(self, f"bias_hh_l{layer}{sfx}")
        gx = torch.baddbmm(b.unsqueeze(1), x, w_ih.transpose(1, 2))  # input part of all gates, all steps
        T, n, _ = x.shape
        h = x.new_zeros(T, 1, self.hidden_size)
        c = x.new_zeros(T, 1, self.hidden_size)
        steps = range(n - 1, -1, -1) if sfx else range(n)
        out = [None] * n
        for s in steps:
            g = torch.baddbmm(gx[:, s:s + 1], h, w_hh.transpose(1, 2))
            i, f, cell, o = g.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cell)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[s] = h
        return torch.cat(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x = torch.cat([self._direction(x, layer, ""), self._direction(x, layer, "_reverse")], dim=-1)
        return x


class PTuningEncoder(nn.Module):
    """P-tuning v1's prompt encoder with PEFT's parameter names and math.

    ``embedding.weight`` [P, hidden] feeds ``mlp_head`` (Linear(hidden, h), ReLU, Linear(h, h), ReLU,
    Linear(h, hidden)) or ``lstm_head`` (bidirectional LSTM, hidden -> h per direction) then
    ``mlp_head`` (Linear(2h, 2h), ReLU, Linear(2h, hidden)). One task uses nn.Linear / nn.LSTM, as
    PEFT; T tasks stack each parameter on a leading task dimension and run as one batch.
    """

    def __init__(self, num_tasks: int, num_virtual_tokens: int, hidden: int, encoder: str, encoder_hidden: int,
                 num_layers: int = 2, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_tasks, self.num_virtual_tokens, self.encoder = num_tasks, num_virtual_tokens, encoder
        self.encoder_dropout = float(dropout) if encoder == "lstm" else 0.0
        kw = dict(device=device, dtype=dtype)
        self.embedding = PromptTable(num_tasks, num_virtual_tokens, hidden, **kw)
        h = encoder_hidden

        def linear(i, o):
            return nn.Linear(i, o, **kw) if num_tasks == 1 else TaskLinear(num_tasks, i, o, **kw)

        if encoder == "lstm":
            if num_tasks == 1:
                self.lstm_head = nn.LSTM(hidden, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                         batch_first=True, **kw)
            else:
                self.lstm_head = TaskLSTM(num_tasks, hidden, h, num_layers, dropout, **kw)
            self.mlp_head = nn.Sequential(linear(2 * h, 2 * h), nn.ReLU(), linear(2 * h, hidden))
        else:
            self.mlp_head = nn.Sequential(linear(hidden, h), nn.ReLU(), linear(h, h), nn.ReLU(), linear(h, hidden))
        self._cache = None

    def encode(self) -> torch.Tensor:
        """Run the encoder once for every task: [P, hidden] for one task, [T, P, hidden] for T."""
        x = self.embedding.stacked()
        if self.encoder == "lstm":
            x = self.lstm_head(x)[0] if self.num_tasks == 1 else self.lstm_head(x)
        x = self.mlp_head(x)
        return x[0] if self.num_tasks == 1 else x

    def prompts(self) -> torch.Tensor:
        """``encode()``; with gradients off (or nothing trainable) the result is cached and reused
        until a parameter changes (an in-place update or a new tensor), or its dtype / device does."""
        if torch.compiler.is_compiling():
            return self.encode()  # the cache compares data pointers, which a compiled graph cannot read
        params = list(self.parameters())
        random = self.training and self.encoder_dropout > 0
        if random or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._cache = None
            return self.encode()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.encode())
        return self._cache[1]


