"""LoRA adapter initializations (``LoRAConfig.init``), PEFT's ``init_lora_weights`` by its names.

Each returns ``(A [r, in], B [out, r], residual)`` in fp32 from the layer's weight ``W`` [out, in];
``residual`` is the base weight the adapter starts against, or None when the base stays as it is:

* ``default``: A Kaiming-uniform, B zero (PEFT's ``True``); ``gaussian``: A ~ N(0, 1/r^2), B zero;
  ``zeros``: both zero (for loading);
* ``orthogonal``: A and B from the odd and even rows of one random r x r orthogonal matrix, times
  Gaussian projections / 10 (r even); the product is not zero, so the adapted layer starts away from
  the base, as in PEFT;
* ``mica``: B the left singular vectors of W's ``r`` smallest singular values, A zero; B stays
  frozen (only A trains);
* ``pissa``: the top-r singular triplets (A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s)) and the base
  becomes ``W - s B A``; ``olora``: W = Q R, A = R[:r], B = Q[:, :r], the base ``W - s B A``. Both
  change the base weight: the layer keeps the original to give it back on ``restore``, and the
  initial adapter so that a checkpoint can be written against the original base (``init_offset``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

#: Initializations that start from a modified base weight.
BASE_MODIFYING = ("pissa", "olora")
#: Initializations whose B stays frozen.
FROZEN_B = ("mica",)


def initial_adapter(init: str, w_nk: torch.Tensor, r: int, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    out_f, in_f = w_nk.shape
    if init in ("default", "gaussian", "zeros"):
        a = torch.zeros(r, in_f, device=w_nk.device)
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        return a, torch.zeros(out_f, r, device=w_nk.device), None
    w = w_nk.detach().float()
    if init == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a = torch.randn(in_f, r // 2).mm(q[0::2, :]).t() / 10.0
        b = torch.randn(r // 2, out_f).t().mm(q[1::2, :]) / 10.0
        return a.contiguous().to(w.device), b.contiguous().to(w.device), None
    if init == "mica":
        u, _, _ = torch.linalg.svd(w, full_matrices=False)
        return torch.zeros(r, in_f, device=w.device), u[:, -r:].contiguous(), None
    if init == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        a, b = root[:, None] * uh[:r], v[:, :r] * root[None, :]
    elif init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        raise ValueError(f"unknown LoRA init {init!r}")
    return a, b, w - scale * (b @ a)
