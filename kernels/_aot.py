"""What the kernel modules' ``*_aot`` companions describe for ``ptune-rt compile-report``: one
:class:`AotVariant` per (kernel, launch configuration, argument specialization), recorded from the
real launch wrappers (``recorded_launches``) and specialized the way Triton's launcher does
(``launch_variant``). Compiling and checking them is ``ptune_rt.compile_report``'s job.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

DIVISIBILITY_16 = [["tt.divisibility", 16]]

# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AotVariant:
    """One kernel specialization to compile ahead of time.

    ``signature`` maps every argument name of ``fn`` to a Triton type string (``"*fp16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the value of every
    ``"constexpr"`` argument; ``attrs`` maps argument names to their aligned-launch attributes
    (``[["tt.divisibility", 16]]``). ``config`` names the launch configuration, ``label`` the
    launch it stands for (dtypes, flags). ``mma_dtypes`` (PTX spelling: ``"f16"``, ``"bf16"``,
    ``"tf32"``) requires tensor-core MMAs on each of these operand types; ``wgmma_on_sm90``
    requires ``wgmma`` instructions in sm_90 builds. ``fallback``: also build the unaligned
    fallback (no divisibility attributes) of this variant.
    """

    kernel_name: str
    fn: Any
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    label: str
    config: str = ""
    mma_dtypes: tuple = ()
    wgmma_on_sm90: bool = False
    fallback: bool = True

    @property
    def key(self) -> str:
        return f"{self.kernel_name} | {self.config} | {self.label}"


_TORCH_DTYPE_NAMES = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
}


def _pointer_type(tensor) -> str:
    name = str(tensor.dtype).replace("torch.", "")
    if name not in _TORCH_DTYPE_NAMES:
        raise TypeError(f"no Triton pointer type for tensor dtype {tensor.dtype}")
    return "*" + _TORCH_DTYPE_NAMES[name]


def specialize_arg(value, *, specialize: bool = True, align: bool = True) -> tuple[str, Any]:
    """``(type, extra)`` Triton's launcher gives one runtime argument value.

    ``extra`` is ``"D"`` for 16-divisible integers and 16-byte-aligned pointers, ``""`` when the
    value could be specialized but is not divisible, ``None`` otherwise; integers equal to 1
    become ``("constexpr", 1)``. Tensors (including ``meta`` tensors, whose ``data_ptr`` is
    their byte offset) stand for pointers.
    """
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        if not specialize:
            return _pointer_type(value), None
        return _pointer_type(value), ("D" if align and value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        if -2**31 <= value < 2**31:
            ty = "i32"
        elif value >= 2**63:
            ty = "u64"
        else:
            ty = "i64"
        if not specialize:
            return ty, None
        return ty, ("D" if align and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    if value is None:
        return "constexpr", None
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


def _names_or_indices(fn, attr: str) -> set:
    items = getattr(fn, attr, None)
    if items is None:
        items = getattr(fn, "kwargs", {}).get(attr) or ()
    names = list(fn.arg_names)
    return {names[i] if isinstance(i, int) else i for i in items}


@contextlib.contextmanager
def recorded_launches(module, device_check: str):
    """Within the block, the kernel module's ``launch`` records (kernel, args, constexprs) instead of
    launching, and its device check ``device_check`` accepts anything (wrappers run on ``meta``
    tensors): the recorded launches carry exactly what a real call passes."""
    launches = []

    def record(kernel, grid, config, *args, **constexprs):
        launches.append((kernel, args, constexprs))

    saved = module.launch, getattr(module, device_check)
    module.launch = record
    setattr(module, device_check, lambda *tensors: None)
    try:
        yield launches
    finally:
        module.launch = saved[0]
        setattr(module, device_check, saved[1])


def launch_variant(kernel_name: str, fn, args: dict, constexprs: dict, *, num_warps: int,
                   num_stages: int, label: str, config: str = "", mma_dtypes: tuple = (),
                   wgmma_on_sm90: bool = False, fallback: bool = True) -> AotVariant:
    """The :class:`AotVariant` of a launch of ``fn`` with these runtime argument values
    (``args``, by name) and ``constexprs``, specialized the way Triton's launcher does."""
    names = list(fn.arg_names)
    missing = [n for n in names if n not in args and n not in constexprs]
    unknown = [n for n in list(args) + list(constexprs) if n not in names]
    if missing or unknown:
        raise ValueError(f"{kernel_name}: launch does not match the kernel's arguments "
                         f"(missing {missing}, unknown {unknown})")
    no_spec = _names_or_indices(fn, "do_not_specialize")
    no_align = _names_or_indices(fn, "do_not_specialize_on_alignment")
    signature, cexprs, attrs = {}, {}, {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
            cexprs[name] = constexprs[name]
            continue
        ty, extra = specialize_arg(args[name], specialize=name not in no_spec,
                                   align=name not in no_align)
        signature[name] = ty
        if ty == "constexpr":
            cexprs[name] = extra
        elif extra == "D":
            attrs[name] = DIVISIBILITY_16
    return AotVariant(kernel_name, fn, signature, cexprs, attrs, num_warps, num_stages, label, config,
                      tuple(mma_dtypes), wgmma_on_sm90, fallback)
