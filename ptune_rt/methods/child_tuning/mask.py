"""Child-tuning's masks: mode F's per-step Bernoulli mask, mode D's Fisher-information child stored
as packed bits (1 bit per parameter), and the Fisher estimate itself."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ptune_rt.methods._config import check_number
from ptune_rt.reference.child_tuning import keep_mask, step_seed

__all__ = ["ChildMask", "child_mask_from_data", "estimate_fisher", "fisher_mask", "keep_mask", "pack_bits",
           "step_seed", "unpack_bits"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 [ceil(numel / 8)]: element ``i`` (flat, row-major) is bit ``i % 8``
    (least significant first) of byte ``i // 8``; the last byte's unused bits are 0."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool mask [numel] of :func:`pack_bits`'s bytes."""
    weights = _BIT_WEIGHTS.to(bits.device)
    return ((bits.reshape(-1, 1) & weights) != 0).reshape(-1)[:numel]


@dataclasses.dataclass
class ChildMask:
    """Mode D's child network: for each parameter, its packed keep bits (:func:`pack_bits`).

    ``bits`` maps the parameter object to uint8 [ceil(numel / 8)]; ``reserve_p`` is the fraction it
    was chosen for. Parameters absent from ``bits`` are outside the Fisher estimate (trained whole by
    the optimizers, as the paper's code trains the task head)."""

    bits: dict
    reserve_p: float

    def keep(self, param: torch.Tensor) -> torch.Tensor:
        """The bool child mask of ``param``, shaped like it."""
        return unpack_bits(self.bits[param], param.numel()).reshape(param.shape)

    @property
    def total(self) -> int:
        """Parameters the mask covers."""
        return sum(p.numel() for p in self.bits)

    @property
    def kept(self) -> int:
        """Parameters in the child."""
        return sum(int(self.keep(p).sum()) for p in self.bits)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bits.values())


def _check_reserve_p(reserve_p) -> None:
    check_number("reserve_p", reserve_p, 0.0, 1.0, low_open=True, high_open=False)


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if loss is None:
        raise ValueError("the model returned no loss for a batch: pass loss_fn(model, batch) -> scalar loss, or "
                         "batches the model computes its loss from (labels included)")
    return loss


def estimate_fisher(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None,
                    params: Optional[Iterable[torch.Tensor]] = None) -> dict:
    """Empirical Fisher information of each parameter: the sum over ``batches`` of the squared
    gradient of the batch's loss (fp32, on the parameter's device).

    ``loss_fn(model, batch)`` gives a batch's scalar loss (default: ``model(**batch).loss``);
    ``params``: the parameters to score (default: every one with ``requires_grad``). The model's own
    gradients are put back afterwards, so this may run between a backward and an optimizer step.
    """
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad, so there is nothing to score; expected the trainable "
                         "parameters of the model")
    loss_fn = loss_fn or _default_loss
    saved = {p: p.grad for p in model.parameters()}
    fisher = {p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                for p in saved:
                    p.grad = None
                loss_fn(model, batch).backward()
                for p, f in fisher.items():
                    if p.grad is not None:
                        f.add_(p.grad.detach().float().square())
                seen += 1
    finally:
        for p, g in saved.items():
            p.grad = g
    if not seen:
        raise ValueError("batches is empty: the Fisher estimate needs a pass over the task data")
    return fisher


def fisher_mask(fisher: dict, reserve_p: float) -> ChildMask:
    """The child of the ``round(reserve_p * n)`` entries (at least one) with the largest Fisher
    information over all ``n`` entries of ``fisher`` together (one global ranking, as in the paper)."""
    _check_reserve_p(reserve_p)
    if not fisher:
        raise ValueError("fisher is empty: expected the dict of estimate_fisher")
    params = list(fisher)
    device = fisher[params[0]].device
    flat = torch.cat([fisher[p].reshape(-1).to(device) for p in params])
    k = max(1, int(round(reserve_p * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    del flat
    bits, start = {}, 0
    for p in params:
        bits[p] = pack_bits(chosen[start:start + p.numel()]).to(p.device)
        start += p.numel()
    return ChildMask(bits, float(reserve_p))


def child_mask_from_data(model: nn.Module, batches: Iterable, reserve_p: float, loss_fn: Optional[Callable] = None,
                         params: Optional[Iterable[torch.Tensor]] = None) -> ChildMask:
    """Mode D's child in one call: :func:`estimate_fisher` then :func:`fisher_mask`."""
    _check_reserve_p(reserve_p)
    return fisher_mask(estimate_fisher(model, batches, loss_fn, params), reserve_p)

