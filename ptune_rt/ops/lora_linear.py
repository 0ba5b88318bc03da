"""The fused LoRA linear op: ``y = x W^T + b + scale * (dropout(x) A^T) B^T``.

Registered as the torch custom ops ``ptune_rt::lora_linear_fwd`` / ``ptune_rt::lora_linear_bwd``
with fake implementations and an autograd formula, so ``torch.compile``, CUDA graphs and the Triton
path see one op per LoRA linear. Two backends:

* ``triton``: the fused kernels of ``ptune_rt.kernels.lora`` (CUDA tensors; CPU tensors only
  under ``TRITON_INTERPRET=1`` and only when asked for explicitly), always behind the custom op;
* ``torch``: a short chain of BLAS calls that writes the low-rank term into the base output in
  place (``addmm_``), scales the small shrink instead of x and never keeps a dropout copy of x.
  In eager mode it runs through a plain ``autograd.Function`` (``_TorchLoRA``) with the same
  math and saved tensors, since the custom op's dispatch costs more than a small layer's BLAS
  calls on CPU; under ``torch.compile`` it is the custom op. Projections that read one input
  (q/k/v, gate/up) can run as one group (``lora_linear_group``): one shrink GEMM, one dA GEMM
  and one dX buffer for all of them.

Either way backward saves x and the M x r shrink S only: no M x N tensor, no dropout mask
(it is regenerated from a per-call seed: Philox in the kernels, four 16-bit draws per 64-bit
output of torch's generator on the torch path).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ptune_rt.ops.backend import resolve_backend


# ----------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------


def _torch_keep(shape, p: float, seed: int, device, dtype=torch.float32) -> Tensor:
    """The torch path's dropout keep-mask as 0/1 in ``dtype``, regenerated bit-identically from
    ``seed`` in backward.

    Element i keeps iff a uniform 16-bit integer u_i is at least ``round(p * 2**16)``: the drop
    rate is ``p`` rounded to a multiple of 2**-16 (0.1 -> 0.1000061), the inverted-dropout scale
    stays PEFT's ``1 / (1 - p)``. Four u_i come from each 64-bit output of the generator
    (``random_`` over the whole int64 range) and the comparison writes the mask straight in the
    compute dtype: on CPU that is about 8x cheaper than ``bernoulli_``, which draws one double per
    element, and it is what lets the torch path regenerate the mask in backward instead of storing
    it."""
    n = 1
    for d in shape:
        n *= int(d)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty(((n + 3) // 4,), device=device, dtype=torch.int64)
    words.random_(-2**63, None, generator=gen)
    u = words.view(torch.int16)[:n].view(shape)  # uniform over [-2**15, 2**15)
    keep = torch.empty(shape, device=device, dtype=dtype)
    return torch.ge(u, _keep_threshold(p), out=keep)


def _keep_threshold(p: float) -> int:
    """Signed 16-bit threshold t: P(u >= t) = 1 - round(p * 2**16) / 2**16 for u uniform over int16."""
    return -2**15 + min(int(round(p * 2**16)), 2**16 - 1)


def _torch_forward(x, weight, bias, lora_a, lora_b, scale, p, seed):
    xa = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
    if p > 0:
        xa = xa * _torch_keep(x.shape, p, seed, x.device, xa.dtype)
    S = xa @ lora_a.t()  # [M, r]
    if p > 0:
        S.mul_(1.0 / (1.0 - p))  # inverted-dropout scale on the small shrink, not on x
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    if y.dtype == lora_b.dtype:
        y.addmm_(S, lora_b.t(), alpha=scale)  # low-rank term straight into the base output
    else:  # half base with fp32 adapter (PEFT's default): add in the adapter dtype, like PEFT
        y = torch.addmm(y.to(lora_b.dtype), S, lora_b.t(), alpha=scale).to(x.dtype)
    return y, S.float()


def _torch_backward(dy, x, S, weight, lora_a, lora_b, scale, p, seed, need_dx):
    dya = dy if dy.dtype == lora_b.dtype else dy.to(lora_b.dtype)
    G = dya @ lora_b  # [M, r]
    S = S.to(lora_b.dtype)
    # dB = dY^T S, computed as (S^T dY)^T: CPU BLAS runs the [r, M] x [M, N] form about 1.5x
    # faster than the transposed-A form with a skinny [N, r] output; laid out [N, r] row-major
    # like lora_B (the custom op's declared layout)
    db = (S.t() @ dya).mul_(scale).t().contiguous()
    xa = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
    keep = None
    if p > 0:
        keep = _torch_keep(x.shape, p, seed, x.device, xa.dtype)
        xa = xa * keep
    da = G.t() @ xa
    da.mul_(scale / (1.0 - p))
    dx = None
    if need_dx:
        dx = dy @ weight
        if keep is None and dx.dtype == lora_a.dtype:
            dx.addmm_(G, lora_a, alpha=scale)
        elif dx.dtype == lora_a.dtype:
            dx.addcmul_(G @ lora_a, keep, value=scale / (1.0 - p))
        else:
            lr = (G @ lora_a).mul_(scale / (1.0 - p))
            if keep is not None:
                lr.mul_(keep)
            dx = (dx.to(lr.dtype) + lr).to(dy.dtype)
    return dx, da, db


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("ptune_rt::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                    scale: float, dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """2D forward: returns (y [M, N], S [M, r] fp32). ``seed`` is a one-element int64 tensor (a
    tensor, so torch.compile traces the random draw instead of breaking the graph on it): on the
    activations' device for the Triton kernels, which read it in device code, on the CPU for the
    torch path, which reads it on the host."""
    if backend == "triton":
        from ptune_rt.kernels import lora as K
        return K.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    return _torch_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, int(seed.item()))


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]),
                                                                   dtype=torch.float32)


@torch.library.custom_op("ptune_rt::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, S: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    scale: float, dropout_p: float, seed: Tensor, backend: str,
                    need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [M, K] or an empty tensor when not needed, dA [r, K], dB [N, r])."""
    if backend == "triton":
        from ptune_rt.kernels import lora as K
        dx, da, db = K.lora_backward(dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed,
                                     need_dx=need_dx)
    else:
        dx, da, db = _torch_backward(dy, x, S, weight, lora_a, lora_b, scale, dropout_p, int(seed.item()),
                                     need_dx)
    if dx is None:
        dx = x.new_empty((0,))
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype)


