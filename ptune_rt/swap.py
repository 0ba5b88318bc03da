"""The module-swap layer: put fused LoRA modules into a model instance and take them out again.

* ``apply_lora(model, config)``: replace the target nn.Linear / GPT-2 Conv1D layers by
  ``LoRALinear`` modules with fresh adapters, freeze the rest.
* ``accelerate_peft(peft_model)``: replace the LoRA layers of an existing PEFT model by
  ``LoRALinear`` modules that reuse its very Parameter objects under the same names.
* ``merge`` / ``unmerge``: fold the adapters into the base weights and back (bit-exact).
* ``restore_lora``: put the original modules back (the very same objects).
* ``lora_rows`` / ``prefix_rows`` / ``prompt_rows`` and their summaries: the ``report`` rows of
  these methods (which backend every swapped module, prefixed attention layer and soft prompt
  takes, and why), for the method registry (``ptune_rt.registry``).

Only the instance passed in is changed, never a class. Every public function validates
everything it needs before it changes anything, so a failed call leaves the model as it was.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ptune_rt.methods._config import check_bool
from ptune_rt.methods.lora import (META_MERGE, Conv1D, LoRAConfig, LoRALinear, RecomputeSwiGLUMixin,
                                   disable_mlp_recompute, disable_projection_groups, enable_mlp_recompute,
                                   enable_projection_groups, linear_shape, projection_group_names)
from ptune_rt.ops.lora_linear import BACKENDS, OP_DTYPES, resolve_backend

#: Default targets per model type when ``target_modules`` is None (the same choice PEFT makes).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "t5": ["q", "v"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}

#: Top-level submodules ptune-rt itself attaches (prefix / prompt encoders): never LoRA targets.
OWN_MODULES = ("prompt_encoder",)
#: Model attribute holding the LoRAConfig of ``apply_lora`` (read by adapter checkpoint code).
CONFIG_ATTR = "_ptune_rt_config"
#: Model attribute holding the requires_grad flags (by parameter name) from before ``apply_lora``.
REQUIRES_GRAD_ATTR = "_ptune_rt_requires_grad"
#: LoRALinear attribute: the module ``restore`` puts back (not registered as a submodule).
ORIGIN_ATTR = "_ptune_rt_origin"
#: LoRALinear attribute: "apply" or "peft", how the module got into the model.
SOURCE_ATTR = "_ptune_rt_source"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        names.update(n for n, m in model.named_modules() if m is out)
    return names


def _peft_lora_classes():
    """(LoraLayer, lora Linear) of the installed PEFT, or (None, None) without PEFT."""
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except Exception:
        return None, None
    return LoraLayer, Linear


def _peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    LoraLayer, _ = _peft_lora_classes()
    if LoraLayer is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


_PEFT_LORA_LINEAR = None


def _peft_lora_linear_class():
    """``PeftLoRALinear``: the module ``accelerate_peft`` puts in, defined on first use (imports PEFT)."""
    global _PEFT_LORA_LINEAR
    if _PEFT_LORA_LINEAR is not None:
        return _PEFT_LORA_LINEAR
    from peft.tuners.tuners_utils import BaseTunerLayer

    class PeftLoRALinear(LoRALinear, BaseTunerLayer):
        """A ``LoRALinear`` that PEFT also recognises as one of its tuner layers.

        PEFT finds its layers structurally (``isinstance(m, BaseTunerLayer)``): so do its
        ``save_pretrained`` / ``get_peft_model_state_dict``, ``merge_adapter`` / ``unmerge_adapter``
        and the ``disable_adapter()`` context. Those keep working on this module: its
        ``active_adapter``, ``merged`` and ``disabled`` state is PEFT's own (``_active_adapter``,
        ``merged_adapters``, ``_disable_adapters``), ``merge`` accepts PEFT's arguments, and a
        disabled, merged layer unmerges before running, as PEFT's does. It holds one adapter:
        switching to or deleting other adapters raises. PEFT's ``add_adapter`` / ``load_adapter``
        under a new name would wrap this layer in a new PEFT layer (renaming its parameters):
        call ``ptune_rt.restore(peft_model)`` first, which puts PEFT's own layers back.
        """

        adapter_layer_names = ("lora_A", "lora_B")
        other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout_p")

        @property
        def active_adapter(self) -> str:
            return self._active_adapter

        @active_adapter.setter
        def active_adapter(self, name: str) -> None:
            self._active_adapter = name

        @property
        def merged(self) -> bool:
            return bool(self.merged_adapters)

        @merged.setter
        def merged(self, value: bool) -> None:
            self.merged_adapters = [self._active_adapter] if value else []

        @property
        def disabled(self) -> bool:
            return self._disable_adapters

        @disabled.setter
        def disabled(self, value: bool) -> None:
            self._disable_adapters = bool(value)

        def forward(self, x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"{type(self).__name__} takes only the input tensor; got extra arguments "
                                f"{sorted(kwargs) or len(args)} (PEFT's mixed-batch adapter_names is not supported: "
                                "call ptune_rt.restore(peft_model) first)")
            if self.disabled and self.merged:
                self.unmerge()
            return super().forward(x)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            if adapter_names is not None and list(adapter_names) != [self._active_adapter]:
                raise ValueError(f"adapter_names={adapter_names!r}: this layer holds only the adapter "
                                 f"{self._active_adapter!r}")
            if not self.disabled:
                LoRALinear.merge(self)

        def unmerge(self) -> None:
            LoRALinear.unmerge(self)

        def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            if names != list(self.lora_A):
                raise ValueError(f"adapter_names={adapter_names!r}: a layer swapped by ptune_rt.accelerate holds "
                                 f"only the adapter {list(self.lora_A)}; call ptune_rt.restore(peft_model) to "
                                 "switch adapters")
            for layer in (*self.lora_A.values(), *self.lora_B.values()):
                layer.requires_grad_(not inference_mode)
            self._active_adapter = names[0]

        def delete_adapter(self, adapter_name: str, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot delete its adapter; call "
                             "ptune_rt.restore(peft_model) first")

        def update_layer(self, *args, **kwargs) -> None:
            raise ValueError("a layer swapped by ptune_rt.accelerate cannot take another adapter; call "
                             "ptune_rt.restore(peft_model) first")

    PeftLoRALinear.__module__ = __name__
    PeftLoRALinear.__qualname__ = "PeftLoRALinear"
    _PEFT_LORA_LINEAR = PeftLoRALinear
    return PeftLoRALinear


def peft_lora_linear_class_or_none():
    """The class ``accelerate`` gives PEFT's LoRA layers, or None while no PEFT model was accelerated
    (no layer can be one then; PEFT is not imported for the question)."""
    return _PEFT_LORA_LINEAR


def __getattr__(name: str):
    # ``ptune_rt.swap.PeftLoRALinear`` exists once PEFT is imported; pickle finds it here too.
    if name == "PeftLoRALinear":
        return _peft_lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _require_module(model, arg: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")


def _require_swapped(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    _require_module(model)
    mods = lora_modules(model)
    if not mods:
        raise ValueError(f"{what}: model has no ptune-rt LoRA modules; expected a model passed through "
                         "ptune_rt.apply(...) or ptune_rt.accelerate(...)")
    return mods


def _check_weight_dtype(module_name: str, layer: nn.Module, what: str, backend: str) -> None:
    """Refuse now, not at the first forward, a layer whose dtype the chosen path cannot run: the fused
    op takes float32, float16 and bfloat16; float64 runs on the torch path only (as plain torch ops)."""
    dtype = layer.weight.dtype
    if dtype in OP_DTYPES:
        return
    if dtype == torch.float64:
        chosen, why = resolve_backend(backend, layer.weight.device)
        if chosen == "torch":
            return
        raise ValueError(f"{what} {module_name!r}, whose weight is float64; the Triton kernels ({why}) take float32, "
                         "float16 and bfloat16: cast the model, or run float64 with backend='torch' on CPU")
    raise ValueError(f"{what} {module_name!r}, whose weight is {dtype}; ptune-rt's LoRA runs float32, float16 and "
                     "bfloat16 layers (float64 on the torch path): cast the model or leave this layer out")


def _check_backend(backend: str, module_name: str, layer: nn.Module, arg: str) -> None:
    try:
        resolve_backend(backend, layer.weight.device)
    except RuntimeError as e:
        raise ValueError(f"{arg}={backend!r} cannot run target {module_name!r}: {e}") from None


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules ``target_modules`` selects; raises naming what did not match.

    A list selects modules whose name equals an entry or ends with ``"." + entry``; a string is
    a regular expression matched against full module names; ``"all-linear"`` selects every
    nn.Linear / Conv1D except the output layer; None takes the model type's default.
    """
    if target_modules is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(f"LoRAConfig.target_modules is None and there is no default for model type "
                             f"{mtype!r}: pass LoRAConfig(target_modules=[...])")
        target_modules = DEFAULT_TARGETS[mtype]
    # ptune-rt's own trainable modules (a prefix / prompt encoder) are never LoRA targets.
    named = {n: m for n, m in model.named_modules() if n.split(".")[0] not in OWN_MODULES}
    order = {n: i for i, n in enumerate(named)}
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [n for n, m in named.items() if _is_linear(m) and n not in skip]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"LoRAConfig.target_modules={target_modules!r} is not a valid regular expression: "
                             f"{e}") from None
        names = [n for n in named if n and pattern.fullmatch(n)]
    else:
        names, unmatched = set(), []
        for t in target_modules:
            hits = [n for n in named if n == t or n.endswith("." + t)]
            if not hits:
                unmatched.append(t)
            names.update(hits)
        if unmatched:
            raise ValueError(f"LoRAConfig.target_modules entries {unmatched} match no module of "
                             f"{type(model).__name__}; expected names (or name suffixes) of its nn.Linear / "
                             f"Conv1D layers, e.g. {_example_linear_names(named)}")
        names = sorted(names, key=order.__getitem__)
    if not names:
        raise ValueError(f"LoRAConfig.target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__}")
    for n in names:
        m = named[n]
        if not _is_linear(m):
            raise TypeError(f"LoRAConfig.target_modules selects module {n!r}, a {type(m).__name__}; "
                            "LoRA targets must be nn.Linear or GPT-2 Conv1D layers")
    return names


