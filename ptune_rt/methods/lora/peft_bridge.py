"""``ptune_rt.accelerate`` for PEFT LoRA models: PEFT's LoRA layers are replaced by
``PeftLoRALinear`` modules (``LoRALinear`` that PEFT also sees as its tuner layers) holding the very
same Parameter objects under the same names."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.lora.adapters import mixed_adapters
from ptune_rt.methods.lora.groups import enable_projection_groups
from ptune_rt.methods.lora.inject import (ORIGIN_ATTR, SOURCE_ATTR, _check_backend, _check_weight_dtype,
                                          _refuse_already_swapped, _set_submodule,
                                          lora_modules, peft_lora_layers)
from ptune_rt.methods.lora.embedding import LoRAEmbedding, ParameterHolder
from ptune_rt.methods.lora.layer import LoRALinear
from ptune_rt.methods.lora.report import lora_rows
from ptune_rt.methods.lora.swiglu import enable_mlp_recompute
from ptune_rt.methods.method import PeftBridge
from ptune_rt.peft_layers import install_peft_guards, peft_tuner_class
from ptune_rt.targets import is_lora_target, lora_target_shape

#: PEFT's MiCA variant: LoRA's forward and merge, B frozen; run as plain LoRA with B kept frozen.
MICA_VARIANT = "MiCALinearVariant"


def _peft_lora_linear_class(base: type = LoRALinear):
    """``PeftLoRALinear`` (``base`` LoRAEmbedding: ``PeftLoRAEmbedding``): the module ``accelerate_peft``
    puts in, a ``LoRALinear`` that PEFT also sees as one of its tuner layers (see
    ``ptune_rt.peft_layers.peft_tuner_class``). It holds one adapter. PEFT's ``add_adapter`` /
    ``load_adapter`` under a new name would wrap it in a new PEFT layer (renaming its parameters):
    ``install_peft_guards`` refuses them; ``ptune_rt.restore(peft_model)`` puts PEFT's own layers back."""
    return peft_tuner_class(base, base.PEFT_ADAPTER_LAYER_NAMES, __name__)


def __getattr__(name: str):
    # ``PeftLoRALinear`` / ``PeftLoRAEmbedding`` exist once PEFT is imported; pickle finds them here too.
    if name == "PeftLoRALinear":
        return _peft_lora_linear_class()
    if name == "PeftLoRAEmbedding":
        return _peft_lora_linear_class(LoRAEmbedding)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    Supported: one adapter per layer, active and unmerged, plain LoRA or DoRA (``use_dora=True``:
    PEFT's magnitude module is kept as the layer's ``lora_magnitude_vector[name]``, the same object).
    Refused before any change: other LoRA variants, several adapters in a layer or several active adapters,
    merged or disabled layers, LoRA on embeddings / convolutions / quantized layers. Switching
    or deleting adapters and PEFT's mixed-batch ``adapter_names`` raise on the swapped layers;
    adding or loading another adapter through PEFT would wrap them (renaming their parameters).
    For any of these, ``ptune_rt.restore(peft_model)`` first puts PEFT's own layers back.
    """
    _refuse_already_swapped(peft_model)
    layers = peft_lora_layers(peft_model)
    if not layers:
        raise ValueError(f"peft_model ({type(peft_model).__name__}) has no PEFT LoRA layers; expected a model "
                         "from peft.get_peft_model(model, LoraConfig(...))")
    plans = {n: _plan_peft_layer(n, m, backend) for n, m in layers.items()}
    new = {}
    for n, (m, adapter, dropout, a, b) in plans.items():
        magnitude = getattr(m, "lora_magnitude_vector", {})
        cls = _peft_lora_linear_class(LoRAEmbedding if isinstance(m.base_layer, nn.Embedding) else LoRALinear)
        lora = cls.from_adapter_modules(m.base_layer, a, b, scaling=float(m.scaling[adapter]),
                                        alpha=m.lora_alpha[adapter], dropout=dropout, backend=backend,
                                        adapter_name=adapter,
                                        magnitude=magnitude[adapter] if adapter in magnitude else None)
        if type(getattr(m, "lora_variant", {}).get(adapter)).__name__ == MICA_VARIANT:
            lora.frozen_b.add(adapter)  # PEFT froze B already; set_adapter keeps it so
        lora.__dict__[ORIGIN_ATTR] = m
        lora.__dict__[SOURCE_ATTR] = "peft"
        lora.train(m.training)
        new[n] = lora
    for n, lora in new.items():  # nothing below can fail on a validated model
        _set_submodule(peft_model, n, lora)
    install_peft_guards(peft_model, sorted({plan[1] for plan in plans.values()}), mixed_adapters)
    enable_mlp_recompute(peft_model)  # SwiGLU MLPs: recompute the gated product in backward
    enable_projection_groups(peft_model)  # q/k/v, gate/up: one shrink, dA and dX per group
    return lora_rows(peft_model)


def _plan_peft_layer(name: str, m: nn.Module, backend: str):
    """Validate one PEFT LoRA layer; returns (layer, adapter name, dropout p, A module, B module)."""
    from peft.tuners.lora.layer import Embedding as PeftEmbedding
    from peft.tuners.lora.layer import Linear as PeftLinear

    where = f"PEFT LoRA layer {name!r}"
    if type(m) not in (PeftLinear, PeftEmbedding):
        kind = type(m).__name__
        raise TypeError(f"{where} is a {type(m).__module__}.{kind}; ptune_rt.accelerate supports LoRA on "
                        "nn.Linear, GPT-2 Conv1D and nn.Embedding layers (peft.tuners.lora.layer.Linear / "
                        "Embedding), not convolution or quantized LoRA layers")
    base = m.base_layer
    if not is_lora_target(base):
        raise TypeError(f"{where} wraps a {type(base).__name__}; expected an nn.Linear, GPT-2 Conv1D or "
                        "nn.Embedding base layer")
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
    dora = adapter in magnitude
    if getattr(m, "use_dora", {}).get(adapter, False) and not dora:
        raise ValueError(f"{where} has use_dora=True but no DoRA magnitude for adapter {adapter!r}")
    variant = getattr(m, "lora_variant", {}).get(adapter)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant") \
            and type(variant).__name__ != MICA_VARIANT:
        raise ValueError(f"{where} uses the LoRA variant {type(variant).__name__}, which ptune_rt.accelerate "
                         "does not support; expected plain LoRA")
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
    a, b = _peft_adapter_modules(where, m, adapter)
    in_f, out_f = lora_target_shape(base)
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
    return m, adapter, p, a, b


def _peft_adapter_modules(where: str, m: nn.Module, adapter: str) -> tuple[nn.Module, nn.Module]:
    """The modules holding the adapter's A and B as ``weight``: PEFT's lora_A / lora_B Linears, or for an
    embedding its lora_embedding_A / _B Parameters in holders (the very same Parameter objects)."""
    if isinstance(m.base_layer, nn.Embedding):
        return ParameterHolder(m.lora_embedding_A[adapter]), ParameterHolder(m.lora_embedding_B[adapter])
    a, b = m.lora_A[adapter], m.lora_B[adapter]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"{where}: lora_A / lora_B must be nn.Linear, got {type(a).__name__} / {type(b).__name__}")
    return a, b


def claims(peft_model: nn.Module) -> bool:
    """PEFT LoRA layers, or LoRA layers already swapped in (``accelerate_peft`` then says so)."""
    return bool(peft_lora_layers(peft_model)) or bool(lora_modules(peft_model))


BRIDGE = PeftBridge(kind="PEFT LoRA layers", claims=claims, accelerate=accelerate_peft)