@lora_linear_bwd.register_fake
def _(dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend = inputs
    _, S = output
    ctx.save_for_backward(x, S, weight, lora_a, lora_b, seed)
    ctx.args = (scale, dropout_p, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dS):
    x, S, weight, lora_a, lora_b, seed = ctx.saved_tensors
    scale, dropout_p, backend = ctx.args
    need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx, da, db = lora_linear_bwd(dy.contiguous(), x, S, weight, lora_a, lora_b, scale, dropout_p, seed,
                                 backend, need_x)
    dbias = dy.sum(0) if (ctx.has_bias and need_bias) else None
    return (dx if need_x else None, None, dbias, da if need_a else None, db if need_b else None,
            None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------


#: the activation dtypes the op takes
OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dimension in_features={K}, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype not in OP_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the frozen weight has {weight.dtype}: cast the input "
                        "to the model's dtype")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_a), ("lora_B", lora_b)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}: move the input to the "
                             "model's device")
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features={K}], got {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (N, r):
        raise ValueError(f"lora_B must be [out_features={N}, r={r}], got {tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype or not lora_a.is_floating_point():
        raise TypeError(f"lora_A and lora_B must share one floating dtype, got {lora_a.dtype} and "
                        f"{lora_b.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [out_features={N}], got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


_ZERO_SEED = torch.zeros((1,), dtype=torch.int64)


def _seed_tensor(dropout_p: float, seed: Optional[int], device: Optional[torch.device] = None) -> Tensor:
    """The dropout seed as a one-element int64 tensor.

    For the torch path (``device`` None) it lives on the CPU and is drawn from torch's CPU generator
    when None: no device synchronization, and torch.compile traces the draw. For the Triton kernels
    on a CUDA ``device`` it is drawn there, in the stream, so a captured CUDA graph draws a new seed
    (and the kernels a new mask) on every replay instead of replaying one baked-in host integer.
    """
    if device is not None and device.type == "cuda" and dropout_p > 0:
        if seed is None:
            return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
        return torch.full((1,), int(seed), dtype=torch.int64, device=device)
    if dropout_p > 0 and seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    if seed:
        return torch.full((1,), int(seed), dtype=torch.int64)
    return _ZERO_SEED  # one shared constant: no allocation per call (unread without dropout)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float, dropout_p: float = 0.0, backend: str = "auto",
                seed: Optional[int] = None) -> Tensor:
    """Fused LoRA linear on x [..., K] with a frozen weight [N, K] (any strides: pass
    ``conv1d.weight.t()`` for GPT-2's Conv1D). Dropout (rate ``dropout_p``, pass 0 in eval) is
    inverted dropout on the low-rank input only, as in PEFT; its mask comes from ``seed``
    (drawn from torch's RNG when None)."""
    _check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    chosen, _ = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if chosen == "torch" and dropout_p == 0 and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b))):
        # Inference on the torch path (e.g. a decode step): no autograd record to keep, so skip the
        # custom-op dispatch and run the three BLAS calls directly.
        y, _ = _torch_forward(x2, weight, bias, lora_a, lora_b, float(scale), 0.0, 0)
        return y.reshape(*lead, weight.shape[0])
    seed_t = _seed_tensor(dropout_p, seed, x.device if chosen == "triton" else None)
    if _eager_torch(chosen):
        y = _TorchLoRA.apply(x2, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), seed_t)
    else:
        y, _ = lora_linear_fwd(x2, weight, bias, lora_a, lora_b, float(scale), float(dropout_p),
                               seed_t, chosen)
    return y.reshape(*lead, weight.shape[0])


