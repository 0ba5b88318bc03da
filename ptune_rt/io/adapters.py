"""Adapter checkpoints: ``save_adapter`` / ``load_adapter``, in PEFT's layout or the own one.

Two directory layouts, both safetensors only:

* ``format="peft"``: ``adapter_config.json`` + ``adapter_model.safetensors``, exactly what PEFT's
  ``save_pretrained`` writes, so ``PeftModel.from_pretrained(base, path)`` loads it, and adapters
  saved by PEFT load here.
* ``format="ptune"``: ``ptune_config.json`` (the method's config, a fingerprint of the base model:
  model type and every target with its shape, and a format version) + ``adapter.safetensors``
  keyed by module path.

Saving validates first, then replaces the directory's checkpoint of that format crash-consistently
(``ptune_rt.io.durable``): killed at any instant, the directory loads as the old checkpoint or the
new one, never a mix, and the next save cleans up after the killed one. Loading validates the
whole checkpoint against the model before changing anything. Pickle checkpoints are refused.

Each method plugs in its checkpoint handler through the method registry (``ptune_rt.registry``
hands ``register_handlers`` the table at import). A handler provides ``has_adapter``, ``collect``
(-> a state with ``config``, ``tensors`` and ``fingerprint``), ``to_peft``, ``spec_from_peft``,
``tensors_from_peft``, ``spec_from_ptune`` and ``plan_load`` (-> a plan whose ``execute()`` loads
all or nothing); optionally ``hint_from_peft`` (what a PEFT model's config tells ``collect`` and
``plan_load`` as ``hint``) and ``refuse_peft_model`` (raise for a PEFT model PEFT runs itself).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ptune_rt.ops.backend import BACKENDS

from . import durable
from . import peft_config
from .common import AdapterError, gather_shards, is_sharded, model_class

FORMATS = ("peft", "ptune")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PTUNE_CONFIG = "ptune_config.json"
PTUNE_WEIGHTS = "adapter.safetensors"
#: Version of the own layout this code writes and the newest it reads.
FORMAT_VERSION = 1
FORMAT_NAME = "ptune-rt-adapter"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: format -> (config file, weights file)
FILES = {"peft": (PEFT_CONFIG, PEFT_WEIGHTS), "ptune": (PTUNE_CONFIG, PTUNE_WEIGHTS)}

#: own-format method name -> its checkpoint handler, and PEFT ``peft_type`` -> method name; filled
#: by ``register_handlers`` (the method registry), so this module names no method for its loops.
_METHODS: dict = {}
_PEFT_TYPES: dict = {}


_trainable_of_others = None


def register_handlers(handlers: dict, peft_types: dict, trainable_of_others) -> None:
    """Install the registry's checkpoint handlers (method name -> handler, peft_type -> method name)
    and ``trainable_of_others(model, method)``: the parameters the model's other methods train,
    which stay trainable when a load adds ``method`` (whose apply freezes the model)."""
    _METHODS.clear()
    _METHODS.update(handlers)
    _PEFT_TYPES.clear()
    _PEFT_TYPES.update(peft_types)
    global _trainable_of_others
    _trainable_of_others = trainable_of_others


def _others_trainable(model: nn.Module, method: str) -> list:
    return list(_trainable_of_others(model, method)) if _trainable_of_others is not None else []


PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: PathLike, format: str = "peft", *, adapter_name: Optional[str] = None,
                 task_type: Optional[str] = "auto", modules_to_save: Union[str, Sequence[str], None] = "auto",
                 method: Optional[str] = None) -> str:
    """Write the adapter of ``model`` to the directory ``path`` (created if needed); returns the path.

    The save replaces the directory's checkpoint of this format (``adapter_config.json`` +
    ``adapter_model.safetensors``, or ``ptune_config.json`` + ``adapter.safetensors``) as a whole
    and leaves every other file there alone (a checkpoint of the other format, a README). It is
    crash-consistent: if the process dies at any instant, the directory loads as exactly the old
    checkpoint or exactly the new one, and the next save removes what the killed one left
    (hidden ``.ptune-rt-*`` entries). One process saves into a directory at a time.

    Distributed training: a DDP model is whole on every rank; save it from one rank
    (``if dist.get_rank() == 0: save_adapter(ddp_model.module, path)``). A model sharded by FSDP2
    (``fully_shard``) or with DTensor parameters is saved by calling ``save_adapter`` on every rank
    of the default process group with the same arguments: each rank gathers the adapter's (and the
    saved heads') shards with ``DTensor.full_tensor()``, a collective (a rank that does not call it
    leaves the others waiting), never the frozen base weights; rank 0 alone writes the directory
    (it must be on a file system rank 0 sees; the other ranks' ``path`` is not touched); the other
    ranks return the path once rank 0 has written, or raise AdapterError if it failed. The files are
    those a single process writes (the class name is the model's, not FSDP's ``FSDP...`` subclass).

    format: "peft" (PEFT's layout; PEFT loads it) or "ptune" (own layout with a model fingerprint).
        A prefix (prefix tuning / P-tuning v2) is written in PEFT's layout as PEFT writes it: the
        prefix itself as ``prompt_embeddings`` (projected through the MLP when there is one); the
        own layout keeps the MLP's parameters.
    adapter_name: which adapter of the LoRA modules to save (default: the active one).
    task_type: PEFT task type written to ``adapter_config.json``; "auto" infers it from the model
        class (CAUSAL_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, FEATURE_EXTRACTION or None).
    modules_to_save: modules saved whole next to the adapter. "auto" takes the heads PEFT's task
        wrapper would (``classifier`` / ``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for
        QUESTION_ANS), since a freshly loaded base model has its own randomly initialised head;
        a list names them (module name or dotted suffix); None saves none.
        A soft prompt (prompt tuning, P-tuning v1) is written in PEFT's layout as PEFT writes it:
        the virtual tokens themselves as ``prompt_embeddings`` (for P-tuning the encoder's output);
        this needs one task and PEFT's placement (all virtual tokens before the input). The own
        layout keeps the table and the MLP / LSTM encoder weights (task-stacked), the template and
        the token ids of its anchor text.
    method: "lora", "prefix", "prompt_tuning" or "p_tuning", for a model that carries several
        (each is saved on its own).
    """
    _check_path_and_name(path, adapter_name)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if method is not None and method not in _METHODS:
        raise ValueError(f"method must be None or one of {tuple(_METHODS)}, got {method!r}")
    _refuse_peft_models(model)
    model, hints = _unwrap_peft(model, adapter_name)
    if task_type == "auto":
        task_type = peft_config.infer_task_type(model)
    elif task_type is not None and task_type not in peft_config.TASK_TYPES:
        raise ValueError(f"task_type must be 'auto', None or one of {peft_config.TASK_TYPES}, got {task_type!r}")
    if modules_to_save == "auto":
        head_names, heads_required = peft_config.TASK_HEADS.get(task_type, []), False
    elif modules_to_save is None:
        head_names, heads_required = [], False
    elif isinstance(modules_to_save, str) or not all(isinstance(h, str) and h for h in modules_to_save):
        raise ValueError(f"modules_to_save must be 'auto', None or a list of module names, got {modules_to_save!r}")
    else:
        head_names, heads_required = list(modules_to_save), True

    method = _method_of(model, method)
    sharded = is_sharded(model)
    state = _METHODS[method].collect(model, adapter_name, head_names, heads_required, hints.get(method))

    if format == "peft":
        if method not in _PEFT_TYPES.values():
            raise AdapterError(f"PEFT has no {method} format: save it with format='ptune'")
        config, tensors = _METHODS[method].to_peft(state, model, task_type)
        metadata = {"format": "pt"}
    else:
        from ptune_rt._version import __version__
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ptune_rt_version": __version__,
                  "method": method, "config": state.config.to_dict(), **state.fingerprint(model)}
        tensors = dict(state.tensors)
        metadata = {"format": "pt", FORMAT_NAME: str(FORMAT_VERSION)}
    config_name, weights_name = FILES[format]
    if sharded:  # what the handlers copied without cpu_copy (BitFit, LN tuning) is still sharded
        tensors = gather_shards(tensors)

    # Serialize fully in memory first: nothing touches the disk until both files are known good.
    from safetensors.torch import save as safetensors_bytes
    try:
        config_bytes = (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        weight_bytes = safetensors_bytes(tensors, metadata=metadata)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"cannot serialize the adapter of {model_class(model)}: {e}") from e

    directory = Path(path)
    if not sharded:
        _write(directory, path, (config_name, config_bytes), (weights_name, weight_bytes))
        return str(directory)
    # A sharded model: every rank gathered the tensors above; rank 0 writes, the others wait for it
    # and raise if it failed.
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        _write(directory, path, (config_name, config_bytes), (weights_name, weight_bytes))
        return str(directory)
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            _write(directory, path, (config_name, config_bytes), (weights_name, weight_bytes))
        except BaseException as e:
            outcome[0] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise AdapterError(f"rank 0 failed to write the adapter of {model_class(model)} to {str(path)!r}: "
                           f"{outcome[0]}")
    return str(directory)


def _write(directory: Path, path: PathLike, config: tuple[str, bytes], weights: tuple[str, bytes]) -> None:
    if directory.suffix.lower() in PICKLE_SUFFIXES + (".safetensors", ".json") and not directory.is_dir():
        raise ValueError(f"path must be a directory to write {config[0]} and {weights[0]} into, got a file name "
                         f"{str(path)!r}")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"path {str(path)!r} exists and is not a directory")
    durable.replace_checkpoint(directory, config, weights, tuple(FILES.values()))


def _check_path_and_name(path, adapter_name) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise TypeError(f"adapter_name must be None or a non-empty str, got {adapter_name!r}")


def _unwrap_peft(model: nn.Module, adapter_name: Optional[str]):
    """A PeftModel (e.g. after ``ptune_rt.accelerate``) -> (its base model, {method: hint}): the hint
    is what the handler's ``hint_from_peft(peft_config, adapter_name, source)`` reads from the PEFT
    config of the adapter (LoRA: its LoRAConfig; prefix: the adapter's name); any other model ->
    (model, {}). Module names are the base model's."""
    configs = getattr(model, "peft_config", None)
    get_base = getattr(model, "get_base_model", None)
    if not isinstance(configs, dict) or not callable(get_base):
        return model, {}
    name = adapter_name or getattr(model, "active_adapter", None)
    cfg = configs.get(name) if isinstance(name, str) else None
    peft_type = getattr(cfg, "peft_type", None)
    method = _PEFT_TYPES.get(str(getattr(peft_type, "value", peft_type)))
    hook = getattr(_METHODS.get(method), "hint_from_peft", None)
    if hook is None:
        return get_base(), {}
    return get_base(), {method: hook(cfg, name, f"{type(model).__name__}.peft_config[{name!r}]")}


def _refuse_peft_models(model: nn.Module) -> None:
    """Each handler's ``refuse_peft_model(model)`` (where it has one) raises for a PEFT model whose
    adapter PEFT runs itself (ptune_rt cannot save or load into it)."""
    for handler in _METHODS.values():
        refuse = getattr(handler, "refuse_peft_model", None)
        if refuse is not None:
            refuse(model)


def _method_of(model: nn.Module, method: Optional[str] = None) -> str:
    found = [name for name, mod in _METHODS.items() if mod.has_adapter(model)]
    if method is not None:
        if method not in found:
            raise AdapterError(f"method={method!r}: {model_class(model)} carries no {method} adapter (it carries "
                               f"{found or 'none'})")
        return method
    if not found:
        raise AdapterError(f"{model_class(model)} carries no adapter modules: apply one first "
                           "(ptune_rt.apply(model, LoRAConfig(...), PrefixConfig(...), PromptTuningConfig(...) or "
                           "PTuningConfig(...))) or load one "
                           "(ptune_rt.load_adapter)")
    if len(found) > 1:
        raise AdapterError(f"{model_class(model)} carries adapters of several methods {found}; save them one by one "
                           f"with method={found[0]!r} / method={found[1]!r}")
    return found[0]


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------

def load_adapter(model: nn.Module, path: PathLike, *, format: Optional[str] = None, adapter_name: Optional[str] = None,
                 backend: Optional[str] = None) -> nn.Module:
    """Load the adapter in directory ``path`` into ``model`` (in place); returns the model.

    The format is detected from the config file (``adapter_config.json``: PEFT,
    ``ptune_config.json``: own) unless ``format`` is given. A model without adapter modules gets
    them (``ptune_rt.apply``) and then the weights; a model that has them must match the
    checkpoint (same targets, rank and scaling; for a prefix the same P, layers, kv heads, head
    size, projection and position mode; for a soft prompt the same method, P, tasks, template and
    encoder sizes) and gets its weights replaced. A PEFT prefix checkpoint becomes a prefix without
    projection (PEFT saves the projected prefix, not the MLP). A PEFT prompt-tuning or P-tuning
    checkpoint becomes prompt tuning: a table holding the saved virtual tokens (for P-tuning PEFT
    saves the encoder's output, and runs the file that way itself). Everything is checked before
    the model is changed: on any error the model is left exactly as it was.

    adapter_name: for a model that already has LoRA modules, which of their adapters to fill
        (default: the active one); a name none of them holds yet adds the checkpoint as another
        adapter of the same modules (its own rank, alpha and dropout; inactive until
        ``ptune_rt.set_adapter``; no trained biases or whole modules, which all adapters would
        share). A prefix or soft prompt has one adapter: leave it None.
    backend: backend of newly created LoRA modules, prefix or soft prompt ("auto", "triton", "torch"; default:
        the saved config's for the own format, "auto" for PEFT's).
    """
    _check_path_and_name(path, adapter_name)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be None (detect) or one of {FORMATS}, got {format!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    directory, format = _locate(path, format)
    _refuse_peft_models(model)
    given, (model, hints) = model, _unwrap_peft(model, adapter_name)

    config_file, d, weights_file, raw = durable.read_consistent(directory, *FILES[format], _read_files)
    if format == "peft":
        peft_type = d.get("peft_type")
        if peft_type not in _PEFT_TYPES:
            raise AdapterError(f"{config_file}: peft_type {peft_type!r} is not supported; ptune_rt loads PEFT "
                               f"adapters of type {', '.join(_PEFT_TYPES)}")
        method = _PEFT_TYPES[peft_type]
        spec = _METHODS[method].spec_from_peft(d, str(config_file), backend)
        tensors, file_key = _METHODS[method].tensors_from_peft(_tensors(raw), str(weights_file))
    else:
        if d.get("format") != FORMAT_NAME:
            raise AdapterError(f"{config_file}: 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise AdapterError(f"{config_file}: 'format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise AdapterError(f"{config_file}: format_version {version} was written by a newer ptune-rt; this "
                               f"version reads format_version <= {FORMAT_VERSION}")
        method = d.get("method")
        if method not in _METHODS:
            raise AdapterError(f"{config_file}: method {method!r} is not supported; supported methods: "
                               f"{', '.join(_METHODS)}")
        spec = _METHODS[method].spec_from_ptune(d, str(config_file), backend)
        tensors = _tensors(raw)

        def file_key(k: str) -> str:
            return k

    plan = _METHODS[method].plan_load(model, spec, tensors, adapter_name=adapter_name, file_key=file_key,
                                      weights_file=str(weights_file), hint=hints.get(method))
    others = _others_trainable(model, method)
    plan.execute()
    for p in others:
        p.requires_grad_(True)
    return given


def _pickle_refusal(file: Path) -> AdapterError:
    target = file.with_name(PEFT_WEIGHTS if file.name == "adapter_model.bin" else file.stem + ".safetensors")
    return AdapterError(
        f"{file}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are not loaded: unpickling can run arbitrary "
        "code. Only safetensors files are read. If you trust the file, convert it once, e.g.\n"
        f"    python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{file}', weights_only=True), '{target}', metadata={{'format': 'pt'}})\"\n"
        "or re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True) or ptune_rt.save_adapter.")


def _read_files(where: durable.Located):
    """(config file, its JSON, weights file, its tensors or the error reading them): a weights error
    is raised after the config's checks, as ``_tensors`` is called."""
    if where.config is None:  # removed since _locate found it (a save in another process)
        raise FileNotFoundError(f"{where.weights.parent} has no adapter config any more")
    d = _read_json(where.config)
    try:
        tensors = _read_safetensors(_weights_file(where.weights))
    except (AdapterError, OSError) as e:
        tensors = e
    return where.config, d, where.weights, tensors


def _tensors(raw):
    if isinstance(raw, BaseException):
        raise raw
    return raw


def _has_config(directory: Path, format: str) -> bool:
    return durable.locate(directory, *FILES[format]).config is not None


def _locate(path: PathLike, format: Optional[str]) -> tuple[Path, str]:
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(p)
    names = {f: fmt for fmt, pair in FILES.items() for f in pair}
    if p.name in names and not p.exists() and p.parent.is_dir():  # e.g. a config moved aside by a killed save
        format, p = format or names[p.name], p.parent
    if p.is_file():
        if p.name not in names:
            raise AdapterError(f"path {str(path)!r} is a file; pass the adapter directory (holding "
                               f"{PEFT_CONFIG} or {PTUNE_CONFIG})")
        if format is None:
            format = "peft" if p.name in (PEFT_CONFIG, PEFT_WEIGHTS) else "ptune"
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    has_peft, has_ptune = _has_config(p, "peft"), _has_config(p, "ptune")
    if format is None:
        if has_peft and has_ptune:
            raise AdapterError(f"{p} holds both {PEFT_CONFIG} (PEFT) and {PTUNE_CONFIG} (ptune-rt): pass "
                               "format='peft' or format='ptune'")
        if not (has_peft or has_ptune):
            # No config, so no adapter: whatever else the folder holds (a Trainer's optimizer.pt,
            # a whole model) is named, not refused as a pickle adapter.
            found = sorted(f.name for f in p.iterdir() if not f.name.startswith("."))
            listed = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
            raise FileNotFoundError(f"{p} holds no adapter: expected {PEFT_CONFIG} (PEFT) or {PTUNE_CONFIG} "
                                    f"(ptune-rt); it holds {listed or 'nothing'}")
        format = "peft" if has_peft else "ptune"
    if not _has_config(p, format):
        raise FileNotFoundError(f"{p} has no {FILES[format][0]} (needed for format={format!r})")
    return p, format


def _weights_file(f: Path) -> Path:
    if f.is_file():
        return f
    pickles = sorted(g for g in f.parent.iterdir() if g.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(pickles[0])
    raise FileNotFoundError(f"{f.parent} has no {f.name}")


def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise AdapterError(f"{file} must hold a JSON object, got {type(d).__name__}")
    return d


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU; a damaged file raises AdapterError naming it."""
    from safetensors import SafetensorError, safe_open
    with open(file, "rb"):  # an OS error (no read permission, ...) as the OS states it: safetensors' misreports it
        pass
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{file} is not a readable safetensors file (corrupt or truncated?): {e}") from e
