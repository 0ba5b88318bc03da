"""Pieces shared by every adapter method's checkpoint code: the error type, error reporting,
config and field reading, and what the prompt-learning methods (prefix, prompt tuning, P-tuning)
share: PEFT's flat ``prompt_embeddings`` layout, whole heads, tensor checks and all-or-nothing copies."""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ptune_rt.errors import AdapterError
from ptune_rt.targets import match_heads


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def unsharded_class(model: nn.Module) -> type:
    """The model's class; for a model sharded by FSDP2 the class ``fully_shard`` derived it from
    (``LlamaForCausalLM``, not ``FSDPLlamaForCausalLM``), so checkpoints do not depend on it."""
    cls, fsdp = type(model), _fsdp_module_class()
    if fsdp is not None and issubclass(cls, fsdp):
        cls = next((c for c in cls.__mro__ if not issubclass(c, fsdp)), cls)
    return cls


def model_class(model: nn.Module) -> str:
    return unsharded_class(model).__name__


def exact_regex(names: Iterable[str]) -> str:
    """A ``target_modules`` regex matching exactly these module names (and nothing else)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def config_from_ptune(d: dict, source: str, backend: Optional[str], cls, what: str,
                      build: Optional[Callable[[dict], Any]] = None):
    """The config object of an own-format checkpoint (``d["config"]``, built by ``build``, default
    ``cls.from_dict``), with ``backend`` swapped in when given; anything wrong is an AdapterError
    naming ``source``."""
    cfg = d.get("config")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{source}: 'config' must be an object with the {cls.__name__} fields, got {cfg!r}")
    try:
        config = build(cfg) if build is not None else cls.from_dict(cfg)
        if backend is not None:
            config = dataclasses.replace(config, backend=backend)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: invalid {what} config: {e}") from e
    return config


def raise_problems(header: str, problems: list[str], limit: int = 20) -> None:
    if not problems:
        return
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise AdapterError(header + "\n  " + "\n  ".join(shown) + more)


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def name_list(d: dict, key: str, source: str) -> list[str]:
    """``d[key]`` as a list of non-empty names (absent or null: empty)."""
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(h, str) and h for h in v):
        raise AdapterError(f"{source}: {key!r} must be a list of module names, got {v!r}")
    return list(v)


def saved_model_and_heads(d: dict, source: str) -> tuple[Optional[str], Optional[str], list[str]]:
    """(model_type, model class, modules_to_save) of an own-format config: the fingerprint fields
    every method writes."""
    model = d.get("model")
    model = {} if model is None else model
    if not isinstance(model, dict) or not all(isinstance(model.get(k), (str, type(None)))
                                              for k in ("model_type", "class")):
        raise AdapterError(f"{source}: 'model' must be an object {{model_type, class}} of strings, got {model!r}")
    return model.get("model_type"), model.get("class"), name_list(d, "modules_to_save", source)


def int_field(d: dict, key: str, source: str, required: bool = True, minimum: int = 1) -> Optional[int]:
    """``d[key]`` as an integer >= ``minimum`` (None when absent and not ``required``)."""
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise AdapterError(f"{source}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# Prompt-learning checkpoints (prefix tuning, prompt tuning, P-tuning): PEFT's flat layout and heads
# ----------------------------------------------------------------------------------------------

#: The one prompt tensor of a PEFT prompt-learning checkpoint.
PROMPT_KEY = "prompt_embeddings"
#: Prefix of head keys in a PEFT prompt-learning checkpoint (the PeftModel -> base model path).
PEFT_HEAD_PREFIX = "base_model."
#: Top-level module that holds ptune-rt's prefix / soft-prompt encoder: never a head.
ENCODER_MODULE = "prompt_encoder"
#: Prefix of the encoder's parameters in the own format.
ENCODER_PREFIX = ENCODER_MODULE + "."


def _dtensor_class():
    """torch's DTensor class once anything has imported it (no DTensor can exist before), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _fsdp_module_class():
    """FSDP2's ``FSDPModule`` once ``torch.distributed.fsdp`` is imported (``fully_shard`` needs it), else None."""
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy (never a view of the live tensor) for a checkpoint.

    A DTensor (a parameter of a model sharded by FSDP2's ``fully_shard`` or tensor parallelism, or
    a result computed from one) is gathered whole first with ``full_tensor()``: a collective, which
    every rank of its device mesh must reach (``save_adapter`` is called on every rank)."""
    t = t.detach()
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        t = t.full_tensor()
    return t.to("cpu", copy=True).contiguous()


def gather_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each DTensor replaced by its whole CPU copy (``cpu_copy``; in key order, the
    same on every rank), for the checkpoint code that copies tensors without ``cpu_copy``."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return tensors
    return {k: cpu_copy(t) if isinstance(t, dtensor) else t for k, t in tensors.items()}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded across processes (FSDP2 ``fully_shard`` or DTensor parameters):
    saving it gathers shards, collectively on every rank."""
    dtensor, fsdp = _dtensor_class(), _fsdp_module_class()
    return (fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())) or \
        (dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()))