def _eager_torch(backend: str) -> bool:
    """Whether the torch path runs its math directly (inside a plain ``autograd.Function``) rather
    than through the custom op: in eager mode. The custom op's dispatch (Python impl behind the
    dispatcher, its autograd wrapper, the backward op) costs about 170 us per linear per training
    step on CPU, more than a small layer's matmuls; torch.compile still sees the custom op."""
    return backend == "torch" and not torch.compiler.is_compiling()


def _fwd(eager: bool, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed_t, backend):
    """(y, S, seed for backward): the torch math directly when ``eager`` (the seed as a Python int,
    so nothing extra is saved), else the custom op (the seed stays a tensor)."""
    if eager:
        seed = int(seed_t.item()) if dropout_p > 0 else 0  # no mask, no seed to read
        y, S = _torch_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
        return y, S, seed
    y, S = lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed_t, backend)
    return y, S, seed_t


def _bwd(eager: bool, dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed, backend, need_dx):
    """(dx or None, dA, dB in the adapters' dtype), the counterpart of :func:`_fwd`."""
    if eager:
        dx, da, db = _torch_backward(dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed, need_dx)
        return dx, da.to(lora_a.dtype), db.to(lora_b.dtype)
    dx, da, db = lora_linear_bwd(dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed, backend, need_dx)
    return (dx if need_dx else None), da, db


