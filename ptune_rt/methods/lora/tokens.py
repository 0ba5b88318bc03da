"""PEFT's ``trainable_token_indices``: chosen rows of an embedding table train (new or rare tokens) while
the rest stays frozen, next to a LoRA adapter.

PEFT keeps the trained rows as ``trainable_tokens_delta`` [n, D] (the rows' new values, starting as
copies of the table's) and builds the whole table with them written in (``index_copy``, a V x D copy)
on every forward, for the embedding and for a tied output layer. Here nothing of table size is made:

* the embedding gathers ``E[ids]`` and puts the trained row in place for the ids that are trained
  tokens (``torch.where`` over a per-id slot, M x D); the rows' gradient is the sum of dY over the
  positions of each trained id;
* a tied output layer computes ``x E^T`` and overwrites the trained tokens' n columns with
  ``x delta^T`` (M x n).

:class:`TrainableTokensEmbedding` / :class:`TrainableTokensLinear` replace the module in place and hold
``token_adapter.trainable_tokens_delta[name]``, PEFT's parameter name; ``restore`` puts the original
module back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

ADAPTER = "default"


class TokenAdapter(nn.Module):
    """The trained rows (``trainable_tokens_delta[name]`` [n, D]) and their token ids, over ``base_layer``."""

    def __init__(self, base_layer: nn.Module, token_indices: list[int], delta: Optional[nn.Parameter] = None,
                 adapter_name: str = ADAPTER):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        table = base_layer.weight
        if delta is None:
            delta = nn.Parameter(table.detach()[list(token_indices)].clone())
        self.trainable_tokens_delta[adapter_name] = delta
        self.adapter_name = adapter_name
        self.token_indices = list(token_indices)
        self.disabled = False  # ptune_rt.disable_adapter: the table's own rows
        slot = torch.full((table.shape[0],), -1, dtype=torch.long, device=table.device)
        slot[torch.tensor(self.token_indices, device=table.device)] = torch.arange(len(self.token_indices),
                                                                                   device=table.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row in delta, -1 elsewhere

    @property
    def delta(self) -> nn.Parameter:
        return self.trainable_tokens_delta[self.adapter_name]


class TrainableTokensEmbedding(nn.Module):
    """An ``nn.Embedding`` whose trained tokens' rows come from ``token_adapter.delta``."""

    WRAPS_LAYER = True

    def __init__(self, embedding: nn.Embedding, token_indices: list[int]):
        super().__init__()
        self.token_adapter = TokenAdapter(embedding, token_indices)

    @property
    def base_layer(self) -> nn.Embedding:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb, adapter = self.base_layer, self.token_adapter
        rows = emb(ids)
        if adapter.disabled:
            return rows
        slot = adapter.slot[ids]
        trained = F.embedding(slot.clamp(min=0), adapter.delta).to(rows.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), trained, rows)


@torch.no_grad()
def fold_into_table(wrapper: TrainableTokensEmbedding) -> None:
    """Write the trained rows into the embedding's own table (merge_and_unload)."""
    adapter = wrapper.token_adapter
    table = wrapper.base_layer.weight
    idx = torch.tensor(adapter.token_indices, device=table.device)
    table.index_copy_(0, idx, adapter.delta.detach().to(table.dtype))


class TrainableTokensLinear(nn.Module):
    """An output layer tied to the embedding: the trained tokens' logits come from the same delta."""

    WRAPS_LAYER = True

    def __init__(self, linear: nn.Linear, tied: TokenAdapter):
        super().__init__()
        self.base_layer = linear
        self.__dict__["_tied"] = tied  # the embedding's adapter, not a child of this module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tied = self.__dict__["_tied"]
        out = self.base_layer(x)
        if tied.disabled:
            return out
        idx = torch.tensor(tied.token_indices, device=out.device)
        trained = F.linear(x, tied.delta.to(x.dtype))
        if self.base_layer.bias is not None:
            trained = trained + self.base_layer.bias[idx]
        return out.index_copy(-1, idx, trained.to(out.dtype))
