"""What a PEFT method gives the registry (:mod:`ptune_rt.registry`): one :class:`Method`.

``apply(model, config)`` puts the method into ``model`` in place, freezing the base model (the
registry then re-enables what other applied methods train), and returns the model;
``remove(model)`` takes it out bit-exactly; ``is_applied(model)``; ``trainable(model)`` the
parameters it trains; ``report_rows(model)`` one dict per unit for ``ptune_rt.report``, none without
the method (keys ``module``, ``method``, ``dtype``, ``backend``, ``why`` at least), ``cells(row)``
its (shape, size, merged) cells and ``summary(rows)`` one line for ``format_report``;
``checkpoint`` its handler for ``save_adapter`` / ``load_adapter`` (see
:mod:`ptune_rt.io.adapters`); ``example()`` a small config (tests, docs); ``peft_types`` the PEFT
``peft_type`` values it reads and writes; ``peft_bridge`` how ``ptune_rt.accelerate`` runs a PEFT
model of this method (None: it does not); ``merge_and_unload(model)`` leaves the trained
method inside the plain model's own weights and removes everything else of it (None: it cannot be
merged, e.g. a prefix); ``disable(model)`` switches the method off and returns the function that
switches it back on (None: it cannot be).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    apply: Callable
    remove: Callable
    is_applied: Callable
    trainable: Callable
    report_rows: Callable
    cells: Callable
    summary: Callable
    checkpoint: Any
    example: Callable
    peft_types: tuple = ()
    peft_bridge: Optional["PeftBridge"] = None
    merge_and_unload: Optional[Callable] = None
    disable: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class PeftBridge:
    """``ptune_rt.accelerate`` for a PEFT model of one method.

    ``kind`` names what it looks for ("PEFT LoRA layers"); ``claims(peft_model)``: the model is
    one it runs; ``accelerate(peft_model, backend)`` swaps in the fused path in place and returns
    the report rows. Where the swap leaves none of the method's own modules for ``is_applied``,
    ``is_accelerated(model)`` and ``restore(model)`` undo it."""

    kind: str
    claims: Callable
    accelerate: Callable
    is_accelerated: Optional[Callable] = None
    restore: Optional[Callable] = None
