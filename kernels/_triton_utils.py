"""Helpers shared by the kernels: interpreter detection, the one dot helper, configs."""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).
#: Read once at import, like Triton itself does when it decorates the kernels.
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
    of a Philox stream keyed by ``seed``: the same element gets the same decision in every
    kernel and every pass, whatever the tiling, so no mask is ever stored.
    """
    offs = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.rand(seed, offs) >= p


@triton.jit
def _dropout_mask_kernel(out_ptr, M, N, seed, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rows, cols, N, 1, p)
    inb = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=inb)


def dropout_mask(shape: tuple[int, int], p: float, seed: int, device) -> torch.Tensor:
    """Materialize the keep-mask the kernels use for a row-major [M, N] activation.

    For tests and debugging only: the fused kernels regenerate it on the fly.
    """
    M, N = shape
    out = torch.empty((M, N), dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 32))
    launch(_dropout_mask_kernel, grid, KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1),
           out, M, N, seed, p)
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


def launch(kernel, grid, config: KernelConfig, *args, **constexprs):
    """Launch a ``@triton.jit`` kernel with one explicit configuration."""
    return kernel[grid](*args, **constexprs, **config.meta,
                        num_warps=config.num_warps, num_stages=config.num_stages)


def fp32_input_precision() -> str:
    """What fp32 dots may use, following torch's own matmul setting (TF32 or full IEEE fp32)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