@dataclasses.dataclass(kw_only=True)
class PromptLearningCheckpoint:
    """What a prefix or soft-prompt checkpoint holds whatever the method: the encoder's parameters,
    the prompt tensor PEFT's layout stores, and the whole heads saved beside them (CPU copies)."""

    encoder_tensors: dict[str, torch.Tensor]    # encoder parameter name -> CPU copy
    prompt_embeddings: torch.Tensor             # the method's prompt tensor (see the subclass), CPU
    heads: list[str]
    head_names: list[str]
    head_tensors: dict[str, torch.Tensor]       # module-path keys -> CPU copy

    @staticmethod
    def encoder_copies(encoder: nn.Module) -> dict[str, torch.Tensor]:
        return {k: cpu_copy(p) for k, p in encoder.named_parameters()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The own format's tensors."""
        out = {ENCODER_PREFIX + k: t for k, t in self.encoder_tensors.items()}
        out.update(self.head_tensors)
        return out


def _head_module(m: nn.Module) -> nn.Module:
    """The module a head's weights live in: for PEFT's ``ModulesToSaveWrapper`` (a PEFT sequence
    classification model) its active trained copy, else the module itself."""
    copies, original = getattr(m, "modules_to_save", None), getattr(m, "original_module", None)
    if isinstance(copies, nn.ModuleDict) and isinstance(original, nn.Module):
        active = list(getattr(m, "active_adapters", []) or [])
        if active and active[0] in copies and not getattr(m, "disable_adapters", False):
            return copies[active[0]]
        return original
    return m


def head_tensors(view: dict[str, nn.Module], head: str) -> dict:
    """The tensors of the head module ``head`` keyed by module path (the very tensors, not copies)."""
    return {f"{head}.{k}": t for k, t in _head_module(view[head]).state_dict(keep_vars=True).items()}


def _prompt_heads(view: dict[str, nn.Module], head_names, exact: bool) -> dict[str, list[str]]:
    return {h: [n for n in found if not n.startswith(ENCODER_MODULE + ".")]
            for h, found in match_heads(view, head_names, dotted=exact).items()}


def collect_prompt_heads(model: nn.Module, view: dict[str, nn.Module], head_names, heads_required: bool):
    """(head module names, the names that selected some, their tensors as CPU copies) for a
    prompt-learning checkpoint; ``heads_required``: a name that selects nothing is an error."""
    heads: list[str] = []
    found_by = _prompt_heads(view, head_names, exact=True)
    for h, found in found_by.items():
        if not found and heads_required:
            raise AdapterError(f"modules_to_save entry {h!r} matches no module of {model_class(model)}")
        heads += [n for n in found if n not in heads]
    used = [h for h, found in found_by.items() if found]
    tensors = {}
    for h in heads:
        tensors.update({k: cpu_copy(t) for k, t in head_tensors(view, h).items()})
    return heads, used, tensors


def prompt_head_destinations(view: dict[str, nn.Module], head_names, exact: bool, tensors: dict, cls: str,
                             problems: list[str]) -> dict:
    """Model tensors (by checkpoint key) that the heads of a prompt-learning checkpoint load into.

    ``exact`` (own format): every name must be a module of the model (else a problem is added) and
    every head's tensors are expected. PEFT's suffix names: a head absent from the file keeps the
    model's own head (as in PEFT); a partly present one is expected whole."""
    heads: list[str] = []
    for h, found in _prompt_heads(view, head_names, exact).items():
        if not found and exact:
            problems.append(f"module {h!r} (modules_to_save) does not exist in this {cls}")
        heads += [n for n in found if n not in heads]
    destinations: dict = {}
    for h in heads:
        dst = head_tensors(view, h)
        if exact or any(k in tensors for k in dst):
            destinations.update(dst)
    return destinations


def with_checkpoint_heads(config, view: dict[str, nn.Module], head_names, exact: bool):
    """``config`` with a PEFT checkpoint's whole modules (``head_names``, as found in the model) as its
    ``modules_to_save``, so a fresh load trains them next to the method, as PEFT does; ``config``
    itself when the checkpoint names none that the model has."""
    heads = [n for found in _prompt_heads(view, head_names, exact).values() for n in found]
    if not heads:
        return config
    return dataclasses.replace(config, modules_to_save=list(dict.fromkeys(heads)))


def flat_tensors_from_peft(raw: dict, weights_file: str, what: str):
    """(tensors keyed as the loaders expect, file_key) of a PEFT prompt-learning checkpoint:
    ``prompt_embeddings`` stays, heads lose PEFT's ``base_model.``. ``what`` names the method."""
    tensors, keys = {}, {}
    for k, t in raw.items():
        if k == PROMPT_KEY:
            tensors[k] = t
        elif k.startswith(PEFT_HEAD_PREFIX):
            tensors[k[len(PEFT_HEAD_PREFIX):]] = t
            keys[k[len(PEFT_HEAD_PREFIX):]] = k
        else:
            raise AdapterError(f"cannot load {weights_file}: key {k!r} is neither {PROMPT_KEY!r} nor a head key "
                               f"starting with {PEFT_HEAD_PREFIX!r}, as in a PEFT {what} checkpoint")

    def file_key(k: str) -> str:
        return keys.get(k, k)
    return tensors, file_key


def check_loaded_tensors(expected: dict, why: dict, tensors: dict, view: dict, cls: str, file_key,
                         problems: list[str]) -> None:
    """Add to ``problems`` every missing, unexpected, mis-shaped, non-float or non-finite tensor of
    ``tensors`` against ``expected`` (key -> shape; ``why[key]`` explains the shape)."""
    for k in expected:
        if k not in tensors:
            problems.append(f"missing key {file_key(k)!r} (expected shape {shape_str(expected[k])})")
    for k in tensors:
        if k not in expected:
            module = k.rsplit(".", 1)[0]
            hint = "" if module in view else f" (there is no module {module!r} in this {cls})"
            problems.append(f"unexpected key {file_key(k)!r}{hint}")
    for k, shape in expected.items():
        if k in tensors:
            problem = tensor_problem(file_key(k), tensors[k], shape, why[k])
            if problem:
                problems.append(problem)


def tensor_problem(label: str, t: torch.Tensor, shape, why: str) -> Optional[str]:
    """What is wrong with the checkpoint tensor ``label`` against the ``shape`` it must have
    (``why`` explains that shape): its shape, a non-float dtype or non-finite values; None when fine."""
    if tuple(t.shape) != tuple(shape):
        return f"shape mismatch for {label!r}: expected {shape_str(shape)} {why}, found {shape_str(t.shape)}"
    if not t.is_floating_point():
        return f"{label!r} has dtype {t.dtype}; expected a floating-point tensor"
    if not bool(torch.isfinite(t).all()):
        return f"{label!r} holds non-finite values (nan or inf)"
    return None


@dataclasses.dataclass
class PromptLearningLoadPlan:
    """A validated load of a prefix or soft prompt: ``execute()`` runs ``apply(model)`` when the
    model has none yet (its errors, raised before any change, become an AdapterError naming
    ``what`` and ``source``), then copies into ``encoder_of(model)``'s parameters and the heads, all
    or nothing; after a failure the method ``apply`` put in is taken out again (``is_applied`` /
    ``remove``)."""

    model: nn.Module
    what: str                                    # "prefix", "soft prompt"
    source: str
    apply: Optional[Callable]                    # None: the model already carries the method
    is_applied: Callable
    remove: Callable
    encoder_of: Callable
    encoder_copies: list                         # [(encoder parameter name, tensor)]
    other_copies: list                           # [(model tensor, tensor)]

    def execute(self) -> nn.Module:
        model = self.model
        try:
            if self.apply is not None:
                try:
                    self.apply(model)
                except (TypeError, ValueError) as e:  # raised before the model changed
                    raise AdapterError(f"cannot load the {self.what} of {self.source} into this {model_class(model)}: "
                                       f"{e}") from e
            enc = self.encoder_of(model)
            copy_all_or_nothing([(enc.get_parameter(name), src) for name, src in self.encoder_copies] +
                                list(self.other_copies))
        except BaseException:
            if self.apply is not None and self.is_applied(model):  # what is there came from this call
                self.remove(model)
            raise
        return model


def copy_all_or_nothing(copies: list) -> None:
    """``dst.copy_(src)`` for every pair; if one fails, the ones done are put back, then it raises."""
    backups = []
    try:
        with torch.no_grad():
            for dst, src in copies:
                backups.append((dst, dst.detach().clone()))
                dst.copy_(src)
    except BaseException:
        with torch.no_grad():
            for dst, old in backups:
                dst.copy_(old)
        raise
