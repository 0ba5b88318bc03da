"""Child-tuning's masked AdamW step: one Triton kernel per parameter tensor.

The step is torch's AdamW (decoupled weight decay, bias-corrected moments, ``eps`` added to
``sqrt(v_hat)``) on a gradient restricted to a child network:

* mode F (task-free): the gradient entry is kept with probability ``reserve_p`` and scaled by
  ``1 / reserve_p``, dropped (zero) otherwise; every entry then takes the AdamW step, so a dropped one
  still decays its moments and moves by its momentum (the paper's semantics). The keep decision of
  element ``i`` of the tensor with index ``stream`` comes from a Philox counter inside the kernel
  (:func:`child_keep`): no mask tensor is stored, no masked gradient is copied.
* mode D (task-driven): the child is a fixed set of entries given as a packed bit mask, bit ``i % 8``
  of byte ``i // 8`` for element ``i`` (1 bit per parameter), unpacked in the kernel. Entries outside
  the child are skipped entirely: parameter, moments and weight decay stay as they were.

One program reads BLOCK elements of the parameter, the gradient and both moments (in mode D the child
bits first, then only the child's entries) and writes the parameter and the moments back in place:
at most 7 passes over the tensor (28 bytes a fp32 parameter, 1/8 byte more in mode D) where an eager
masked AdamW (a mask multiplied into the gradient, then torch's AdamW) makes 22 to 26. The moments
are fp32 whatever the parameter's dtype; the parameter is rounded to its dtype once per step.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import _INTERPRET, KernelConfig, interpreting, launch, seed_tensor

#: ``MODE`` values of the kernel: plain AdamW (mode F with reserve_p = 1), mode F, mode D.
MODE_PLAIN, MODE_F, MODE_D = 0, 1, 2
MODES = {None: MODE_PLAIN, "F": MODE_F, "D": MODE_D}

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def child_keep(seed, stream, offs, reserve_p):
    """Mode F's keep decision for the elements ``offs`` (int64) of tensor ``stream`` in the step keyed
    by ``seed``: Philox with key ``seed`` and counter (low 32 bits of the element index, its high 32
    bits, ``stream``, 0), its first word as a uniform float in [0, 1), kept when below reserve_p.
    With stream 0 this is exactly ``tl.rand(seed, offs) < reserve_p``; the stream word gives every
    tensor of one step its own mask, and the element index is the counter whatever the tiling."""
    lo = offs.to(tl.uint32)
    zero = lo * 0
    hi = (offs >> 32).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, lo, hi, zero + stream.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(r) < reserve_p


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype``. Compiled kernels convert that way; the
    interpreter truncates to bf16, so there the rounding is done on the bits first (finite values)."""
    if _INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit(do_not_specialize=["stream"])
def _child_keep_mask_kernel(OUT, SEED, n, stream, reserve_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = child_keep(tl.load(SEED), stream, offs, reserve_p)
    tl.store(OUT + offs, keep.to(tl.int8), mask=offs < n)


@triton.jit(do_not_specialize=["stream"])
def _child_adamw_kernel(
    P, G, M, V, BITS, SEED,
    n, stream,
    reserve_p, decay, beta1, beta2, eps, step_size, bc2_sqrt,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program updates BLOCK elements of one flat parameter tensor in place.

    decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1**step), bc2_sqrt =
    sqrt(1 - beta2**step): torch's AdamW on the masked gradient, in fp32. The tile's origin is
    int64 (tensors pass 2**31 elements); the element index is also the Philox counter of mode F.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    write = inb
    if MODE == 2:  # D: the child's bit of every element; the others are neither read nor written
        word = tl.load(BITS + (offs >> 3), mask=inb, other=0)
        write = inb & (((word >> (offs & 7).to(tl.uint8)) & 1) != 0)
    p = tl.load(P + offs, mask=write, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=write, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=write, other=0.0)
    v = tl.load(V + offs, mask=write, other=0.0)
    if MODE == 1:  # F: keep with probability reserve_p, scale the kept gradient by 1 / reserve_p
        keep = child_keep(tl.load(SEED), stream, offs, reserve_p)
        g = tl.where(keep, tl.div_rn(g, reserve_p), 0.0)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(P + offs, round_to(p, P.dtype.element_ty), mask=write)
    tl.store(M + offs, m, mask=write)
    tl.store(V + offs, v, mask=write)


CONFIGS = [KernelConfig({"BLOCK": 1024}, 4, 1)]
DEFAULT_CONFIG = CONFIGS[0]
#: Under the interpreter every program is a Python call: fewer, larger blocks.
INTERPRET_CONFIG = KernelConfig({"BLOCK": 4096}, 4, 1)
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_backend(*tensors):
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton Child-tuning AdamW kernel needs CUDA tensors (got {dev}); on CPU it runs only under "
            "TRITON_INTERPRET=1 (ChildTuningAdamW takes its torch path for CPU tensors otherwise)")
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on {dev}, got one on {t.device}")


