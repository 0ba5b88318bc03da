"""Ahead-of-time compile variants of the LoRA kernels, for ``ptune-rt compile-report``.

The variants are recorded from the real launch wrappers rather than written out by hand:
:func:`~.lora.lora_forward` and :func:`~.lora.lora_backward` run on ``meta`` tensors (shapes
and strides, no data) with the module's ``launch`` replaced by a recorder, so every recorded
launch carries exactly the pointer dtypes, sizes, strides, scalars and flags a model's call
passes. Triton's launch specialization (16-divisible integers and 16-byte-aligned pointers
get ``tt.divisibility`` 16, integers equal to 1 become constants) is applied to those values,
and each launch is compiled with every shipped configuration.

What is covered, on sm_80 and sm_90:

* the shape of a LLaMA-7B MLP projection: in_features K = 4096, out_features N = 11008, and
  M = 4093 tokens (deliberately not a multiple of 16, so no variant relies on it);
* frozen weight and bias in the activation dtype, LoRA A/B in fp32 (the adapter dtype
  ``ptune_rt.methods.lora`` creates); torch's default fp32 matmul precision (no TF32), so the
  precision flags are what ``lora.py`` picks from those dtypes (3xTF32 beside half activations,
  IEEE fp32 for fp32 activations);
* ranks 8, 32, 64 and 128, which reach every ``SKINNY_BLOCK_R`` (16, 32, 64, 128) and
  every ``FUSED_BLOCK_R`` (16, 32);
* with and without bias, with dropout 0 and 0.1: the launches and flags are
  fwd S (skinny, ``HAS_DROPOUT`` false/true), fwd y (fused, ``HAS_BIAS`` false/true),
  bwd G (skinny), bwd dX (fused, ``LR_DROPOUT`` false/true), bwd dB (skinny) and
  bwd dA (skinny, ``HAS_DROPOUT`` false/true);
* every entry of ``FUSED_CONFIGS`` x ``FUSED_BLOCK_R`` for the fused kernel and of
  ``SKINNY_CONFIGS`` x ``SKINNY_BLOCK_R`` for the skinny kernel, each with:

  - fp16 and bf16 activations: every launch above (aligned);
  - fp32 activations: the launches of :data:`FP32_SUBSET`, the heaviest flags of each kernel
    (aligned);
  - the unaligned fallback: bf16 activations, the launches of :data:`FALLBACK_SUBSET`.

  ``ptune-rt compile-report --full`` (``aot_variants(full=True)``) compiles every launch in
  every dtype, aligned and unaligned: 2.2 times the builds of the default matrix, and slower
  ones (unaligned builds spill, which makes ptxas slow).

DoRA (``ptune_rt.ops.dora_linear``) reuses these kernels with the fused kernel's channel scales: its
forward (``COL_SCALE``, ``Z_OUT``) and its dX (``IN_SCALE``) launches are compiled for fp16 and bf16
activations at rank 8 without bias (:func:`_record_dora`), with every shipped fused config; with
dropout 0.1 its forward and dX run ``_dora_twin_kernel`` (two accumulators), compiled with ``TWIN_CONFIGS``.

Launches whose specialization is identical (the fused kernel at ranks 32, 64 and 128 differs
only in values Triton does not specialize on) are compiled once, labelled with all their ranks.
Not covered: GPT-2 Conv1D weights (their transposed layout gives the fwd y and bwd dX launches
each other's weight strides, both compiled here) and TF32 (``allow_tf32``), which only changes
the IEEE fp32 dots to TF32.
"""
from __future__ import annotations

import torch

from ._aot import AotVariant, launch_variant, recorded_launches
from . import lora as L

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ADAPTER_DTYPE = torch.float32
TOKENS, IN_FEATURES, OUT_FEATURES = 4093, 4096, 11008
DECODE_TOKENS = 8  # a decode step of 8 rows: the decode configs (M <= lora.DECODE_ROWS)
RANKS = (8, 32, 64, 128)
DROPOUT_P = 0.1
SEED = 1234567
SCALE = 2.0

