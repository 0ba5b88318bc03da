"""PEFT's everyday helpers for a model carrying ptune-rt methods, whichever they are:
``merge_and_unload``, ``disable_adapter``, ``trainable_parameters`` / ``print_trainable_parameters``.
Each loops over the method registry; a method says what it can do through its registry entry."""
from __future__ import annotations

import contextlib

from torch import nn

from ptune_rt import registry, trainer_checkpoints


def _applied(model: nn.Module, what: str) -> list:
    registry._require_module(model)
    present = registry.applied_methods(model)
    if not present:
        raise ValueError(f"{what}: {type(model).__name__} carries no ptune-rt method; expected a model passed "
                         "through ptune_rt.apply(...) or ptune_rt.load_adapter(...)")
    return present


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The plain model with every applied method's training inside its own weights (LoRA merged into
    the base weights; BitFit's biases and LN tuning's norms as trained), every ptune-rt module, class
    swap and flag change removed, so ``save_pretrained`` loads into the stock class. Refused before
    any change when a method cannot be merged (a prefix or soft prompt extends the attention or the
    input; save those with ``save_adapter``)."""
    present = _applied(model, "merge_and_unload")
    cannot = [m.name for m in present if m.merge_and_unload is None]
    if cannot:
        raise ValueError(f"merge_and_unload: {type(model).__name__} carries {cannot}, which cannot be merged into "
                         "the base weights (they add to the attention or the input); ptune_rt.save_adapter them, or "
                         "ptune_rt.restore(model) for the base model")
    for m in reversed(present):
        m.merge_and_unload(model)
    model.__dict__.pop(registry.ORDER_ATTR, None)
    trainer_checkpoints.uninstall(model)  # the plain model saves as the stock class does
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """``with ptune_rt.disable_adapter(model):`` the model runs as its base model (every applied
    method switched off), as PEFT's ``disable_adapter()``; on exit everything is back as it was."""
    present = _applied(model, "disable_adapter")
    cannot = [m.name for m in present if m.disable is None]
    if cannot:
        raise ValueError(f"disable_adapter: the methods {cannot} cannot be switched off")
    enables = []
    try:
        for m in present:
            enables.append(m.disable(model))
        yield model
    finally:
        for enable in reversed(enables):
            enable()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of ``model``, each shared parameter counted once."""
    registry._require_module(model)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
