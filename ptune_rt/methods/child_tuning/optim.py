"""Child-tuning's optimizers: a wrapper that masks the gradients of any torch optimizer, and
:class:`ChildTuningAdamW`, the fused masked AdamW step."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ptune_rt.methods._config import check_number
from ptune_rt.methods.child_tuning.config import ChildTuningConfig
from ptune_rt.methods.child_tuning.mask import ChildMask, keep_mask, step_seed, unpack_bits
from ptune_rt.reference.child_tuning import adamw_in_place, child_adamw_reference

#: The key of the Child-tuning selection (seed, steps taken, mode D's bits) in an optimizer's state_dict.
STATE_KEY = "child_tuning"


class ChildSelection:
    """Which entries of each parameter a step trains: the config, mode F's per-step seeds, mode D's
    mask and its re-estimation. Shared by both optimizers, so that the wrapper around a torch AdamW and
    :class:`ChildTuningAdamW` draw the same F masks from the same seed.

    Each parameter has a stream: its position over the optimizer's parameter groups. Step ``s`` of a
    run seeded ``seed`` draws mode F's mask of a parameter from the key ``step_seed(seed, s)`` and the
    parameter's stream.
    """

    def __init__(self, config, groups: Callable, mask: Optional[ChildMask], mask_fn: Optional[Callable],
                 seed: Optional[int], owner: str):
        if not isinstance(config, ChildTuningConfig):
            raise TypeError(f"{owner}: config must be a ChildTuningConfig, got {type(config).__name__}")
        if mask is not None and not isinstance(mask, ChildMask):
            raise TypeError(f"{owner}: mask must be a ChildMask (from child_mask_from_data or fisher_mask), got "
                            f"{type(mask).__name__}")
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(f"{owner}: mask_fn must be a callable returning a ChildMask, got {type(mask_fn).__name__}")
        if config.mode == "F" and (mask is not None or mask_fn is not None):
            raise ValueError(f"{owner}: mask and mask_fn are for mode 'D'; mode 'F' draws its mask every step")
        if config.mode == "D" and mask is None and mask_fn is None:
            raise ValueError(f"{owner}: mode 'D' needs its child: pass mask=child_mask_from_data(model, batches, "
                             "reserve_p) or mask_fn (a callable returning one)")
        if config.mode == "D" and config.mask_every is not None and mask_fn is None:
            raise ValueError(f"{owner}: mask_every={config.mask_every} re-estimates the mask: pass mask_fn, a callable "
                             "returning a new ChildMask (e.g. lambda: child_mask_from_data(model, batches, reserve_p))")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{owner}: seed must be None or an integer, got {seed!r}")
        self.config, self.groups, self.mask_fn, self.owner = config, groups, mask_fn, owner
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.steps = 0
        self.bits: dict = {}
        if config.mode == "D":
            self.set_mask(mask if mask is not None else self._estimate())

    def streams(self):
        """(stream, parameter) of every parameter of the optimizer, in group order."""
        return enumerate(p for group in self.groups() for p in group["params"])

    def _estimate(self) -> ChildMask:
        with torch.enable_grad():
            mask = self.mask_fn()
        if not isinstance(mask, ChildMask):
            raise TypeError(f"{self.owner}: mask_fn must return a ChildMask, got {type(mask).__name__}")
        return mask

    def set_mask(self, mask: ChildMask) -> None:
        """Use ``mask`` (mode D) from the next step on; its bits move to each parameter's device."""
        bits = {}
        for _, p in self.streams():
            if p in mask.bits:
                b = mask.bits[p]
                if b.dtype != torch.uint8 or b.numel() != (p.numel() + 7) // 8:
                    raise ValueError(f"{self.owner}: mask has {b.numel()} {b.dtype} bytes for a parameter of "
                                     f"{p.numel()} entries, expected ceil(numel / 8) = {(p.numel() + 7) // 8} uint8")
                bits[p] = b.to(p.device)
        if not bits:
            raise ValueError(f"{self.owner}: mask covers none of the optimizer's parameters; estimate it on the model "
                             "whose parameters the optimizer updates")
        self.bits = bits

    def begin_step(self) -> int:
        """Count a step (returned, 1-based); in mode D re-estimate the mask when ``mask_every`` says so."""
        every = self.config.mask_every
        if self.config.mode == "D" and every is not None and self.steps > 0 and self.steps % every == 0:
            self.set_mask(self._estimate())
        self.steps += 1
        return self.steps

    def step_key(self) -> int:
        return step_seed(self.seed, self.steps)

    def mode_of(self, param) -> Optional[str]:
        """The kernel mode of ``param`` this step: "F", "D", or None (plain AdamW: reserve_p = 1 in mode
        F, or a parameter mode D's mask leaves out)."""
        if self.config.mode == "F":
            return "F" if self.config.reserve_p < 1.0 else None
        return "D" if param in self.bits else None

    def state_dict(self) -> dict:
        streams = {p: i for i, p in self.streams()}
        return {"seed": self.seed, "steps": self.steps, "config": self.config.to_dict(),
                "bits": {streams[p]: b for p, b in self.bits.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.seed, self.steps = int(d["seed"]), int(d["steps"])
        if self.config.mode == "D" and d.get("bits"):
            params = dict(self.streams())
            self.set_mask(ChildMask({params[int(i)]: b for i, b in d["bits"].items()}, self.config.reserve_p))


def _check_hyper(owner: str, lr, betas, eps, weight_decay) -> None:
    check_number(f"{owner}: lr", lr, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    check_number(f"{owner}: betas[0]", betas[0], 0.0, 1.0)
    check_number(f"{owner}: betas[1]", betas[1], 0.0, 1.0)
    check_number(f"{owner}: eps", eps, 0.0)
    check_number(f"{owner}: weight_decay", weight_decay, 0.0)


class ChildTuningOptimizer(torch.optim.Optimizer):
    """Child-tuning around any torch optimizer: each ``step()`` masks the gradients in place, then
    calls ``base.step()``.

    Mode F multiplies every gradient by a fresh Bernoulli(reserve_p) mask divided by reserve_p (the
    same masks :class:`ChildTuningAdamW` draws from the same ``seed``); mode D multiplies the
    gradients of the parameters ``mask`` covers by their child mask, re-estimated by ``mask_fn``
    every ``config.mask_every`` steps. This is the paper's reference semantics: the masked gradient
    goes into the base optimizer, so entries outside the child still take whatever the base
    optimizer does with a zero gradient (weight decay; momentum left from before a mask change).
    :class:`ChildTuningAdamW` skips them instead. ``step(closure)`` evaluates the closure once
    first (optimizers that call it repeatedly, e.g. LBFGS, are not supported).

    It shares the base optimizer's ``param_groups`` and ``state``, so it works wherever an optimizer
    does: learning-rate schedulers, HF Trainer's ``optimizers=(optimizer, scheduler)``.
    ``state_dict()`` is the base's plus the selection (seed, step count, mode D's bits).
    """

    def __init__(self, base: torch.optim.Optimizer, config: ChildTuningConfig, *, mask: Optional[ChildMask] = None,
                 mask_fn: Optional[Callable] = None, seed: Optional[int] = None):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"ChildTuningOptimizer: base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, (ChildTuningOptimizer, ChildTuningAdamW)):
            raise TypeError("ChildTuningOptimizer: base already selects a child network; wrap a plain optimizer")
        self.base = base
        self.selection = ChildSelection(config, lambda: self.base.param_groups, mask, mask_fn, seed,
                                        "ChildTuningOptimizer")
        super().__init__([p for g in base.param_groups for p in g["params"]], dict(base.defaults))
        self.param_groups = base.param_groups  # one list of groups: schedulers change the base's lr
        self.state = base.state

    @property
    def config(self) -> ChildTuningConfig:
        return self.selection.config

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Apply this step's child mask to every gradient in place (``step`` does it before ``base.step``)."""
        sel = self.selection
        key = sel.step_key()
        p_keep = sel.config.reserve_p
        for stream, p in sel.streams():
            mode = sel.mode_of(p)
            if p.grad is None or mode is None:
                continue
            if mode == "F":
                p.grad.div_(p_keep).mul_(keep_mask(p.shape, p_keep, key, stream, p.device))
            else:
                p.grad.mul_(unpack_bits(sel.bits[p], p.numel()).reshape(p.shape))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.selection.begin_step()
        self.mask_gradients()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), STATE_KEY: self.selection.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        selection = state_dict.pop(STATE_KEY, None)
        self.base.load_state_dict(state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        if selection is not None:
            self.selection.load_state_dict(selection)


class ChildTuningAdamW(torch.optim.Optimizer):
    """AdamW over a child network, one fused Triton kernel per parameter tensor on CUDA (and on CPU
    under ``TRITON_INTERPRET=1``), the same step in torch ops elsewhere.

    ``lr``, ``betas``, ``eps``, ``weight_decay`` as ``torch.optim.AdamW`` (decoupled weight decay
    ``p *= 1 - lr * weight_decay``, bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``); the
    moments are kept in fp32 for fp16 / bf16 parameters too.

    Semantics, per mode:

    * F (the paper's): the gradient is masked by a fresh Bernoulli(reserve_p) draw scaled by
      1 / reserve_p and goes into AdamW as it is, so a dropped entry still decays its moments, takes
      weight decay and moves by its momentum. The mask comes from a Philox counter in the kernel,
      keyed by ``step_seed(seed, step)`` and counted by (element index, parameter stream): no mask
      is stored. On the torch path (CPU without Triton) the mask is drawn from torch's generator: a
      different random stream, the same distribution.
    * D: the child (``mask``, 1 bit per parameter, from the Fisher information) is the only part that
      changes: entries outside it are skipped entirely (parameter, moments and weight decay), so they
      never change. The paper's code masks the gradient only, which for a fixed mask differs just by
      weight decay of the entries outside (their moments stay zero); after a re-estimation
      (``config.mask_every``) an entry that leaves the child keeps its parameter and moments until
      it comes back. Parameters the mask does not cover (left out of the Fisher estimate) take the
      plain AdamW step.

    Parameters that are neither float32, float16 nor bfloat16, or not contiguous, take the torch path.
    ``state_dict()`` adds the selection (seed, step count, mode D's bits) to torch's.
    """

    def __init__(self, params, config: ChildTuningConfig, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, mask: Optional[ChildMask] = None, mask_fn: Optional[Callable] = None,
                 seed: Optional[int] = None):
        _check_hyper("ChildTuningAdamW", lr, betas, eps, weight_decay)
        if not isinstance(config, ChildTuningConfig):
            raise TypeError(f"ChildTuningAdamW: config must be a ChildTuningConfig, got {type(config).__name__}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.selection = ChildSelection(config, lambda: self.param_groups, mask, mask_fn, seed, "ChildTuningAdamW")

    @property
    def config(self) -> ChildTuningConfig:
        return self.selection.config

    def _work(self) -> list:
        """(stream, parameter, group) of every parameter with a gradient, checked before any changes."""
        work = []
        for stream, p in self.selection.streams():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ChildTuningAdamW does not support sparse gradients")
            if p.grad.shape != p.shape:
                raise ValueError(f"ChildTuningAdamW: a gradient of shape {tuple(p.grad.shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
            work.append((stream, p))
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        return [(s, p, groups[id(p)]) for s, p in work]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._work()
        sel = self.selection
        sel.begin_step()
        key = sel.step_key()
        seeds: dict = {}
        for stream, p, group in work:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            hyper = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], mode=sel.mode_of(p), reserve_p=sel.config.reserve_p)
            if _fused(p):
                from ptune_rt.kernels._triton_utils import seed_tensor
                from ptune_rt.kernels.child_adamw import child_adamw_step

                if p.device not in seeds:
                    seeds[p.device] = seed_tensor(key, p.device)
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                child_adamw_step(p, grad, state["exp_avg"], state["exp_avg_sq"], **hyper, seed=seeds[p.device],
                                 stream=stream, child_bits=sel.bits.get(p))
            elif hyper["mode"] == "D" and _all_contiguous(p, p.grad, state["exp_avg"], state["exp_avg_sq"]):
                _child_entries_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], self._keep(p, "D", key, stream),
                                    hyper)
            else:
                child_adamw_reference(p, p.grad, state["exp_avg"], state["exp_avg_sq"], **hyper,
                                      keep=self._keep(p, hyper["mode"], key, stream))
        return loss

    def _keep(self, p, mode, key, stream):
        if mode == "F":
            return keep_mask(p.shape, self.config.reserve_p, key, stream, p.device)
        if mode == "D":
            return unpack_bits(self.selection.bits[p], p.numel()).reshape(p.shape)
        return None

    def state_dict(self) -> dict:
        return {**super().state_dict(), STATE_KEY: self.selection.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        selection = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load: the moments stay fp32 here
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].float()
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, (_, p) in zip(ids, self.selection.streams()):
            for key in ("exp_avg", "exp_avg_sq"):
                if i in saved and key in saved[i]:
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=torch.float32).clone()
        if selection is not None:
            self.selection.load_state_dict(selection)


