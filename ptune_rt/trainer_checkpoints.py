"""Hugging Face ``Trainer`` checkpoints of a model passed through ``ptune_rt.apply`` hold the
adapter, never the frozen base model, with no change to the user's Trainer code.

``apply`` calls :func:`install` on a ``transformers.PreTrainedModel`` instance and ``restore``
calls :func:`uninstall` (the instance's ``__dict__`` and load hooks come back as before). The
instance's own ``save_pretrained``, which the Trainer writes every ``checkpoint-N/`` through, saves
the adapter as ``ptune_rt.save_adapter`` does (PEFT's layout, which ``load_adapter`` and
``PeftModel.from_pretrained`` read; ptune-rt's where PEFT's cannot hold it; one folder per method
when there are several) plus ``model.safetensors`` with only the trainable parameters, the file
the Trainer reloads on resume and for the best model. Two documented ``load_state_dict`` hooks drop
the file's guard tensor and clear the frozen base's missing keys. Why these files and not a
callback, what the guard is for, and what is not covered: :data:`DESIGN`.
"""
from __future__ import annotations

import functools
import os
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

DESIGN = """
Why these files (transformers 5.23, ``trainer.py``). For a model that is not a ``PeftModel``:

* ``train(resume_from_checkpoint=...)`` (``_load_from_checkpoint``) loads ``model.safetensors``
  by ``model.load_state_dict(state, strict=False)``; with only an adapter in the folder it calls
  ``load_sharded_checkpoint``, which raises without a ``model.safetensors.index.json``;
* ``load_best_model_at_end`` (``_load_best_model``): once ``adapter_model.safetensors`` exists it
  reads ``model.safetensors``, or else ``torch.load("pytorch_model.bin")`` (FileNotFoundError);
  it never looks at an index.

So a stock Trainer reloads a model that is not a ``PeftModel`` only from ``model.safetensors`` (or
a pickle): PEFT's two files alone can be neither resumed nor loaded as the best model. Both loads
run outside every ``TrainerCallback`` event (resume before ``on_train_begin``, the best model
before ``on_train_end``), so no callback can serve; a Trainer subclass overriding those private
loaders would need a change in the user's code and track Trainer's internals. Hence the small
``model.safetensors`` beside the adapter: by ``state_dict`` name it is lossless for every method
and combination (PEFT's prefix file holds the projected prefix, not the MLP the optimizer trains)
and torch's own ``load_state_dict`` reads it, with no key mapping. It costs a second copy of the
adapter's size. Measured on the test's tiny Llama (LoRA r=4 on q/v): a checkpoint's weights went
from 372 KB (the whole model, base keys renamed, plus config.json) to 8.2 KB + 8.4 KB; a run
resumed from step 2 ends on the uninterrupted run's weights exactly.

``from_pretrained(checkpoint)``, e.g. ``LlamaForCausalLM``'s: as in a PEFT checkpoint there is no
``config.json``. With PEFT installed transformers follows ``adapter_config.json``: it loads the
base named by ``base_model_name_or_path`` and puts the adapter on it (LoRA), or raises (prompt
learning, which its PEFT integration does not load; a base built from a config has no name to
follow). Without PEFT, transformers 5.x builds the class's default config for a folder without
``config.json`` and reads ``model.safetensors`` as the model's weights; the guard, a zero-size
tensor under the name of a frozen weight (the input embedding's), then fails the load with a size
mismatch instead of leaving a randomly initialised model (transformers initialises the default
model before it raises: for Llama's default config that is 7B parameters). Any other reader of
the file that does not know it (``load_state_dict`` into a plain model) fails on the guard too.

Not covered: ``save_pretrained(state_dict=...)`` (the Trainer passes one under DeepSpeed, FSDP and
SageMaker model parallelism) is refused, since the adapter is read from the model's own modules,
and so is a model sharded by FSDP2 (``ptune_rt.save_adapter`` saves those on every rank);
``push_to_hub=True`` is refused (save, then upload the folder). A model whose adapter came from
``load_adapter`` alone keeps the class's ``save_pretrained``; PEFT models run by
``ptune_rt.accelerate`` are ``PeftModel`` s, which the Trainer saves and reloads itself.
"""