#: fp32 activations (CUDA-core FMA dots, the most registers) are compiled for the launches with
#: the heaviest flags; ``--full`` compiles all of them.
FP32_SUBSET = ("fwd S +dropout", "fwd y +bias", "bwd dX +dropout", "bwd dA +dropout")
#: Unaligned fallbacks are built for these launches in this dtype (``--full``: for all).
FALLBACK_DTYPE = torch.bfloat16
FALLBACK_SUBSET = ("fwd y +bias", "bwd dX +dropout", "fwd S +dropout", "bwd dA +dropout")

_PTX_TYPE = {torch.float16: "f16", torch.bfloat16: "bf16"}
_TF32 = ("tf32", "tf32x3")
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Names of the launches lora_forward and lora_backward make, in order.
_FORWARD_LAUNCHES = ("fwd S", "fwd y")
_BACKWARD_LAUNCHES = ("bwd G", "bwd dX", "bwd dB", "bwd dA")
_DECODE_LAUNCHES = ("decode S", "decode y")
_FLAG_NAMES = {"HAS_BIAS": "+bias", "LR_DROPOUT": "+dropout", "HAS_DROPOUT": "+dropout"}


def _record_decode(act: torch.dtype, rank: int, bias: bool):
    """The (name, kernel, args, constexprs) of the launches of one decode step's forward (no dropout)."""
    meta = dict(device="meta")
    x = torch.empty((DECODE_TOKENS, IN_FEATURES), dtype=act, **meta)
    weight = torch.empty((OUT_FEATURES, IN_FEATURES), dtype=act, **meta)
    b = torch.empty((OUT_FEATURES,), dtype=act, **meta) if bias else None
    lora_a = torch.empty((rank, IN_FEATURES), dtype=ADAPTER_DTYPE, **meta)
    lora_b = torch.empty((OUT_FEATURES, rank), dtype=ADAPTER_DTYPE, **meta)
    with recorded_launches(L, "_check_backend") as fwd:
        L.lora_forward(x, weight, b, lora_a, lora_b, SCALE, 0.0, 0)
    if len(fwd) != len(_DECODE_LAUNCHES):
        raise RuntimeError(f"lora_forward launched {len(fwd)} kernels at decode size, kernels/lora_aot.py "
                           f"expects {len(_DECODE_LAUNCHES)} ({', '.join(_DECODE_LAUNCHES)})")
    return [(name, *launch) for name, launch in zip(_DECODE_LAUNCHES, fwd)]


def _record_step(act: torch.dtype, rank: int, bias: bool, p: float):
    """The (name, kernel, args, constexprs) of the launches of one training step."""
    meta = dict(device="meta")
    M, K, N = TOKENS, IN_FEATURES, OUT_FEATURES
    x = torch.empty((M, K), dtype=act, **meta)
    weight = torch.empty((N, K), dtype=act, **meta)
    b = torch.empty((N,), dtype=act, **meta) if bias else None
    lora_a = torch.empty((rank, K), dtype=ADAPTER_DTYPE, **meta)
    lora_b = torch.empty((N, rank), dtype=ADAPTER_DTYPE, **meta)
    seed = SEED if p > 0 else 0  # the op passes seed 0 when there is no dropout
    with recorded_launches(L, "_check_backend") as fwd:
        _, S = L.lora_forward(x, weight, b, lora_a, lora_b, SCALE, p, seed)
    dy = torch.empty((M, N), dtype=act, **meta)
    with recorded_launches(L, "_check_backend") as bwd:
        L.lora_backward(dy, x, S, weight, lora_a, lora_b, SCALE, p, seed)
    out = []
    for names, launches, where in ((_FORWARD_LAUNCHES, fwd, "lora_forward"),
                                   (_BACKWARD_LAUNCHES, bwd, "lora_backward")):
        if len(launches) != len(names):
            raise RuntimeError(f"{where} launched {len(launches)} kernels, kernels/lora_aot.py expects "
                               f"{len(names)} ({', '.join(names)}): update its launch names")
        out += [(name, *launch) for name, launch in zip(names, launches)]
    return out