class _TorchLoRA(torch.autograd.Function):
    """The torch path of ``lora_linear_fwd`` / ``_bwd`` for eager mode (identical math, saved
    tensors and results; see :func:`_eager_torch`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed_t):
        y, S, seed = _fwd(True, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed_t, "torch")
        ctx.save_for_backward(x, S, weight, lora_a, lora_b)
        ctx.args = (scale, dropout_p, seed, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, S, weight, lora_a, lora_b = ctx.saved_tensors
        scale, dropout_p, seed, has_bias = ctx.args
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx, da, db = _bwd(True, dy, x, S, weight, lora_a, lora_b, scale, dropout_p, seed, "torch", need_x)
        dbias = dy.sum(0) if (has_bias and need_bias) else None
        return (dx, None, dbias, da if need_a else None, db if need_b else None, None, None, None)


# ----------------------------------------------------------------------------------------
# projections sharing one input (q/k/v, gate/up): one shrink, one dA GEMM, dX accumulated in place
# ----------------------------------------------------------------------------------------


class _TorchLoRAGroup(torch.autograd.Function):
    """Several LoRA linears on one input x, eager torch path, no dropout.

    Per member the math is :func:`_torch_forward` / :func:`_torch_backward`'s; what the members
    share is done once: the shrink S = x [A_1; ...; A_n]^T (one pass over x instead of n), dA =
    [s_1 G_1, ..., s_n G_n]^T x (one pass instead of n), and dX = sum_i dY_i W_i + [s_i G_i] [A_i]
    accumulated in one buffer (separate modules give autograd n dX tensors to add up). Saved: x,
    S and the concatenated A, as for one linear. Results agree with the separate ops within fp
    rounding (the reductions are ordered differently), not bit for bit."""

    @staticmethod
    def forward(ctx, x, scales, *flat):
        n = len(scales)
        ws, biases, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        acat = torch.cat(As) if n > 1 else As[0]
        S = x2 @ acat.t()  # [M, sum r]
        outs, off = [], 0
        for w, b, a, lb, s in zip(ws, biases, As, Bs, scales):
            y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
            y.addmm_(S[:, off:off + a.shape[0]], lb.t(), alpha=s)
            off += a.shape[0]
            outs.append(y.view(*lead, w.shape[0]))
        ctx.save_for_backward(x2, S, acat, *ws, *Bs)
        ctx.meta = (scales, tuple(a.shape[0] for a in As), tuple(b is not None for b in biases), x.shape)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        scales, ranks, has_bias, x_shape = ctx.meta
        n = len(scales)
        x2, S, acat, *rest = ctx.saved_tensors
        ws, Bs = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        grads: list = [None, None]  # x, scales; then (weight, bias, A, B) per member from index 2
        slots = range(2, 2 + 4 * n, 4)  # where each member's four start
        dx, Gs, off = None, [], 0
        for j, dy, w, lb, s, r, hb in zip(slots, dys, ws, Bs, scales, ranks, has_bias):
            dy = dy.reshape(-1, dy.shape[-1]).contiguous()
            Gs.append((dy @ lb).mul_(s))  # [M, r_i], the scale folded in
            db = (S[:, off:off + r].t() @ dy).mul_(s).t().contiguous() if need[j + 3] else None
            dbias = dy.sum(0) if hb and need[j + 1] else None
            grads += [None, dbias, None, db]
            if need[0]:
                if dx is None:
                    dx = dy @ w
                else:
                    dx.addmm_(dy, w)
            off += r
        G = torch.cat(Gs, 1) if n > 1 else Gs[0]
        if any(need[j + 2] for j in slots):
            da = G.t() @ x2
            off = 0
            for j, r in zip(slots, ranks):
                if need[j + 2]:
                    grads[j + 2] = da[off:off + r]
                off += r
        if dx is not None:
            dx.addmm_(G, acat)
            grads[0] = dx.view(x_shape)
        return tuple(grads)


def lora_linear_group(x: Tensor, members: Sequence[tuple]) -> tuple[Tensor, ...]:
    """LoRA linears (``(weight, bias, lora_A, lora_B, scale)`` each) applied to one input x,
    sharing the shrink GEMM, the dA GEMM and the dX buffer (see :class:`_TorchLoRAGroup`). The
    eager torch path without dropout; every tensor in ``x``'s dtype. Returns one output per member."""
    if not members:
        raise ValueError("members must name at least one LoRA linear")
    for i, m in enumerate(members):
        if len(m) != 5:
            raise ValueError(f"members[{i}] must be (weight, bias, lora_A, lora_B, scale), got {len(m)} items")
        weight, bias, lora_a, lora_b, scale = m
        _check_inputs(x, weight, bias, lora_a, lora_b, scale, 0.0)
        if lora_a.dtype != x.dtype:
            raise TypeError(f"members[{i}]: lora_A / lora_B are {lora_a.dtype} but x is {x.dtype}; the grouped "
                            "path takes one dtype (call lora_linear per member)")
    flat = []
    for weight, bias, lora_a, lora_b, _ in members:
        flat += [weight, bias, lora_a, lora_b]
    return _TorchLoRAGroup.apply(x, tuple(float(m[4]) for m in members), *flat)