#: The Trainer's own reload file (transformers' ``SAFE_WEIGHTS_NAME``).
TRAINER_WEIGHTS = "model.safetensors"
#: The metadata that says so in the file.
RELOAD_NOTE = ("trainable parameters of a ptune-rt model for the HF Trainer's reload; the adapter is in "
               "adapter_model.safetensors (or adapter.safetensors)")
#: The removable handles of the load_state_dict pre- and post-hook, in the model's ``__dict__`` while
#: installed.
HOOK_ATTR = "_ptune_rt_trainer_load_hook"


def install(model: nn.Module, applied_methods) -> None:
    """Give a ``PreTrainedModel`` instance the adapter ``save_pretrained`` and the two load hooks
    (once; other models, and an instance that already has its own ``save_pretrained``, are left
    alone). ``applied_methods(model)``: the registry's list of the methods a model carries."""
    if HOOK_ATTR in model.__dict__ or "save_pretrained" in model.__dict__ or not _is_pretrained_model(model):
        return
    # transformers offers no hook into save_pretrained: the Trainer calls the method itself, and
    # the class's writes config.json and every weight. An instance attribute changes this model
    # only and leaves with ptune_rt.restore. (A partial, not a bound method: it survives pickling.)
    model.__dict__["save_pretrained"] = functools.partial(save_pretrained, applied_methods, model)
    model.__dict__[HOOK_ATTR] = (
        model.register_load_state_dict_pre_hook(_drop_guard),
        model.register_load_state_dict_post_hook(functools.partial(_forget_frozen_missing, applied_methods)))


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (a no-op where it did nothing)."""
    for handle in model.__dict__.pop(HOOK_ATTR, ()):
        handle.remove()
    installed = model.__dict__.get("save_pretrained")
    if isinstance(installed, functools.partial) and installed.func is save_pretrained:
        del model.__dict__["save_pretrained"]


def _is_pretrained_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def save_pretrained(applied_methods, model: nn.Module, save_directory, is_main_process: bool = True,
                    state_dict=None, push_to_hub: bool = False, **kwargs) -> None:
    """``model.save_pretrained`` of a model carrying ptune-rt methods: the adapter and the
    trainable parameters into ``save_directory`` (see the module docstring); nothing of the
    frozen base. Only the main process writes. Keyword arguments that shape a full-model export
    (``max_shard_size``, ``variant``, ``safe_serialization``, ...) have nothing to act on and are
    ignored. A model that no longer carries a method (``ptune_rt.merge_and_unload``) is saved by
    its class's ``save_pretrained``, whole."""
    present = applied_methods(model)
    if not present:
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
    if state_dict is not None:
        raise ValueError(f"save_pretrained(state_dict=...) of a {type(model).__name__} carrying ptune-rt methods: the "
                         "adapter is read from the model's own modules, so a given state_dict cannot be honoured (a "
                         "Trainer passes one under DeepSpeed, FSDP or SageMaker model parallelism, which ptune-rt's "
                         "Trainer checkpoints do not cover); call save_pretrained(path) without it")
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True) of a model carrying ptune-rt methods is not supported: "
                         "save_pretrained(path), then upload the folder")
    from ptune_rt.io.common import is_sharded

    if is_sharded(model):
        raise ValueError(f"save_pretrained of a sharded {type(model).__name__} (FSDP2 / DTensor parameters) is not "
                         "supported: call ptune_rt.save_adapter(model, path) on every rank, which gathers the adapter")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a str or os.PathLike, got {type(save_directory).__name__}")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {str(save_directory)!r} exists and is not a directory")
    if not is_main_process:
        return
    from safetensors.torch import save as safetensors_bytes

    weights = safetensors_bytes(_reload_state(model), metadata={"format": "pt", "ptune-rt": RELOAD_NOTE})
    directory.mkdir(parents=True, exist_ok=True)
    for method in present:
        _save_adapter(model, method, directory / method.name if len(present) > 1 else directory,
                      method.name if len(present) > 1 else None)
    _write_atomically(directory / TRAINER_WEIGHTS, weights)


