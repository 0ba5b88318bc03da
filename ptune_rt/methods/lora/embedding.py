"""LoRA on an ``nn.Embedding``: :class:`LoRAEmbedding`, run by the fused op ``ptune_rt.ops.lora_embedding``
(a gather plus a low-rank gather: ``E[ids] + s * A^T[ids] B^T``, no one-hot matmul).

It is a :class:`~ptune_rt.methods.lora.layer.LoRALinear` whose "linear" is the lookup: in_features is the
vocabulary V, out_features the embedding width D, and the table [V, D] is stored transposed like a
GPT-2 Conv1D weight, so adapters, merge / unmerge (``W += s (B A)^T``), set_adapter and checkpoints
are LoRA's own. ``lora_A[name].weight`` [r, V] and ``lora_B[name].weight`` [D, r] are views of
PEFT's ``lora_embedding_A[name]`` / ``lora_embedding_B[name]`` ParameterDicts, which hold the Parameters:
parameter and state-dict names are PEFT's, so PEFT's own ``save_pretrained`` of an accelerated model
writes what PEFT reads back. As in PEFT, A starts at zero and B normal, and no dropout applies to an
embedding.
"""
from __future__ import annotations


import torch
from torch import nn

from ptune_rt.methods.lora.layer import LoRALinear
from ptune_rt.ops.lora_embedding import lora_embedding


class _ParameterView:
    """One adapter Parameter seen as LoRA's code reads an adapter module: ``.weight``, ``requires_grad_``,
    and ``bias`` (always None: PEFT has no lora_bias on embeddings)."""

    __slots__ = ("weight",)
    bias = None

    def __init__(self, weight: nn.Parameter):
        self.weight = weight

    def requires_grad_(self, requires_grad: bool = True) -> "_ParameterView":
        self.weight.requires_grad_(requires_grad)
        return self


class _AdapterParameters:
    """``lora_A`` / ``lora_B`` of a LoRAEmbedding: a mapping over PEFT's ``lora_embedding_A`` /
    ``lora_embedding_B`` ParameterDicts (which hold the Parameters, under PEFT's names). Setting an
    entry to a module stores its ``weight`` Parameter."""

    def __init__(self, params: nn.ParameterDict):
        self._params = params

    def __getitem__(self, name: str) -> _ParameterView:
        return _ParameterView(self._params[name])

    def __setitem__(self, name: str, module) -> None:
        self._params[name] = module.weight

    def __delitem__(self, name: str) -> None:
        del self._params[name]

    def __contains__(self, name) -> bool:
        return name in self._params

    def __iter__(self):
        return iter(list(self._params.keys()))

    def __len__(self) -> int:
        return len(self._params)

    def keys(self):
        return list(self._params.keys())

    def values(self) -> list:
        return [self[n] for n in self._params]

    def items(self) -> list:
        return [(n, self[n]) for n in self._params]


class ParameterHolder(nn.Module):
    """Holds one Parameter as ``weight`` (how an embedding's A / B are handed to ``from_adapter_modules``)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class LoRAEmbedding(LoRALinear):
    """A frozen ``nn.Embedding`` plus LoRA adapters (see the module docstring)."""

    CHECKPOINT_KEYS = ("lora_embedding_A", "lora_embedding_B")
    PEFT_ADAPTER_LAYER_NAMES = ("lora_embedding_A", "lora_embedding_B")

    @staticmethod
    def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding, got {type(base_layer).__name__}")
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _init_base(self, base_layer: nn.Module, backend: str, adapter_name: str) -> None:
        super()._init_base(base_layer, backend, adapter_name)
        del self._modules["lora_A"], self._modules["lora_B"]  # PEFT's ParameterDicts instead
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.__dict__["_adapter_views"] = (_AdapterParameters(self.lora_embedding_A),
                                           _AdapterParameters(self.lora_embedding_B))

    @property
    def lora_A(self) -> _AdapterParameters:
        return self.__dict__["_adapter_views"][0]

    @property
    def lora_B(self) -> _AdapterParameters:
        return self.__dict__["_adapter_views"][1]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "default", use_dora: bool = False, lora_bias: bool = False) -> None:
        if use_dora or lora_bias:
            raise ValueError(f"LoRA on an embedding takes neither use_dora nor lora_bias (as in PEFT); got "
                             f"use_dora={use_dora}, lora_bias={lora_bias}")
        if init not in ("default", "gaussian", "zeros"):
            raise ValueError(f"init={init!r} is not supported for LoRA on an embedding; expected 'default' (A zero, "
                             "B normal, as PEFT initializes embeddings) or 'zeros'")
        super().add_adapter(name, r, alpha, 0.0, use_rslora, "zeros")
        if init != "zeros":
            with torch.no_grad():
                nn.init.normal_(self.lora_B[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            raise ValueError("a mixed-adapter batch (ptune_rt.mixed_adapters) does not run LoRA on an embedding; "
                             "run its adapters one at a time (set_adapter)")
        name = self.active_adapter
        if self.merged or self.disabled or name not in self.lora_A:
            return self._merged_guard(self.base_layer(x))
        emb = self.base_layer
        return lora_embedding(x, emb.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                              emb.padding_idx, self.backend, max_norm=emb.max_norm, norm_type=emb.norm_type,
                              scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse)

