"""The base of every method's config: dict / JSON round trip and validation on construction.

A method's config is a dataclass deriving from :class:`MethodConfig` that names its ``METHOD``
(the registry's name, written as ``"method"`` in every dict) and checks its fields in
``validate()`` with the shared checks of :mod:`ptune_rt.methods._config`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from ptune_rt.methods._config import config_kwargs


class MethodConfig:
    METHOD: ClassVar[str] = ""
    #: What ``from_dict`` calls a dict of another method ("not a <KIND>"); default: the class name.
    KIND: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError / TypeError naming the field for a value of the wrong type or range."""

    def to_dict(self) -> dict:
        return {"method": self.METHOD, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**config_kwargs(cls, d, cls.METHOD, cls.KIND or cls.__name__))

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))