def _save_adapter(model: nn.Module, method, where: Path, name) -> None:
    from ptune_rt.io.adapters import save_adapter
    from ptune_rt.errors import AdapterError

    if method.peft_types:
        try:
            save_adapter(model, where, format="peft", method=name)
            return
        except AdapterError as e:  # e.g. a P-tuning template PEFT cannot express
            warnings.warn(f"PEFT's layout cannot hold this {method.name} adapter ({e}); {where} gets it in ptune-rt's "
                          "own layout, which ptune_rt.load_adapter loads", stacklevel=3)
    save_adapter(model, where, format="ptune", method=name)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by ``state_dict`` name (a parameter shared under
    several names once, under its first), detached on CPU: what ``model.safetensors`` holds
    besides its guard."""
    return {k: t.detach().cpu().contiguous() for k, t in _trainable_names(model)[0].items()}


def _reload_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The content of ``model.safetensors``: the trainable parameters and, under the name of a
    frozen weight, a zero-element guard, so that a reader taking the file for a model's weights
    (``from_pretrained`` without PEFT, see the module docstring) fails on a size mismatch instead
    of leaving the model randomly initialised; the pre-hook ``_drop_guard`` removes it."""
    state = trainable_state(model)
    guard = _guard(model)
    if guard is not None:
        state[guard[0]] = torch.zeros(0, dtype=guard[1].dtype)
    return state


def _guard(model: nn.Module):
    """(name, tensor) of the frozen weight whose name guards ``model.safetensors``: the input
    embedding's, else the first frozen parameter's; None if nothing is frozen."""
    frozen = [(k, t) for k, t in model.state_dict(keep_vars=True).items()
              if isinstance(t, nn.Parameter) and not t.requires_grad and t.numel()]
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
    return next((kt for kt in frozen if kt[1] is embedding), frozen[0] if frozen else None)


def _drop_guard(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs) -> None:
    """Pre-hook of ``load_state_dict``: removes the guard of ``model.safetensors`` (a zero-element
    tensor under the name of a non-empty frozen weight) before torch compares shapes."""
    empty = [k for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor) and not v.numel()]
    if not empty:
        return
    own = module.state_dict(keep_vars=True)
    for k in empty:
        t = own.get(k[len(prefix):])
        if isinstance(t, nn.Parameter) and not t.requires_grad and t.numel():
            del state_dict[k]


def _trainable_names(model: nn.Module) -> tuple[dict, set]:
    """({first state_dict name -> trainable parameter}, every state_dict name of a trainable
    parameter)."""
    first: dict = {}
    every: set = set()
    seen: set = set()
    for k, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter) and t.requires_grad:
            every.add(k)
            if id(t) not in seen:
                seen.add(id(t))
                first[k] = t
    return first, every


def _forget_frozen_missing(applied_methods, module: nn.Module, incompatible) -> None:
    """Post-hook of ``load_state_dict``: a load of exactly the trainable parameters (the
    Trainer's reload of ``model.safetensors``) reports no missing keys (torch documents the lists
    as editable in place; ``strict=True`` then passes)."""
    if not incompatible.missing_keys or incompatible.unexpected_keys:
        return
    if not applied_methods(module):
        return
    first, every = _trainable_names(module)
    loaded = set(module.state_dict(keep_vars=True)) - set(incompatible.missing_keys)
    if first and set(first) <= loaded <= every:
        incompatible.missing_keys.clear()


def _write_atomically(file: Path, data: bytes) -> None:
    """``file`` holds the old bytes or ``data``, never a part (temporary, fsync, rename)."""
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(file.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
