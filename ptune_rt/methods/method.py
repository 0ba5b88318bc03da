"""What a PEFT method gives the registry (:mod:`ptune_rt.registry`): one :class:`Method`.

``apply(model, config)`` puts the method into ``model`` in place, freezing the base model (the
registry then re-enables what other applied methods train), and returns the model;
``remove(model)`` takes it out bit-exactly; ``is_applied(model)``; ``trainable(model)`` the
parameters it trains; ``report_rows(model)`` one dict per unit for ``ptune_rt.report``, none without
the method (keys ``module``, ``method``, ``dtype``, ``backend``, ``why`` at least), ``cells(row)``
its (shape, size, merged) cells and ``summary(rows)`` one line for ``format_report``;
``checkpoint`` its handler for ``save_adapter`` / ``load_adapter`` (see
:mod:`ptune_rt.io.adapters`); ``example()`` a small config (tests, docs); ``peft_types`` the PEFT
``peft_type`` values it reads and writes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


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
