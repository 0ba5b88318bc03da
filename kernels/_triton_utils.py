"""Helpers shared by the kernels: interpreter detection, the one dot helper, configs."""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

#: True when the kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import,
#: as Triton reads it when it decorates them): picks the in-kernel bf16 upcast and the small configs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator.

    Every ``tl.dot`` of the kernels goes through here. The interpreter stores bf16 as raw
    uint16 bit patterns and multiplies those, so bf16 operands are upcast to fp32 when (and
    only when) interpreting; compiled kernels keep bf16 tensor-core dots.
    """
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def dropout_keep(seed, rows, cols, stride_row, stride_col, p):
    """Keep-mask of inverted dropout for a [rows x cols] tile.

    Element (i, j) of the logical activation gets the counter ``i*stride_row + j*stride_col``
    (mod 2**32) of a Philox stream keyed by ``seed``: the same element gets the same decision in
    every kernel and every pass, whatever the tiling or the index width, so no mask is ever stored.
    """
    offs = (rows[:, None] * stride_row + cols[None, :] * stride_col).to(tl.uint32)
    return tl.rand(seed, offs) >= p


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, M, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(seed_ptr), rows, cols, N, 1, p)
    inb = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=inb)


def seed_tensor(seed, device) -> torch.Tensor:
    """The dropout seed as the one-element int64 tensor on ``device`` the kernels read it from.

    Kernels load the seed in device code rather than taking a host integer, so a CUDA graph
    replays with whatever the tensor holds at replay time (drawn on the device by the caller).
    """
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        return seed.reshape(1).to(device, non_blocking=True)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def dropout_mask(shape: tuple[int, int], p: float, seed, device) -> torch.Tensor:
    """Materialize the keep-mask the kernels use for a row-major [M, N] activation.

    For tests and debugging only: the fused kernels regenerate it on the fly.
    """
    M, N = shape
    out = torch.empty((M, N), dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 32))
    launch(_dropout_mask_kernel, grid, KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1),
           out, seed_tensor(seed, device), M, N, p)
    return out.bool()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr block sizes plus warps and pipeline stages."""

    meta: dict
    num_warps: int
    num_stages: int

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        blocks = "x".join(str(v) for k, v in self.meta.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


#: CUDA limits grid axes y and z to 65,535 blocks (axis x to 2**31 - 1): kernels put their
#: unbounded axis (rows x heads, rows) on x.
MAX_GRID_YZ = 65535


def check_grid(grid) -> tuple:
    """``grid`` as a tuple, or a clear error when an axis exceeds what CUDA can launch."""
    grid = tuple(int(g) for g in grid)
    if grid and grid[0] >= 2**31:
        raise ValueError(f"launch grid {grid}: axis x has {grid[0]} blocks, CUDA allows at most 2**31 - 1")
    for axis, n in zip("yz", grid[1:]):
        if n > MAX_GRID_YZ:
            raise ValueError(f"launch grid {grid}: axis {axis} has {n} blocks, CUDA allows at most "
                             f"{MAX_GRID_YZ}")
    return grid


def check_in_tile_offsets(max_block: int, **tensors) -> None:
    """Kernels add the tile's origin in int64 and offsets inside a tile (``arange(BLOCK) * stride``)
    in int32: refuse a stride for which a tile of ``max_block`` rows would pass 2**31 elements."""
    for name, t in tensors.items():
        if t is None:
            continue
        for dim, stride in enumerate(t.stride()):
            if stride * max_block >= 2**31:
                raise ValueError(f"{name} has stride {stride} in dim {dim}: the kernels take strides below "
                                 f"2**31 / {max_block} elements; pass a contiguous copy (.contiguous())")


def launch(kernel, grid, config: KernelConfig, *args, **constexprs):
    """Launch a ``@triton.jit`` kernel with one explicit configuration on a checked grid."""
    return kernel[check_grid(grid)](*args, **constexprs, **config.meta,
                                    num_warps=config.num_warps, num_stages=config.num_stages)


def fp32_input_precision() -> str:
    """What fp32 dots may use, following torch's own matmul setting (TF32 or full IEEE fp32).

    torch >= 2.9 has two APIs for it, and reading the legacy ``allow_tf32`` raises once the new
    ``fp32_precision`` was set (HF ``TrainingArguments(tf32=...)`` sets it). The new attribute
    reports the effective value ("none" until either API sets something), so it is read first.
    """
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new in ("tf32", "ieee"):
        return new
    return "tf32" if matmul.allow_tf32 else "ieee"


# --------------------------------------------------------------------------------------
# Config selection on CUDA
# --------------------------------------------------------------------------------------


def pow2_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tuning keys use buckets, not exact sizes,
    so a decode loop or a dynamically padded epoch tunes once per bucket, not once per size."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def benchmark(run) -> float:
    """Median time of ``run()`` in ms (CUDA events through ``triton.testing.do_bench``)."""
    from triton.testing import do_bench
    return do_bench(run, warmup=5, rep=20, return_mode="median")


class ConfigTuner:
    """Picks one of a kernel's shipped configs per tuning key, benchmarking each config once per key.

    Keys are built by the launch wrappers from bucketed sizes, dtypes and the kernel's flags
    (decode-sized problems skip the tuner and take a fixed config). A config that fails to launch
    (out of shared memory on a smaller GPU) is skipped.
    """

    def __init__(self, name: str, configs: list):
        self.name = name
        self.configs = list(configs)
        self.chosen: dict = {}
        self.tunings = 0

    def pick(self, key, run) -> KernelConfig:
        """The config for ``key``; ``run(config)`` launches the kernel with one config."""
        config = self.chosen.get(key)
        if config is not None:
            return config
        if len(self.configs) == 1:
            config = self.configs[0]
        else:
            self.tunings += 1
            times = []
            for c in self.configs:
                try:
                    times.append(benchmark(lambda c=c: run(c)))
                except Exception as err:  # noqa: BLE001 - e.g. OutOfResources on a smaller GPU
                    if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err):
                        raise
                    times.append(float("inf"))
            if min(times) == float("inf"):
                raise RuntimeError(f"{self.name}: no shipped config could launch for key {key}")
            config = self.configs[times.index(min(times))]
        self.chosen[key] = config
        return config


TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Plain Python helpers go below the jit functions: Triton's cache key holds a jit function's line number,
# so a line added above one recompiles every kernel that calls it.
def interpreting() -> bool:
    """Whether a launch may take CPU tensors now (``TRITON_INTERPRET=1``): the one switch every
    launch check and ``ptune_rt.ops.backend.resolve_backend`` read."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