_DORA_LAUNCHES = ("dora fwd y", "dora bwd dX")
_DORA_TWIN_LAUNCHES = ("dora fwd y +dropout", "dora bwd dX +dropout")


def _record_dora(act: torch.dtype, rank: int, p: float = 0.0):
    """The fused-kernel launches of one DoRA training step (forward y with the row rescale and the
    pre-scale output; dX with the rescale as dY's input-channel scale; with dropout ``p`` the twin
    kernel's), as (name, kernel, args, flags)."""
    from ptune_rt.ops import dora_linear as D

    meta = dict(device="meta")
    M, K, N = TOKENS, IN_FEATURES, OUT_FEATURES
    x = torch.empty((M, K), dtype=act, **meta)
    weight = torch.empty((N, K), dtype=act, **meta)
    a = torch.empty((rank, K), dtype=ADAPTER_DTYPE, **meta)
    b = torch.empty((N, rank), dtype=ADAPTER_DTYPE, **meta)
    mns = torch.empty((N,), dtype=torch.float32, **meta)
    seed = SEED if p > 0 else 0
    with recorded_launches(L, "_check_backend") as fwd:
        _, S, z = D._forward(x, weight, None, a, b, SCALE, mns, True, "triton", p, seed)
    dy = torch.empty((M, N), dtype=act, **meta)
    with recorded_launches(L, "_check_backend") as bwd:
        D._backward(dy, x, S, z, weight, a, b, SCALE, mns, mns, "triton", True, p, seed)
    kernel, names = ((L._dora_twin_kernel, _DORA_TWIN_LAUNCHES) if p > 0
                     else (L._fused_lowrank_matmul_kernel, _DORA_LAUNCHES))
    fused = [launch for launch in fwd + bwd if launch[0] is kernel]
    if len(fused) != len(names):
        raise RuntimeError(f"the DoRA op launched {kernel.fn.__name__} {len(fused)} times, kernels/lora_aot.py "
                           f"expects {len(names)} ({', '.join(names)})")
    return [(name, *launch) for name, launch in zip(names, fused)]


def _expected_mma(kernel, act: torch.dtype, flags: dict) -> tuple:
    """PTX operand types the tensor-core MMAs of a launch must use.

    The fused kernel's main loop multiplies in the activation dtype (half activations must stay
    on f16/bf16 tensor cores, never upcast); fp32 dots run on tf32 tensor cores when their
    precision flag asks for TF32 or 3xTF32, and on CUDA cores ("ieee") otherwise.
    """
    need = []
    if kernel in (L._fused_lowrank_matmul_kernel, L._dora_twin_kernel):
        if act != torch.float32:
            need.append(_PTX_TYPE[act])
        elif flags.get("INPUT_PRECISION") in _TF32:
            need.append("tf32")
        if flags.get("LR_PRECISION") in _TF32:
            need.append("tf32")
    elif flags.get("INPUT_PRECISION") in _TF32:
        need.append("tf32")
    return tuple(dict.fromkeys(need))


def _config_name(config, block_r: int) -> str:
    name = f"{config} R{block_r}"
    if "GROUP_M" in config.meta:
        name += f" g{config.meta['GROUP_M']}"
    return name