def _example_linear_names(named: dict) -> list[str]:
    leaves = []
    for n, m in named.items():
        leaf = n.rpartition(".")[2]
        if _is_linear(m) and leaf not in leaves:
            leaves.append(leaf)
    return leaves[:8]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _refuse_already_swapped(model: nn.Module) -> None:
    mods = lora_modules(model)
    if mods:
        first = next(iter(mods))
        raise ValueError(f"model already carries ptune-rt LoRA modules (e.g. {first!r}); expected an unswapped "
                         "model: call ptune_rt.restore(model) first")


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Swap the targets of ``config`` for ``LoRALinear`` modules (in place) and freeze the rest.

    Afterwards exactly these parameters train: every adapter's lora_A / lora_B, plus the targets'
    biases with ``bias="lora_only"`` or every parameter named ``*.bias`` with ``bias="all"`` (as
    in PEFT). The previous requires_grad flags are kept and given back by ``restore``.
    """
    _require_module(model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    config.validate()
    _refuse_already_swapped(model)
    peft_layers = _peft_lora_layers(model)
    if peft_layers:
        raise ValueError(f"model already has PEFT LoRA layers (e.g. {next(iter(peft_layers))!r}); expected a "
                         "plain model: use ptune_rt.accelerate(peft_model) to run a PEFT model on fused modules")
    names = resolve_targets(model, config.target_modules)
    for n in names:  # every check before the first change
        layer = model.get_submodule(n)
        in_f, out_f = linear_shape(layer)
        if config.r > min(in_f, out_f):
            raise ValueError(f"LoRAConfig.r={config.r} must be at most min(in_features={in_f}, "
                             f"out_features={out_f}) of target {n!r}")
        _check_backend(config.backend, n, layer, "LoRAConfig.backend")
        _check_weight_dtype(n, layer, "LoRAConfig.target_modules selects", config.backend)
    new = {n: LoRALinear(model.get_submodule(n), config.r, config.alpha, config.dropout, config.use_rslora,
                         config.init, config.backend) for n in names}

    # Nothing below can fail on a validated model.
    before = {pn: p.requires_grad for pn, p in model.named_parameters()}
    trainable_bias = set()
    if config.bias == "all":
        trainable_bias = {pn for pn in before if pn.rpartition(".")[2] == "bias"}
    elif config.bias == "lora_only":
        trainable_bias = {f"{n}.bias" for n in names if new[n].base_layer.bias is not None}
    for pn, p in model.named_parameters():
        p.requires_grad_(pn in trainable_bias)
    for n, m in new.items():
        m.__dict__[ORIGIN_ATTR] = m.base_layer
        m.__dict__[SOURCE_ATTR] = "apply"
        m.train(m.base_layer.training)
        _set_submodule(model, n, m)
    if config.recompute_mlp:
        enable_mlp_recompute(model)
    if config.group_projections:
        enable_projection_groups(model)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, REQUIRES_GRAD_ATTR, before)
    return model


def accelerate_peft(peft_model: nn.Module, backend: str = "auto") -> list[dict]:
    """Run an existing PEFT LoRA model on fused ``LoRALinear`` modules, in place; returns ``report``.

    Every ``peft.tuners.lora.layer.Linear`` (over nn.Linear, or GPT-2 Conv1D with
    fan_in_fan_out) is replaced by a ``PeftLoRALinear`` (a ``LoRALinear`` that PEFT also sees as
    one of its tuner layers) holding the very same base layer and lora_A / lora_B modules, hence
    the same Parameter objects under the same names: ``named_parameters()`` and ``state_dict()``
    keys, an optimizer built before the call and requires_grad flags are unaffected, and PEFT's
    ``save_pretrained``, ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload`` and
    ``disable_adapter()`` keep working. Scaling (rsLoRA included) and the dropout rate are taken
    from each layer; the dropout mask itself is drawn differently from PEFT's.

    Supported: one adapter per layer, active and unmerged. Refused before any change: DoRA and
    other LoRA variants, lora_bias, several adapters in a layer or several active adapters,
    merged or disabled layers, LoRA on embeddings / convolutions / quantized layers. Switching
    or deleting adapters and PEFT's mixed-batch ``adapter_names`` raise on the swapped layers;
    adding or loading another adapter through PEFT would wrap them (renaming their parameters).
    For any of these, ``ptune_rt.restore(peft_model)`` first puts PEFT's own layers back.

    A PEFT prefix-tuning / P-tuning v2 model goes through the fused prefix attention instead
    (``ptune_rt.peft_compat.accelerate_prefix``; it returns one report row).
    """
    _require_module(peft_model, "peft_model")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from ptune_rt import peft_compat  # PEFT prefix tuning / P-tuning v2 models: the fused prefix attention

    if peft_compat.is_peft_prefix_model(peft_model):
        from ptune_rt.methods.prefix import check_model_dtype

        check_model_dtype(peft_model, "ptune_rt.accelerate")
        return peft_compat.accelerate_prefix(peft_model, backend)
    LoraLayer, PeftLinear = _peft_lora_classes()
    if LoraLayer is None:
        raise RuntimeError("ptune_rt.accelerate needs the peft package, which cannot be imported")
    _refuse_already_swapped(peft_model)
    layers = _peft_lora_layers(peft_model)
    if not layers:
        raise ValueError(f"peft_model ({type(peft_model).__name__}) has no PEFT LoRA layers; expected a model "
                         "from peft.get_peft_model(model, LoraConfig(...))")
    plans = {n: _plan_peft_layer(n, m, PeftLinear, backend) for n, m in layers.items()}
    cls = _peft_lora_linear_class()
    new = {}
    for n, (m, adapter, dropout) in plans.items():
        lora = cls.from_adapter_modules(m.base_layer, m.lora_A[adapter], m.lora_B[adapter],
                                               scaling=float(m.scaling[adapter]), alpha=m.lora_alpha[adapter],
                                               dropout=dropout, backend=backend, adapter_name=adapter)
        lora.__dict__[ORIGIN_ATTR] = m
        lora.__dict__[SOURCE_ATTR] = "peft"
        lora.train(m.training)
        new[n] = lora
    for n, lora in new.items():  # nothing below can fail on a validated model
        _set_submodule(peft_model, n, lora)
    enable_mlp_recompute(peft_model)  # SwiGLU MLPs: recompute the gated product in backward
    enable_projection_groups(peft_model)  # q/k/v, gate/up: one shrink, dA and dX per group
    return lora_rows(peft_model)


def _plan_peft_layer(name: str, m: nn.Module, PeftLinear, backend: str):
    """Validate one PEFT LoRA layer; returns (layer, adapter name, dropout p)."""
    where = f"PEFT LoRA layer {name!r}"
    if type(m) is not PeftLinear:
        kind = type(m).__name__
        raise TypeError(f"{where} is a {type(m).__module__}.{kind}; ptune_rt.accelerate supports LoRA on "
                        "nn.Linear and GPT-2 Conv1D layers only (peft.tuners.lora.layer.Linear), not "
                        "embedding, convolution or quantized LoRA layers")
    base = m.base_layer
    if not _is_linear(base):
        raise TypeError(f"{where} wraps a {type(base).__name__}; expected an nn.Linear or GPT-2 Conv1D base layer")
    magnitude = getattr(m, "lora_magnitude_vector", {})  # DoRA
    adapters = sorted(set(m.lora_A) | set(m.lora_B) | set(getattr(m, "lora_embedding_A", {})) | set(magnitude))
    active = list(m.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{where} has active adapters {active}; ptune_rt.accelerate supports exactly one active "
                         "adapter (peft_model.set_adapter(name))")
    adapter = active[0]
    if adapters != [adapter]:
        raise ValueError(f"{where} holds adapters {adapters} (active: {adapter!r}); ptune_rt.accelerate supports "
                         "one adapter per layer: delete the others (peft_model.delete_adapter(name))")
    if getattr(m, "use_dora", {}).get(adapter, False) or len(magnitude):
        raise ValueError(f"{where} uses DoRA (use_dora=True), which ptune_rt.accelerate does not support")
    variant = getattr(m, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(f"{where} uses the LoRA variant {type(variant).__name__}, which ptune_rt.accelerate "
                         "does not support; expected plain LoRA")
    if getattr(m, "lora_bias", {}).get(adapter, False) or m.lora_B[adapter].bias is not None:
        raise ValueError(f"{where} has lora_bias=True, which ptune_rt.accelerate does not support")
    if m.merged:
        raise ValueError(f"{where} is merged ({m.merged_adapters}); expected unmerged layers: call "
                         "peft_model.unmerge_adapter() first")
    if m.disable_adapters:
        raise ValueError(f"{where} has its adapters disabled; expected enabled adapters (leave "
                         "peft_model.disable_adapter() first)")
    drop = m.lora_dropout[adapter] if adapter in m.lora_dropout else nn.Identity()
    if isinstance(drop, nn.Dropout):
        p = float(drop.p)
    elif isinstance(drop, nn.Identity):
        p = 0.0
    else:
        raise TypeError(f"{where} has a lora_dropout of type {type(drop).__name__}; expected nn.Dropout or "
                        "nn.Identity")
    a, b = m.lora_A[adapter], m.lora_B[adapter]
    in_f, out_f = linear_shape(base)
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"{where}: lora_A / lora_B must be nn.Linear, got {type(a).__name__} / {type(b).__name__}")
    r = a.weight.shape[0]
    if tuple(a.weight.shape) != (r, in_f) or tuple(b.weight.shape) != (out_f, r):
        raise ValueError(f"{where}: lora_A.weight {tuple(a.weight.shape)} / lora_B.weight "
                         f"{tuple(b.weight.shape)} do not fit the base layer (in={in_f}, out={out_f}); "
                         f"expected [r, {in_f}] and [{out_f}, r]")
    if a.weight.dtype != b.weight.dtype:
        raise TypeError(f"{where}: lora_A and lora_B have dtypes {a.weight.dtype} and {b.weight.dtype}; "
                        "expected one dtype")
    dev = base.weight.device
    if a.weight.device != dev or b.weight.device != dev:
        raise ValueError(f"{where}: lora_A / lora_B are on {a.weight.device} / {b.weight.device} but the base "
                         f"weight is on {dev}; expected one device")
    _check_backend(backend, name, base, "backend")
    _check_weight_dtype(name, base, "ptune_rt.accelerate: PEFT LoRA layer", backend)
    return m, adapter, p


def merge(model: nn.Module, untie: bool = False) -> nn.Module:
    """Fold every swapped module's adapter into its base weight (see ``LoRALinear.merge``).

    A base weight shared with another parameter (a tied model whose ``lm_head`` is a target shares
    it with the input embedding) would give that parameter ``s B A`` too: refused with a
    ValueError naming them, unless ``untie=True``, which first gives each such base layer its own
    copy of the weight, sets ``tie_word_embeddings=False`` in the model's config so transformers
    does not tie them again, and warns naming the parameters (PEFT warns and merges).

    All or nothing: if one module cannot merge, those merged by this call are unmerged again
    (bit-exact) and untied weights are tied again before the error propagates."""
    mods = _require_swapped(model, "merge")
    check_bool("untie", untie)
    todo = {n: m for n, m in mods.items() if not m.merged}
    for n, m in todo.items():
        if m.disabled:
            raise ValueError(f"cannot merge module {n!r}: its adapter is disabled")
        if m.active_adapter not in m.lora_A:
            raise ValueError(f"cannot merge module {n!r}: active_adapter {m.active_adapter!r} is not one of its "
                             f"adapters {list(m.lora_A)}")
        if m.on_meta():
            raise ValueError(f"module {n!r}: {META_MERGE}")
    tied = _tied_base_weights(model, todo)
    if tied and not untie:
        raise ValueError(f"cannot merge: {_describe_ties(tied)}; merging would add the adapter to those parameters "
                         "too. Pass untie=True to give each LoRA base layer its own copy of the weight first")
    retie = _untie(model, todo, tied) if tied else (lambda: None)
    done = []
    try:
        for m in todo.values():
            m.merge()
            done.append(m)
    except Exception:
        for m in reversed(done):
            m.unmerge()
        retie()
        raise
    return model


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _tied_base_weights(model: nn.Module, mods: dict[str, LoRALinear]) -> dict[str, list[str]]:
    """LoRA module name -> the other parameters sharing its base weight's storage (tied weights)."""
    by_storage: dict[tuple, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_storage.setdefault(_storage_key(p), []).append(n)
    out = {}
    for n, m in mods.items():
        own = f"{n}.base_layer.weight"
        others = [p for p in by_storage.get(_storage_key(m.base_layer.weight), []) if p != own]
        if others:
            out[n] = others
    return out


def _describe_ties(tied: dict[str, list[str]]) -> str:
    return "; ".join(f"the base weight of LoRA module {n!r} is tied to {others}" for n, others in tied.items())


def _untie(model: nn.Module, mods: dict[str, LoRALinear], tied: dict[str, list[str]]):
    """Give each tied base layer its own copy of its weight and switch the config's tying off;
    returns the function that undoes both."""
    import warnings

    configs = [c for c in _tie_configs(model) if getattr(c, "tie_word_embeddings", False)]
    olds = {n: mods[n].base_layer.weight for n in tied}
    warnings.warn(f"ptune_rt.merge(untie=True): {_describe_ties(tied)}; each of these LoRA base layers gets its own "
                  "copy of the weight before merging (the tied parameters keep theirs), and the model config's "
                  "tie_word_embeddings is set to False", UserWarning, stacklevel=3)
    for n, w in olds.items():
        mods[n].base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    for c in configs:
        c.tie_word_embeddings = False

    def retie():
        for n, w in olds.items():
            mods[n].base_layer.weight = w
        for c in configs:
            c.tie_word_embeddings = True
    return retie


def _tie_configs(model: nn.Module) -> list:
    """The model's transformers config and its text config (where tie_word_embeddings may live)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    return [cfg] if text is cfg else [cfg, text]


def _require_adapter(mods: dict[str, LoRALinear], name: str, prefix: str, hint: str = "") -> None:
    """Raise unless every module of ``mods`` holds the adapter ``name``; the message starts with
    ``prefix`` (the argument) and ends its list of the model's adapters with ``hint``."""
    lacking = [n for n, m in mods.items() if name not in m.lora_A]
    if lacking:
        held = sorted({a for m in mods.values() for a in m.lora_A})
        raise ValueError(f"{prefix}{name!r} is not an adapter of LoRA modules {lacking[:3]}"
                         f"{' ...' if len(lacking) > 3 else ''} (the model's adapters: {held}{hint})")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active LoRA adapter of every swapped module (adapters are added with
    ``ptune_rt.load_adapter(model, path, adapter_name=...)``), as PEFT's ``set_adapter``: the active
    adapter's weights become trainable, the others frozen. Checked first, all or nothing: every
    module must hold the adapter, and a model with a merged adapter must be unmerged before
    switching. Returns the model."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    mods = _require_swapped(model, "set_adapter")
    _require_adapter(mods, adapter_name, "adapter_name=")
    merged = [n for n, m in mods.items() if m.merged and m.active_adapter != adapter_name]
    if merged:
        raise ValueError(f"modules {merged[:3]}{' ...' if len(merged) > 3 else ''} have adapter "
                         f"{mods[merged[0]].active_adapter!r} merged into their base weight: ptune_rt.unmerge(model) "
                         f"before switching to {adapter_name!r}")
    for m in mods.values():
        m.active_adapter = adapter_name
        for name in m.lora_A:
            for layer in (m.lora_A[name], m.lora_B[name]):
                layer.requires_grad_(name == adapter_name)
    return model


class mixed_adapters:
    """``with ptune_rt.mixed_adapters(model, adapter_names):`` row i of every batch the model runs
    uses the LoRA adapter ``adapter_names[i]`` (``None`` or ``"__base__"``: the base model alone),
    as PEFT's ``adapter_names=`` forward argument: many tasks' adapters served in one batch from one
    unmerged base. Inference only (``torch.no_grad()``; ``generate()`` qualifies). Checked on entry,
    before anything changes: every name must be an adapter of every LoRA module, and no adapter may
    be merged. Each LoRA linear then runs the base matmul once for the whole batch and, per adapter,
    the low-rank term on the rows that use it; in a decode step (one token per row) all used adapters
    at once, against their A and B stacked once per block. On the Triton backend every step runs
    the stacked form through the fused kernels (the shrink kernel, then the low-rank term added in
    the base GEMM's accumulator); elsewhere torch ops. Adapter weights must not change inside a
    block."""

    BASE = "__base__"

    def __init__(self, model: nn.Module, adapter_names):
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
            raise TypeError(f"adapter_names must be a sequence of adapter names (one per row, None or "
                            f"{self.BASE!r} for the base model), got {type(adapter_names).__name__}")
        names = [self.BASE if n is None else n for n in adapter_names]
        if not names:
            raise ValueError("adapter_names is empty; expected one adapter name per row of the batch")
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter_names must hold str or None, got {type(bad[0]).__name__}")
        self.mods = _require_swapped(model, "mixed_adapters")
        used = [n for n in dict.fromkeys(names) if n != self.BASE]
        for n in used:
            _require_adapter(self.mods, n, "adapter_names: ", f", or None / {self.BASE!r} for the base model")
        off = [m for m, mod in self.mods.items() if mod.disabled]
        if off:
            raise ValueError(f"modules {off[:3]}{' ...' if len(off) > 3 else ''} have their adapters disabled; enable "
                             "them before serving a mixed-adapter batch (rows that want the base model take None)")
        merged = [m for m, mod in self.mods.items() if mod.merged]
        if merged:
            raise ValueError(f"modules {merged[:3]}{' ...' if len(merged) > 3 else ''} have an adapter merged into "
                             "their base weight, which every row would get: ptune_rt.unmerge(model) first")
        self._check_not_nested()
        device = next(iter(self.mods.values())).weight.device  # index tensors where the layers run
        self.rows = (len(names), tuple((n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device))
                                       for n in used))

    def _check_not_nested(self) -> None:
        busy = [m for m, mod in self.mods.items() if mod._rows is not None]
        if busy:
            raise RuntimeError(f"modules {busy[:3]} are already inside a ptune_rt.mixed_adapters block: "
                               "blocks do not nest")

    def __enter__(self):
        self._check_not_nested()  # again: another block may have been entered since this one was made
        for mod in self.mods.values():
            mod._rows, mod._rows_stack = self.rows, None
        return self

    def __exit__(self, *exc):
        for mod in self.mods.values():
            mod._rows, mod._rows_stack = None, None
        return False


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again, bit-exact (see ``LoRALinear.unmerge``)."""
    for m in _require_swapped(model, "unmerge").values():
        m.unmerge()
    return model


def restore_lora(model: nn.Module) -> nn.Module:
    """Undo ``apply`` / ``accelerate`` of LoRA: unmerge where merged, then put the original modules back
    (the very same objects, so weights are bit-exact) and, after ``apply``, the previous
    requires_grad flags. After ``accelerate`` PEFT's LoRA layers come back, holding the same
    (possibly trained) adapter parameters."""
    mods = _require_swapped(model, "restore")
    disable_mlp_recompute(model)
    disable_projection_groups(model)
    for m in mods.values():
        m.unmerge()
    for n, m in mods.items():
        origin = m.__dict__.get(ORIGIN_ATTR, m.base_layer)
        origin.train(m.training)
        if origin is not m.base_layer:  # a PEFT layer: hand back the enabled / disabled state
            origin._disable_adapters = m.disabled
        _set_submodule(model, n, origin)
    flags = model.__dict__.pop(REQUIRES_GRAD_ATTR, None)
    if flags is not None:
        for pn, p in model.named_parameters():
            if pn in flags:
                p.requires_grad_(flags[pn])
    model.__dict__.pop(CONFIG_ATTR, None)
    return model


def lora_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of LoRA: one per swapped module (keys: module, method "lora", source, adapter,
    in_features, out_features, r, scaling, dropout, dtype, device, backend, why, merged,
    recompute_input: True for the down projection of a SwiGLU MLP that recomputes silu(gate) * up
    in backward, input_group: e.g. "q_proj+k_proj+v_proj" for a layer that trains in a projection
    group, else None)."""
    rows = []
    recompute = {f"{n}.down_proj" for n, m in model.named_modules() if isinstance(m, RecomputeSwiGLUMixin)}
    groups = projection_group_names(model)
    for n, m in lora_modules(model).items():
        backend, why = m.backend_choice()
        w = m.base_layer.weight
        if w.dtype == torch.float64 and backend == "torch":
            why += "; float64 as plain torch ops (the fused op takes float32, float16 and bfloat16)"
        name = m.active_adapter
        rows.append({"module": n, "method": "lora", "source": m.__dict__.get(SOURCE_ATTR, "apply"),
                     "adapter": name, "in_features": m.in_features, "out_features": m.out_features,
                     "r": m.r.get(name), "scaling": m.scaling.get(name), "dropout": m.lora_dropout_p.get(name),
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device),
                     "backend": backend, "why": why, "merged": m.merged, "recompute_input": n in recompute,
                     "input_group": groups.get(n)})
    return rows