def _all_contiguous(*tensors) -> bool:
    return all(t.is_contiguous() for t in tensors)


@torch.no_grad()
def _child_entries_step(p, grad, exp_avg, exp_avg_sq, keep, hyper: dict) -> None:
    """Mode D on the torch path: AdamW on the child's entries alone (gathered, stepped, written back), the
    same ops as ``child_adamw_reference`` on each entry, so the same bits; entries outside the child are
    never read or written, where the reference steps every entry and selects with three where passes."""
    idx = keep.reshape(-1).nonzero().squeeze(1)
    flat = {name: t.view(-1) for name, t in (("p", p), ("g", grad), ("m", exp_avg), ("v", exp_avg_sq))}
    work = exp_avg.dtype
    ps = flat["p"].index_select(0, idx).to(work)
    gs = flat["g"].index_select(0, idx).to(work)
    ms = flat["m"].index_select(0, idx)
    vs = flat["v"].index_select(0, idx)
    adamw_in_place(ps, gs, ms, vs, **{k: hyper[k] for k in ("step", "lr", "beta1", "beta2", "eps", "weight_decay")})
    flat["p"].index_copy_(0, idx, ps.to(p.dtype))
    flat["m"].index_copy_(0, idx, ms)
    flat["v"].index_copy_(0, idx, vs)


def _fused(p: torch.Tensor) -> bool:
    from ptune_rt.kernels._triton_utils import interpreting
    from ptune_rt.kernels.child_adamw import PARAM_DTYPES

    return (p.device.type == "cuda" or interpreting()) and p.dtype in PARAM_DTYPES and p.is_contiguous()
