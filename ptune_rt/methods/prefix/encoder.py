"""The encoder holding the trainable prefix of prefix tuning / P-tuning v2.

The encoder produces one matrix ``E [P, 2 * layers * kv_heads * head_dim]`` per model forward;
layer ``l`` reads its keys from ``E.view(P, 2 * layers, kv_heads, head_dim)[:, 2 * l]`` and its
values from ``[:, 2 * l + 1]`` (PEFT's layout, see ``layer_prefix``). Parameter names follow PEFT's
``PrefixEncoder``: ``embedding`` alone, or ``embedding`` -> ``transform`` (Linear, Tanh, Linear)
with ``prefix_projection``.

With ``num_tasks=T > 1`` the encoder holds T independent prefixes under the same names, every
parameter stacked on a leading task dimension (``embedding.weight`` [T, P, width]; with projection
each task has its own MLP, ``transform.0.weight`` [T, hidden, token_dim] ...), and ``E`` is
[T, P, 2 * layers * kv_heads * head_dim]: all tasks are computed in one batched call per forward,
and each row of a batch attends to its own task's prefix (the fused attention's ``task_ids`` path).
One task keeps PEFT's exact names and shapes.

How the prefix reaches a Hugging Face model's attention: ``ptune_rt.methods.prefix.inject``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_rt.task_modules import PromptTable, TaskLinear

class PrefixEncoder(nn.Module):
    """The trainable prefix of every layer: ``forward()`` returns ``E [P, 2 * layers * kv_heads * head_dim]``
    (``[T, P, ...]`` with ``num_tasks=T > 1``).

    Without projection ``E`` is ``embedding.weight`` itself (what PEFT saves as ``prompt_embeddings``).
    With projection ``E = transform(embedding.weight)``. Parameters are created in float32 (the
    attention casts the prefix to the activations' dtype, so gradients reach these parameters).
    With T tasks every parameter has a leading task dimension and task t's slice is exactly the
    one-task encoder's parameter (``task_parameters``).

    Outside autograd (inference, or every parameter frozen) ``E`` is computed once and reused
    until a parameter changes (in-place updates, ``load_state_dict``, moving the module).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 prefix_projection: bool = False, encoder_hidden_size: Optional[int] = None,
                 dropout: float = 0.0, device=None, num_tasks: int = 1):
        super().__init__()
        for name, v in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("num_tasks", num_tasks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_tasks = num_tasks
        self.prefix_projection = bool(prefix_projection)
        self.dropout_p = float(dropout)
        token_dim = num_kv_heads * head_dim
        out_dim = 2 * num_layers * token_dim
        kw = {"device": device, "dtype": torch.float32}
        T, P = num_tasks, num_virtual_tokens

        def table(width):  # PEFT's nn.Embedding for one task, a [T, P, width] table for several
            return nn.Embedding(P, width, **kw) if T == 1 else PromptTable(T, P, width, **kw)

        def linear(i, o):
            return nn.Linear(i, o, **kw) if T == 1 else TaskLinear(T, i, o, **kw)

        if self.prefix_projection:
            hidden = encoder_hidden_size if encoder_hidden_size is not None else token_dim
            self.embedding = table(token_dim)
            self.transform = nn.Sequential(linear(token_dim, hidden), nn.Tanh(), linear(hidden, out_dim))
        else:
            self.embedding = table(out_dim)
        self._cache = None  # (key, E) of the last computation made outside autograd

    @property
    def output_dim(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def _compute(self) -> torch.Tensor:
        w = self.embedding.weight  # [P, width] or [T, P, width]
        return self.transform(w) if self.prefix_projection else w

    def _cache_key(self):
        return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())

    def forward(self) -> torch.Tensor:
        """E [P, 2 * layers * kv_heads * head_dim] ([T, P, ...] for T tasks), with dropout while training."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if needs_grad:
            self._cache = None
            e = self._compute()
        else:
            key = self._cache_key()
            if self._cache is None or self._cache[0] != key:
                with torch.no_grad():
                    self._cache = (key, self._compute().detach())
            e = self._cache[1]
        if self.training and self.dropout_p > 0.0:
            e = nn.functional.dropout(e, p=self.dropout_p, training=True)
        return e

    def layer_prefix(self, e: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(prefix_k, prefix_v)`` of layer ``layer`` inside ``e``: [kv_heads, P, head_dim] each, or
        [T, kv_heads, P, head_dim] for a T-task ``e`` [T, P, ...]."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer}")
        shape = (self.num_virtual_tokens, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        if e.dim() == 3:
            v = e.view(e.shape[0], *shape)
            return v[:, :, 2 * layer].transpose(1, 2), v[:, :, 2 * layer + 1].transpose(1, 2)
        v = e.view(shape)
        return v[:, 2 * layer].transpose(0, 1), v[:, 2 * layer + 1].transpose(0, 1)

    def task_parameters(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s parameters by name, as views shaped like a one-task encoder's (PEFT's shapes)."""
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an integer in [0, num_tasks={self.num_tasks}), got {task!r}")
        return {n: (p if self.num_tasks == 1 else p[task]) for n, p in self.named_parameters()}

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor, task: Optional[int] = None) -> None:
        """Copy PEFT's saved ``prompt_embeddings`` [P, 2 * layers * kv_heads * head_dim] into ``embedding``
        (only without projection: the projected prefix cannot be inverted into its parameters).

        With T tasks pass ``task`` to fill one task's prefix, or a [T, P, ...] tensor for all of them.
        """
        if self.prefix_projection:
            raise ValueError("cannot load flat prompt_embeddings into a PrefixEncoder with prefix_projection=True")
        P, W = self.num_virtual_tokens, self.output_dim
        dst = self.task_parameters(task)["embedding.weight"] if task is not None else self.embedding.weight
        want = tuple(dst.shape)
        if tuple(prompt_embeddings.shape) != want:
            hint = f" (task={task})" if task is not None else \
                (" (or pass task=... with one task's [P, width] prefix)" if self.num_tasks > 1 else "")
            raise ValueError(f"prompt_embeddings must have shape {want}{hint}, got {tuple(prompt_embeddings.shape)} "
                             f"(P={P}, width={W})")
        with torch.no_grad():
            dst.copy_(prompt_embeddings)

    def extra_repr(self) -> str:
        tasks = f"tasks={self.num_tasks}, " if self.num_tasks > 1 else ""
        return (f"{tasks}P={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, projection={self.prefix_projection}, dropout={self.dropout_p}")
