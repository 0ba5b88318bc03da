"""The KV cache is read under both of transformers' names: ``past_key_values`` (up to 5.23) and
``cache`` (5.24 on), in forward keyword arguments and in model outputs."""
import dataclasses
from typing import Any, Optional

from transformers.modeling_outputs import CausalLMOutputWithPast

from ptune_rt._cache_names import cache_from_kwargs, cache_from_output


def test_kwargs_under_either_name():
    c = object()
    assert cache_from_kwargs({"past_key_values": c}) is c
    assert cache_from_kwargs({"cache": c}) is c
    assert cache_from_kwargs({"cache": None, "past_key_values": c}) is c
    assert cache_from_kwargs({"input_ids": 1}) is None


@dataclasses.dataclass
class _NewOutput:  # the 5.24 layout: a ``cache`` field
    logits: Any = None
    cache: Optional[Any] = None


def test_outputs_under_either_name():
    c = object()
    assert cache_from_output(_NewOutput(cache=c)) is c
    assert cache_from_output(_NewOutput()) is None
    # the installed transformers' own output class, whichever name it uses
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    name = "cache" if "cache" in fields else "past_key_values"
    assert cache_from_output(CausalLMOutputWithPast(**{name: c})) is c
    assert cache_from_output(CausalLMOutputWithPast()) is None
