"""SwiGLU MLPs whose down projection is a ``LoRALinear``: save gate(x) and up(x) for backward and
recompute silu(gate) * up there (two fewer [tokens, intermediate] tensors per layer).

The MLP instance's class is swapped for a subclass of its own class (isinstance checks, parameters
and state_dict keys unchanged): transformers has no hook that replaces an MLP's forward, and a
forward hook would still save the product."""
from __future__ import annotations

from torch import nn

from ptune_rt.methods.lora.layer import LoRALinear

_STANDARD_SWIGLU = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
_swiglu_class_cache: dict[type, bool] = {}


def _forward_is_standard_swiglu(cls: type) -> bool:
    """True when ``cls.forward`` is exactly ``return down_proj(act_fn(gate_proj(x)) * up_proj(x))``
    (directly or through one local variable), checked on its syntax tree once per class."""
    if cls in _swiglu_class_cache:
        return _swiglu_class_cache[cls]
    import ast
    import inspect
    import textwrap

    ok = False
    try:
        # transformers has no flag saying an MLP is plain SwiGLU: its forward's syntax tree is the only
        # proof that recomputing silu(gate) * up gives what the class computes
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
        want = ast.dump(ast.parse(_STANDARD_SWIGLU, mode="eval").body)
        args = [a.arg for a in fn.args.args]
        body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
        if args == ["self", "x"] and not (fn.args.vararg or fn.args.kwarg or fn.args.kwonlyargs):
            if len(body) == 1 and isinstance(body[0], ast.Return):
                ok = body[0].value is not None and ast.dump(body[0].value) == want
            elif (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
                  and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
                  and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
                ok = ast.dump(body[0].value) == want
    except (OSError, TypeError, SyntaxError, IndexError):
        ok = False
    _swiglu_class_cache[cls] = ok
    return ok


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                         and type(act).__module__.startswith("transformers."))


class RecomputeSwiGLUMixin:
    """Mixed into a SwiGLU MLP's class (``mlp.__class__`` becomes a subclass of its own class, so
    isinstance checks, parameters and state_dict keys are unchanged): the down projection gets
    silu(gate(x)) and up(x) separately and saves only those two for backward."""

    def forward(self, x):
        down = self.down_proj
        if not isinstance(down, LoRALinear):  # unloaded under it (e.g. PEFT's merge_and_unload): the plain MLP
            return super().forward(x)
        return down.forward_swiglu(self.gate_proj(x), self.up_proj(x))

    def __reduce_ex__(self, protocol):
        # the subclass is made at run time, so pickle cannot look it up by name: rebuild it from
        # the plain class (deepcopy and torch.save of the whole model go through here)
        rv = super().__reduce_ex__(protocol)
        return (_new_recompute_instance, (self._ptune_rt_plain_class,)) + tuple(rv[2:])


_fused_mlp_classes: dict[type, type] = {}


def _recompute_class(cls: type) -> type:
    if cls not in _fused_mlp_classes:
        _fused_mlp_classes[cls] = type(cls.__name__, (RecomputeSwiGLUMixin, cls),
                                       {"__module__": __name__, "__qualname__": f"Recompute{cls.__qualname__}",
                                        "_ptune_rt_plain_class": cls})
    return _fused_mlp_classes[cls]


def _new_recompute_instance(plain_cls: type):
    return object.__new__(_recompute_class(plain_cls))


def swiglu_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The MLPs of ``model`` whose recompute path applies: a transformers class whose forward is the
    standard SwiGLU expression, a SiLU activation and a ``LoRALinear`` down projection."""
    out = {}
    for n, m in model.named_modules():
        cls = getattr(m, "_ptune_rt_plain_class", type(m))
        if (cls.__module__.startswith("transformers.models.") and isinstance(getattr(m, "down_proj", None), LoRALinear)
                and isinstance(getattr(m, "gate_proj", None), nn.Module)
                and isinstance(getattr(m, "up_proj", None), nn.Module)
                and _is_silu(getattr(m, "act_fn", None)) and _forward_is_standard_swiglu(cls)):
            out[n] = m
    return out


def enable_mlp_recompute(model: nn.Module) -> list[str]:
    """Switch every eligible SwiGLU MLP of ``model`` to the recompute forward; returns their names."""
    names = []
    for n, m in swiglu_mlps(model).items():
        if not isinstance(m, RecomputeSwiGLUMixin):
            # no transformers hook replaces an MLP's forward, and a forward hook would still save the
            # product: a subclass of the MLP's own class (isinstance, parameters, state_dict unchanged)
            m.__class__ = _recompute_class(type(m))
        names.append(n)
    return names


def disable_mlp_recompute(model: nn.Module) -> None:
    """Give every MLP switched by :func:`enable_mlp_recompute` its own class back."""
    for m in model.modules():
        if isinstance(m, RecomputeSwiGLUMixin):
            m.__class__ = m._ptune_rt_plain_class


def mlp_recompute_active(mlp: nn.Module) -> bool:
    return isinstance(mlp, RecomputeSwiGLUMixin)