def aot_variants(full: bool = False) -> list[AotVariant]:
    """The (launch, shipped config) variants of the LoRA kernels; see the module docstring.

    ``full`` gives every launch of every activation dtype an unaligned fallback build too, and
    every fp32 launch, instead of the subsets described there.
    """
    shipped = {L._fused_lowrank_matmul_kernel: (L.FUSED_CONFIGS, L.FUSED_BLOCK_R),
               L._skinny_matmul_kernel: (L.SKINNY_CONFIGS, L.SKINNY_BLOCK_R),
               L._dora_twin_kernel: (L.TWIN_CONFIGS, (L.fused_block_r(RANKS[0]),))}
    decode_configs = {L._fused_lowrank_matmul_kernel: L.FUSED_DECODE_CONFIG,
                      L._skinny_matmul_kernel: L.SKINNY_DECODE_CONFIG}
    # (kernel, launch name, dtype, specialization) -> [ranks], first recorded launch
    groups: dict = {}
    for act in ACTIVATION_DTYPES:
        for rank in RANKS:
            for bias in (False, True):
                launches = _record_decode(act, rank, bias)
                for p in (0.0, DROPOUT_P):
                    launches += _record_step(act, rank, bias, p)
                if act != torch.float32 and rank == RANKS[0] and not bias:
                    launches += _record_dora(act, rank) + _record_dora(act, rank, DROPOUT_P)
                for name, kernel, args, flags in launches:
                    if kernel not in shipped:
                        raise RuntimeError(f"the LoRA wrappers launched {kernel}, which has no "
                                           "shipped config list in kernels/lora_aot.py")
                    by_name = dict(zip(kernel.arg_names, args))
                    probe = launch_variant("probe", kernel, by_name, {**flags, **shipped[kernel][0][0].meta},
                                           num_warps=4, num_stages=1, label="")
                    spec = (tuple(sorted(probe.signature.items())),
                            tuple(sorted((k, repr(v)) for k, v in probe.constexprs.items())),
                            tuple(sorted(probe.attrs)))
                    entry = groups.setdefault((kernel, name, act, spec), ([], by_name, flags))
                    if rank not in entry[0]:
                        entry[0].append(rank)

    variants, block_rs_seen = [], {k: set() for k in shipped}
    for (kernel, name, act, _), (ranks, args, flags) in groups.items():
        configs, block_rs = shipped[kernel]
        if kernel is L._fused_lowrank_matmul_kernel:
            configs = L.fused_configs(act)
        if name.startswith("decode"):
            configs = [decode_configs[kernel]]
        block_r = flags["BLOCK_R"]
        block_rs_seen[kernel].add(block_r)
        on = " ".join(_FLAG_NAMES[f] for f in ("HAS_BIAS", "LR_DROPOUT", "HAS_DROPOUT") if flags.get(f))
        launch = f"{name}{' ' + on if on else ''}"
        if name.startswith("dora"):
            on = " ".join(f for f in ("IN_SCALE", "COL_SCALE", "Z_OUT") if flags.get(f))
            launch = f"{name} {on}".strip()
        if act == torch.float32 and not full and launch not in FP32_SUBSET and not name.startswith("decode"):
            continue
        for config in configs:
            label = f"{_SHORT[act]} {launch} r={'/'.join(map(str, ranks))}"
            # A half-precision main loop is a GEMM sm_90 must run on wgmma when the tile allows it
            # (warpgroups of 4 warps, 64 rows each).
            wgmma = (kernel in (L._fused_lowrank_matmul_kernel, L._dora_twin_kernel) and act != torch.float32
                     and config.meta["BLOCK_M"] >= 64 and config.num_warps % 4 == 0)
            fallback = full or (act == FALLBACK_DTYPE and launch in FALLBACK_SUBSET)
            variants.append(launch_variant(
                kernel.fn.__name__, kernel, args, {**flags, **config.meta}, num_warps=config.num_warps,
                num_stages=config.num_stages, label=label, config=_config_name(config, block_r),
                mma_dtypes=_expected_mma(kernel, act, flags), wgmma_on_sm90=wgmma, fallback=fallback))
    for kernel, (_, block_rs) in shipped.items():
        missing = set(block_rs) - block_rs_seen[kernel]
        if missing:
            raise RuntimeError(f"kernels/lora_aot.py: RANKS {RANKS} never reach BLOCK_R {sorted(missing)} of "
                               f"{kernel.fn.__name__}: add a rank that does")
    return variants