# ----------------------------------------------------------------------------------------
# SwiGLU-gated input: y = lora_linear(silu(g) * u), recomputing the gate in backward
# ----------------------------------------------------------------------------------------


class _SwiGLULoRA(torch.autograd.Function):
    """``lora_linear(silu(g) * u)`` saving only g and u.

    Autograd on the unfused chain keeps four intermediate-sized tensors per MLP for backward:
    g (for silu), silu(g) and u (for the product) and h = silu(g) * u (the LoRA shrink's input).
    This keeps g and u; backward recomputes silu(g) and h with the same ops (so every gradient is
    bit-identical to the unfused chain's) and then runs the same LoRA backward op."""

    @staticmethod
    def forward(ctx, g, u, weight, bias, lora_a, lora_b, scale, dropout_p, seed_t, backend):
        h = torch.nn.functional.silu(g).mul_(u)  # one [..., I] buffer, same values as silu(g) * u
        lead = h.shape[:-1]
        ctx.eager = _eager_torch(backend)
        y, S, seed = _fwd(ctx.eager, h.reshape(-1, h.shape[-1]), weight, bias, lora_a, lora_b, scale, dropout_p,
                          seed_t, backend)
        if ctx.eager:  # an int: nothing to save
            ctx.seed = seed
            ctx.save_for_backward(g, u, S, weight, lora_a, lora_b)
        else:
            ctx.save_for_backward(g, u, S, weight, lora_a, lora_b, seed)
        ctx.args = (scale, dropout_p, backend, bias is not None)
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # read once: checkpointing's unpack hooks allow one unpack per backward
        g, u, S, weight, lora_a, lora_b = saved[:6]
        seed = ctx.seed if ctx.eager else saved[6]
        scale, dropout_p, backend, has_bias = ctx.args
        need_g, need_u, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        silu = torch.nn.functional.silu(g)
        h = silu * u
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        need_h = need_g or need_u
        dh, da, db = _bwd(ctx.eager, dy2, h.reshape(-1, h.shape[-1]), S, weight, lora_a, lora_b, scale, dropout_p,
                          seed, backend, need_h)
        dg = du = None
        if need_h:
            # Three fresh [..., I] buffers in all (silu, h, dh), each reused once it is dead: on
            # CPU a fresh buffer of this size costs page faults comparable to the math on it.
            # Every value is the same op on the same operands as in the unfused chain.
            dh = dh.view(h.shape)
            if need_g:
                dsilu = torch.mul(dh, u, out=h)  # h is dead after the LoRA backward
            if need_u:
                du = silu.mul_(dh)  # silu's last use
            if need_g:
                dg = torch.ops.aten.silu_backward.grad_input(dsilu, g, grad_input=dh)  # dh's last use
        dbias = dy2.sum(0) if (has_bias and need_bias) else None
        return (dg, du, None, dbias, da if need_a else None, db if need_b else None, None, None, None, None)


def lora_linear_swiglu(g: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                       lora_b: Tensor, scale: float, dropout_p: float = 0.0, backend: str = "auto",
                       seed: Optional[int] = None) -> Tensor:
    """``lora_linear(silu(g) * u, ...)`` (a SwiGLU MLP's down projection) that saves g and u for
    backward instead of silu(g), u and their product: two fewer [..., intermediate] tensors per
    MLP. Same results, bit for bit, as calling :func:`lora_linear` on ``F.silu(g) * u``."""
    if not isinstance(g, Tensor) or not isinstance(u, Tensor):
        raise TypeError(f"g and u must be torch.Tensors, got {type(g).__name__} and {type(u).__name__}")
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"g and u must have one shape, dtype and device, got {tuple(g.shape)} {g.dtype} "
                         f"{g.device} and {tuple(u.shape)} {u.dtype} {u.device}")
    _check_inputs(g, weight, bias, lora_a, lora_b, scale, dropout_p)
    chosen, _ = resolve_backend(backend, g.device)
    seed_t = _seed_tensor(dropout_p, seed, g.device if chosen == "triton" else None)
    return _SwiGLULoRA.apply(g, u, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), seed_t, chosen)