def _default_config() -> KernelConfig:
    return INTERPRET_CONFIG if interpreting() else DEFAULT_CONFIG


# --------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------


def child_keep_mask(numel: int, reserve_p: float, seed, stream: int, device) -> torch.Tensor:
    """The bool keep mask [numel] mode F draws inside the kernel for tensor ``stream`` under ``seed``
    (an int or a one-element int64 tensor). For references and tests: the fused step never stores it."""
    out = torch.empty(numel, dtype=torch.int8, device=device)
    _check_backend(out)
    cfg = _default_config()
    if numel:
        launch(_child_keep_mask_kernel, (triton.cdiv(numel, cfg.meta["BLOCK"]),), cfg,
               out, seed_tensor(seed, out.device), numel, int(stream), float(reserve_p))
    return out.bool()


def _check_step_tensors(param, grad, exp_avg, exp_avg_sq, child_bits, mode) -> None:
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}")
    if not grad.dtype.is_floating_point:
        raise TypeError(f"grad must be a floating-point tensor, got {grad.dtype}")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, param {tuple(param.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the step keeps its moments in fp32), got {t.dtype}")
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel walks the flat tensor)")
    if mode == "D":
        want = (param.numel() + 7) // 8
        if child_bits is None or child_bits.dtype != torch.uint8 or child_bits.numel() != want:
            got = "None" if child_bits is None else f"{child_bits.dtype} [{child_bits.numel()}]"
            raise ValueError(f"child_bits must be a uint8 tensor of ceil(numel / 8) = {want} bytes for mode 'D', "
                             f"got {got}")


def child_adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                     step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     mode=None, reserve_p: float = 1.0, seed=0, stream: int = 0, child_bits=None,
                     config: KernelConfig | None = None) -> None:
    """One masked AdamW step of ``param`` in place (``exp_avg`` / ``exp_avg_sq`` fp32, updated in place).

    ``step``: the step number after this update (1 for the first), for the bias corrections.
    ``mode``: None (plain AdamW), ``"F"`` (Bernoulli(reserve_p) gradient mask from ``seed`` and
    ``stream``, see :func:`child_keep`) or ``"D"`` (``child_bits``: the packed child mask, uint8
    [ceil(numel / 8)]; entries outside it are left untouched).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be None, 'F' or 'D', got {mode!r}")
    _check_backend(param, grad, exp_avg, exp_avg_sq, child_bits)
    _check_step_tensors(param, grad, exp_avg, exp_avg_sq, child_bits, mode)
    n = param.numel()
    if n == 0:
        return
    kernel_mode = MODE_PLAIN if mode == "F" and reserve_p >= 1.0 else MODES[mode]
    seed_t = seed_tensor(seed, param.device) if kernel_mode == MODE_F else param  # unread unless mode F
    bits = child_bits if kernel_mode == MODE_D else param  # unread unless mode D
    cfg = config or _default_config()
    launch(_child_adamw_kernel, (triton.cdiv(n, cfg.meta["BLOCK"]),), cfg,
           param, grad, exp_avg, exp_avg_sq, bits, seed_t, n, int(stream),
           float(reserve_p), 1.0 - lr * weight_decay, float(beta1), float(beta2), float(eps),
           lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), MODE=kernel_mode)
