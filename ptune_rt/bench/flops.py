"""Measured FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode only knows aten ops, so ptune-rt's custom op would count as zero. A small
dispatch mode pushed inside it enters every ``ptune_rt::`` op (redispatch to its backend kernel)
so the matrix products it runs on the torch path are counted like anyone else's. The same mode
adds the FLOPs of in-place ``addmm_`` (``y += a @ b``), which FlopCounterMode has no formula for
and which the torch path uses to add the low-rank term into the base output; they are reported
separately as ``extra_inplace_addmm``. Attention on CPU (the SDPA CPU kernel) has no formula
either: it is left out for every variant alike.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ptune_rt.bench.opcount import OWN_NAMESPACE


class _Descend(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.extra = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.addmm_.default:
            m1, m2 = args[1], args[2]
            self.extra += 2 * m1.shape[0] * m1.shape[1] * m2.shape[1]
        if func.namespace == OWN_NAMESPACE:
            key = torch._C.DispatchKey.CUDA if any(
                isinstance(a, torch.Tensor) and a.is_cuda for a in args) else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


def count_flops(fn) -> dict:
    counter = FlopCounterMode(display=False)
    descend = _Descend()
    with counter, descend:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    counted = int(counter.get_total_flops())
    return {"total": counted + descend.extra, "flop_counter_mode": counted,
            "extra_inplace_addmm": descend.extra, "by_op": by_op}