def _dtype_device(module: nn.Module, fallback) -> tuple[str, str]:
    t = next(module.parameters(), None)
    t = fallback if t is None else t
    return str(t.dtype).replace("torch.", ""), str(t.device)


def _attention_dropout(m: nn.Module) -> float:
    """The attention-probability dropout a transformers attention module passes while training."""
    if not m.training:
        return 0.0
    p = getattr(m, "attention_dropout", None)  # Llama, Qwen, Mistral: a float
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        d = getattr(m, "attn_dropout", None) or getattr(m, "dropout", None)  # GPT-2 / BERT: an nn.Dropout
        p = getattr(d, "p", 0.0) if isinstance(d, nn.Module) else 0.0
    return float(p or 0.0)


def _carriers(model: nn.Module, has, state_of) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of the outermost module carrying each distinct state: the model itself,
    or a module inside it (a PEFT model's base). ``has(m)``: m carries one; ``state_of(m)``: which."""
    out, seen = [], set()
    for n, m in model.named_modules():  # outer modules come first
        if has(m) and id(state_of(m)) not in seen:
            seen.add(id(state_of(m)))
            out.append((f"{n}." if n else "", m))
    return out


def prefix_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of a prefix: one per self-attention layer carrying it (keys: module, method
    "prefix", source, adapter, layer, num_virtual_tokens, num_tasks, kv_heads, head_dim,
    prefix_projection, position_mode, dtype, device, backend, why, merged False). The
    backend is the prefix config's, resolved for the layer's device; with attention dropout while
    training the layer runs an unfused torch SDPA instead. A PEFT model accelerated by
    ``ptune_rt.accelerate`` reports the prefix of its base model."""
    from ptune_rt import hf_attention  # imports transformers: keep swap importable alone

    rows = []
    for root, carrier in _carriers(model, hf_attention.has_prefix, hf_attention.prefix_state):
        state = hf_attention.prefix_state(carrier)
        cfg, enc = state.config, state.encoder
        for n, (m, layer) in sorted(state.attn_modules.items(), key=lambda item: item[1][1]):
            dtype, device = _dtype_device(m, enc.embedding.weight)
            backend, why = resolve_backend(cfg.backend, device)
            p = _attention_dropout(m)
            if p > 0.0:
                backend, why = "torch", (f"attention dropout p={p} while training: unfused torch SDPA over "
                                         "[prefix; sequence] (the fused op has no dropout)")
            rows.append({"module": root + n, "method": "prefix",
                         "source": "apply" if getattr(state, "owns_encoder", True) else "peft",
                         "adapter": "default", "layer": layer, "num_virtual_tokens": state.num_virtual_tokens,
                         "num_tasks": getattr(cfg, "num_tasks", 1), "kv_heads": enc.num_kv_heads,
                         "head_dim": enc.head_dim, "prefix_projection": enc.prefix_projection,
                         "position_mode": cfg.position_mode, "dtype": dtype, "device": device,
                         "backend": backend, "why": why, "merged": False})
    return rows


def prompt_rows(model: nn.Module) -> list[dict]:
    """``report`` rows of a soft prompt: one (keys: module, method "prompt_tuning" / "p_tuning", source,
    adapter, num_virtual_tokens, num_tasks, hidden_size, template_tokens, before_input, encoder,
    trainable_parameters, dtype, device, backend and why of the input builder, merged False)."""
    from ptune_rt.methods import prompt  # imports the input-builder op: keep swap importable alone

    rows = []
    for root, carrier in _carriers(model, prompt.is_prompt_model, lambda m: m.__dict__["forward"]):
        info = prompt.prompt_report(carrier)
        w = carrier.get_input_embeddings().weight
        rows.append({"module": f"{root}{prompt.MODULE_ATTR}.{prompt.ADAPTER}", "method": info["method"],
                     "source": "apply", "adapter": prompt.ADAPTER, "num_virtual_tokens": info["num_virtual_tokens"],
                     "num_tasks": info["num_tasks"], "hidden_size": int(w.shape[1]),
                     "template_tokens": info["template_tokens"], "before_input": info["before_input"],
                     "encoder": info["encoder"], "trainable_parameters": info["trainable_parameters"],
                     "dtype": str(w.dtype).replace("torch.", ""), "device": str(w.device),
                     "backend": info["backend"], "why": info["why"], "merged": False})
    return rows


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _backends(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["backend"]] = counts.get(r["backend"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _sizes(rows: list[dict]) -> str:
    return "/".join(str(p) for p in sorted({r.get("num_virtual_tokens") for r in rows}, key=str))


def _tasks(rows: list[dict]) -> str:
    return "/".join(str(t) for t in sorted({r.get("num_tasks", 1) for r in rows}))


def lora_cells(r: dict) -> tuple[str, str, str]:
    """(shape, r / P, merged) cells of a LoRA row in ``format_report``'s table."""
    return f"{r['in_features']}->{r['out_features']}", str(r["r"]), "yes" if r["merged"] else "no"


def prompt_learning_cells(r: dict) -> tuple[str, str, str]:
    """The cells of a prefix or soft-prompt row."""
    P = r.get("num_virtual_tokens")
    if r["method"] == "prefix" and r.get("kv_heads") is not None:
        shape = f"{r['kv_heads']}x{r['head_dim']} kv"
    elif r.get("hidden_size") is not None:
        T = r.get("num_tasks", 1)
        shape = f"{T}x{P}x{r['hidden_size']}" if T and T > 1 else f"{P}x{r['hidden_size']}"
    else:
        shape = "-"
    return shape, f"P={P}", "-"


def lora_summary(rows: list[dict]) -> str:
    return f"{_plural(len(rows), 'LoRA module')}: {_backends(rows)}"


def prefix_summary(rows: list[dict]) -> str:
    """Per-layer rows; a row without a layer (ptune_rt.accelerate's) is a whole prefix."""
    tasks = _tasks(rows)
    what = f"P={_sizes(rows)}" if tasks == "1" else f"P={_sizes(rows)}, {tasks} tasks"
    if all("layer" in r for r in rows):
        head = f"{_plural(len(rows), 'prefix layer')} ({what})"
    else:
        head = f"{len(rows)} prefix{'' if len(rows) == 1 else 'es'} ({what})"
    return f"{head}: {_backends(rows)}"


def prompt_summary(rows: list[dict]) -> str:
    tasks = _tasks(rows)
    encoders = sorted({r["encoder"] for r in rows if r.get("encoder")})
    extra = f", {'/'.join(encoders)} encoder" if encoders else ""
    task_word = "task" if tasks == "1" else "tasks"
    method = rows[0]["method"]
    return f"{_plural(len(rows), f'{method} soft prompt')} (P={_sizes(rows)}, {tasks} {task_word}{extra}): " \
           f"{_backends(rows)}"
