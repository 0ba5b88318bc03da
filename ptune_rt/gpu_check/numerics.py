"""The numerics checker: one case through the public op (Triton backend) vs the eager reference
in the same dtype vs a float64 gold, by the project's tolerance rule (``ptune_rt.testing``).

``check(case, device)`` builds the inputs on ``device``, runs the op forward and backward, runs the
reference twice (in the case's dtype and in the gold dtype) and returns one row per output. It is
what ``ptune-rt gpu-check`` and ``pytest -m gpu`` run on CUDA, and what the CPU tests run under
``TRITON_INTERPRET=1`` on tiny cases. ``perturb(name, tensor)`` lets a test corrupt an output.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from typing import Callable, Optional

import torch

from ptune_rt.gpu_check import cases as C
from ptune_rt.testing import assert_close_to_reference, error_report

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LORA_SCALE = 2.0      # alpha / r with PEFT's common alpha = 2r
DROPOUT_SEED = 1234
#: Child-tuning AdamW: torch AdamW's hyperparameters at a fine-tuning learning rate, steps per check
#: (the second step reads the moments the first wrote) and the optimizer's mask seed.
CHILD_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
CHILD_STEPS = 2
CHILD_SEED = 1234
#: The float64 gold may take at most this share of the free GPU memory; beyond it a bf16/fp16 case
#: takes an fp32 (IEEE) gold, whose own error is ~1000x below half precision's.
GOLD_MEMORY_SHARE = 0.5
Perturb = Optional[Callable[[str, torch.Tensor], torch.Tensor]]


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls in full IEEE precision (no TF32) inside, for the kernels and cuBLAS alike;
    through torch's current precision API where it exists, else the legacy flag."""
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is not None:
        old, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old, matmul.allow_tf32 = matmul.allow_tf32, False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def _randn(g, *shape, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def _generator(device, case) -> torch.Generator:
    """A generator on ``device`` seeded from the case's id (the same inputs in every run)."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(case.id.encode()))


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_()


def compare(outs: dict, refs: dict, golds: dict, rules: dict) -> list[dict]:
    """One row per output: its error to the gold, eager's error, the bound and the verdict."""
    rows = []
    for name, out in outs.items():
        ref, gold, rule = refs[name], golds[name], rules[name]
        try:
            rows.append({"output": name, **assert_close_to_reference(out, ref, gold, rule, name)})
        except AssertionError as err:
            nums = error_report(out, ref, gold, rule) if out.shape == gold.shape else {}
            rows.append({"output": name, **nums, "ok": False, "error": str(err)})
    return rows


def gold_dtype(case: C.Case, device) -> torch.dtype:
    """float64 unless its reference would not fit in ``GOLD_MEMORY_SHARE`` of the free GPU memory
    (then fp32 for half-precision cases)."""
    if torch.device(device).type != "cuda" or case.dtype == "float32":
        return torch.float64
    if case.kind in ("lora", "dora", "ia3"):
        need = (3 * case.M * (case.K + case.N) + case.N * case.K) * 8
    elif case.kind == "lora_embedding":  # the table cast, its gathered rows, dY and the adapters
        need = (case.V * case.H + 3 * case.M * case.H + 2 * case.r * (case.V + case.H)) * 8
    elif case.kind == "child_adamw":  # parameter, gradient, moments and the step's temporaries
        need = 6 * case.N * case.K * 8
    elif case.kind == "attention":  # one KV head at a time: its scores, probabilities and gradients
        need = 6 * case.B * (case.Hq // case.Hkv) * case.L * (case.P + case.S) * 8
    else:
        need = 4 * case.B * (case.L + case.P) * case.H * 8
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return torch.float64 if need <= GOLD_MEMORY_SHARE * free else torch.float32


# ----------------------------------------------------------------------------------------
# LoRA linear
# ----------------------------------------------------------------------------------------


def _lora_reference(x, w, a, b, keep, p, dy, to=None) -> dict:
    from ptune_rt.reference import lora_linear_reference

    xs, As, Bs = _leaf(x, to), _leaf(a, to), _leaf(b, to)
    y = lora_linear_reference(xs, w.to(to or w.dtype), None, As, Bs, LORA_SCALE, keep, p)
    y.backward(dy.to(to or dy.dtype))
    return {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}


def _lora_mask_row(keep: torch.Tensor, p: float, name: str = "dropout rate") -> dict:
    """The dropout mask must drop about p of x (else the dropout check would check nothing)."""
    rate = 1.0 - keep.float().mean().item()
    slack = max(p / 2, 4 * math.sqrt(p * (1 - p) / keep.numel()))
    return {"output": name, "err": abs(rate - p), "ref_err": rate, "bound": slack,
            "ok": abs(rate - p) <= slack}


def check_lora(c: C.LoraCase, device, perturb: Perturb = None) -> dict:
    from ptune_rt.ops import lora_linear

    dt, g = DTYPES[c.dtype], _generator(device, c)
    x = _randn(g, c.M, c.K, device=device, dtype=dt)
    w = _randn(g, c.N, c.K, device=device, dtype=dt, scale=c.K ** -0.5)
    a = _randn(g, c.r, c.K, device=device, scale=c.K ** -0.5)  # fp32 adapters: PEFT's default
    b = _randn(g, c.N, c.r, device=device, scale=c.r ** -0.5)
    dy = _randn(g, c.M, c.N, device=device, dtype=dt)
    xs, As, Bs = _leaf(x), _leaf(a), _leaf(b)
    y = lora_linear(xs, w, None, As, Bs, LORA_SCALE, c.dropout, backend="triton",
                    seed=DROPOUT_SEED if c.dropout else None)
    y.backward(dy)
    outs = {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad}
    del y, xs, As, Bs
    keep = None
    if c.dropout:
        from ptune_rt.kernels._triton_utils import dropout_mask
        keep = dropout_mask((c.M, c.K), c.dropout, DROPOUT_SEED, device)
    gold_dt = gold_dtype(c, device)
    refs = _lora_reference(x, w, a, b, keep, c.dropout, dy)
    golds = _lora_reference(x, w, a, b, keep, c.dropout, dy, to=gold_dt)
    outs = _perturbed(outs, perturb)
    rows = compare(outs, refs, golds, {"y": dt, "dx": dt, "dA": torch.float32, "dB": torch.float32})
    if keep is not None:
        rows.append(_lora_mask_row(keep, c.dropout))
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": rows}


def _dora_reference(x, w, a, b, m, dy, keep, p, to=None) -> dict:
    from ptune_rt.reference import dora_linear_reference

    xs, As, Bs, ms = _leaf(x, to), _leaf(a, to), _leaf(b, to), _leaf(m, to)
    y = dora_linear_reference(xs, w.to(to or w.dtype), None, As, Bs, ms, LORA_SCALE, keep, p)
    y.backward(dy.to(to or dy.dtype))
    return {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad, "dm": ms.grad}


def check_dora(c: C.DoraCase, device, perturb: Perturb = None) -> dict:
    """The DoRA op (norm by expansion, rescale in the fused GEMM) vs PEFT's formula (materialized norm)."""
    from ptune_rt.ops.dora_linear import dora_linear, materialized_weight_norm

    dt, g = DTYPES[c.dtype], _generator(device, c)
    x = _randn(g, c.M, c.K, device=device, dtype=dt)
    w = _randn(g, c.N, c.K, device=device, dtype=dt, scale=c.K ** -0.5)
    a = _randn(g, c.r, c.K, device=device, scale=c.K ** -0.5)
    b = _randn(g, c.N, c.r, device=device, scale=c.r ** -0.5)
    m = materialized_weight_norm(w, a, b, LORA_SCALE, torch.float32) * (0.5 + torch.rand(c.N, generator=g,
                                                                                          device=device))
    dy = _randn(g, c.M, c.N, device=device, dtype=dt)
    xs, As, Bs, ms = _leaf(x), _leaf(a), _leaf(b), _leaf(m)
    y = dora_linear(xs, w, None, As, Bs, ms, LORA_SCALE, c.dropout, backend="triton",
                    seed=DROPOUT_SEED if c.dropout else None)
    y.backward(dy)
    outs = {"y": y.detach(), "dx": xs.grad, "dA": As.grad, "dB": Bs.grad, "dm": ms.grad}
    del y, xs, As, Bs, ms
    keep = None
    if c.dropout:
        from ptune_rt.kernels._triton_utils import dropout_mask
        keep = dropout_mask((c.M, c.K), c.dropout, DROPOUT_SEED, device)
    gold_dt = gold_dtype(c, device)
    refs = _dora_reference(x, w, a, b, m, dy, keep, c.dropout)
    golds = _dora_reference(x, w, a, b, m, dy, keep, c.dropout, to=gold_dt)
    outs = _perturbed(outs, perturb)
    # dm reduces dY * (pre-scale output) over the tokens, that output rounded to the activation
    # dtype in both the op and PEFT's formula: it follows the activation dtype's rule.
    rows = compare(outs, refs, golds, {"y": dt, "dx": dt, "dA": torch.float32, "dB": torch.float32, "dm": dt})
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": rows}


def _perturbed(outs: dict, perturb: Perturb) -> dict:
    return outs if perturb is None else {k: perturb(k, v) for k, v in outs.items()}


# ----------------------------------------------------------------------------------------
# prefix attention
# ----------------------------------------------------------------------------------------


def _kv_mask(c: C.AttentionCase, device) -> Optional[torch.Tensor]:
    """Rows of different lengths: row i has i * S / (2B) padding keys on the padded side."""
    if c.padding is None:
        return None
    mask = torch.ones(c.B, c.S, dtype=torch.bool)
    for row in range(c.B):
        n = min(c.S - 1, row * c.S // (2 * c.B))
        if n:
            if c.padding == "left":
                mask[row, :n] = False
            else:
                mask[row, c.S - n:] = False
    return mask.to(device)


def _attention_reference(q, k, v, pk, pv, kv_mask, causal, do, to=None) -> dict:
    """The eager reference one KV head at a time (heads are independent: exact, and the float64
    score matrices stay 1/Hkv of the whole)."""
    from ptune_rt.reference import prefix_attention_reference

    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    parts = []
    for h in range(Hkv):  # (autograd records only when there is a gradient to check)
        qs = slice(h * G, (h + 1) * G)
        ins = [_leaf(t, to) for t in (q[:, qs], k[:, h:h + 1], v[:, h:h + 1], pk[h:h + 1], pv[h:h + 1])]
        with torch.set_grad_enabled(do is not None):
            o, _ = prefix_attention_reference(*ins, kv_mask, None, causal)
        part = {"out": o.detach()}
        if do is not None:
            o.backward(do[:, qs].to(to or do.dtype))
            part.update(zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), (t.grad for t in ins)))
        parts.append(part)
    return {name: torch.cat([p[name] for p in parts], dim=0 if name.startswith("dprefix") else 1)
            for name in parts[0]}


def check_attention(c: C.AttentionCase, device, perturb: Perturb = None) -> dict:
    from ptune_rt.ops.prefix_attention import prefix_attention

    dt, g = DTYPES[c.dtype], _generator(device, c)
    q = _randn(g, c.B, c.Hq, c.L, c.D, device=device, dtype=dt)
    k, v = (_randn(g, c.B, c.Hkv, c.S, c.D, device=device, dtype=dt) for _ in range(2))
    pk, pv = (_randn(g, c.Hkv, c.P, c.D, device=device) for _ in range(2))  # fp32 prefix parameters
    do = _randn(g, c.B, c.Hq, c.L, c.D, device=device, dtype=dt) if c.mode == "train" else None
    kv_mask = _kv_mask(c, device)
    leaves = [_leaf(t) for t in (q, k, v, pk, pv)]
    with torch.set_grad_enabled(do is not None):
        o = prefix_attention(*leaves, kv_mask, None, c.causal, backend="triton")
    outs = {"out": o.detach()}
    if do is not None:
        o.backward(do)
        outs.update(zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), (t.grad for t in leaves)))
    del o, leaves
    # the prefix enters the reference in q's dtype, as the op casts it
    pk, pv = pk.to(dt), pv.to(dt)
    gold_dt = gold_dtype(c, device)
    refs = _attention_reference(q, k, v, pk, pv, kv_mask, c.causal, do)
    golds = _attention_reference(q, k, v, pk, pv, kv_mask, c.causal, do, to=gold_dt)
    outs = _perturbed(outs, perturb)
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": compare(outs, refs, golds, dict.fromkeys(outs, dt))}


# ----------------------------------------------------------------------------------------
# prompt-input gather
# ----------------------------------------------------------------------------------------


def gather_inputs(c: C.GatherCase, device) -> dict:
    """Embedding [V, H], fp32 prompts ([P, H], or [T, P, H] with task ids) and src: each row's P
    virtual tokens (-1 .. -P) in front of L token ids."""
    dt, g = DTYPES[c.dtype], _generator(device, c)
    emb = _randn(g, c.V, c.H, device=device, dtype=dt)
    prompts = _randn(g, *((c.T,) if c.T > 1 else ()), c.P, c.H, device=device)
    ids = torch.randint(0, c.V, (c.B, c.L), generator=g, device=device)
    virtual = -(torch.arange(c.P, device=device) + 1).expand(c.B, c.P)
    task_ids = torch.arange(c.B, device=device) % c.T if c.T > 1 else None
    return {"emb": emb, "prompts": prompts, "ids": ids, "src": torch.cat([virtual, ids], dim=1),
            "task_ids": task_ids, "dout": _randn(g, c.B, c.L + c.P, c.H, device=device, dtype=dt)}


def _gather_reference(src, emb, prompts, task_ids, dout, to=None) -> dict:
    from ptune_rt.reference.prompt_inputs import build_inputs_embeds_reference

    pr = _leaf(prompts, to)
    # src and task ids on the CPU: the reference reads them one element at a time
    out = build_inputs_embeds_reference(src.cpu(), emb.to(to or emb.dtype), pr,
                                        None if task_ids is None else task_ids.cpu())
    out.backward(dout.to(to or dout.dtype))
    return {"out": out.detach(), "dprompts": pr.grad}


def check_gather(c: C.GatherCase, device, perturb: Perturb = None) -> dict:
    from ptune_rt.ops.prompt_inputs import build_inputs_embeds

    t, dt = gather_inputs(c, device), DTYPES[c.dtype]
    pr = _leaf(t["prompts"])
    out = build_inputs_embeds(t["src"], t["emb"], pr, t["task_ids"], backend="triton")
    out.backward(t["dout"])
    outs = _perturbed({"out": out.detach(), "dprompts": pr.grad}, perturb)
    prompts = t["prompts"].to(dt)  # the op casts the prompts to the embedding's dtype
    gold_dt = gold_dtype(c, device)
    refs = _gather_reference(t["src"], t["emb"], prompts, t["task_ids"], t["dout"])
    golds = _gather_reference(t["src"], t["emb"], prompts, t["task_ids"], t["dout"], to=gold_dt)
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": compare(outs, refs, golds, dict.fromkeys(outs, dt))}


# ----------------------------------------------------------------------------------------
# IA3 linear
# ----------------------------------------------------------------------------------------


def _ia3_reference(x, w, l, feedforward, dy, to=None) -> dict:
    """PEFT's IA3 formulas in eager torch: the vector's product in its dtype (fp32 beside half
    activations), cast back to the activation dtype."""
    xs, ls = _leaf(x, to), _leaf(l, to)
    w = w.to(to or w.dtype)
    if feedforward:
        y = (xs.to(ls.dtype) * ls).to(xs.dtype) @ w.t()
    else:
        y = ((xs @ w.t()).to(ls.dtype) * ls).to(xs.dtype)
    y.backward(dy.to(to or dy.dtype))
    return {"y": y.detach(), "dx": xs.grad, "dl": ls.grad}


def check_ia3(c: C.IA3Case, device, perturb: Perturb = None) -> dict:
    """The IA3 op (the scale fused into the GEMM's loads or epilogue) vs PEFT's formula."""
    from ptune_rt.ops.ia3_linear import ia3_linear

    dt, g = DTYPES[c.dtype], _generator(device, c)
    x = _randn(g, c.M, c.K, device=device, dtype=dt)
    w = _randn(g, c.N, c.K, device=device, dtype=dt, scale=c.K ** -0.5)
    l = 0.5 + torch.rand(c.K if c.feedforward else c.N, generator=g, device=device)  # fp32 vector
    dy = _randn(g, c.M, c.N, device=device, dtype=dt)
    xs, ls = _leaf(x), _leaf(l)
    y = ia3_linear(xs, w, None, ls, c.feedforward, backend="triton")
    y.backward(dy)
    outs = {"y": y.detach(), "dx": xs.grad, "dl": ls.grad}
    del y, xs, ls
    gold_dt = gold_dtype(c, device)
    refs = _ia3_reference(x, w, l, c.feedforward, dy)
    golds = _ia3_reference(x, w, l, c.feedforward, dy, to=gold_dt)
    outs = _perturbed(outs, perturb)
    # dl reduces over the tokens a product with a tensor rounded to the activation dtype in both the
    # op and PEFT's formula (x W^T, or dY W): it follows the activation dtype's rule
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": compare(outs, refs, golds, dict.fromkeys(outs, dt))}


# ----------------------------------------------------------------------------------------
# LoRA embedding
# ----------------------------------------------------------------------------------------


def _lora_embedding_reference(ids, table, a, b, dy, to=None) -> dict:
    from ptune_rt.reference import lora_embedding_reference

    As, Bs = _leaf(a, to), _leaf(b, to)
    y = lora_embedding_reference(ids, table.to(to or table.dtype), As, Bs, LORA_SCALE)
    y.backward(dy.to(to or dy.dtype))
    return {"y": y.detach(), "dA": As.grad, "dB": Bs.grad}


def check_lora_embedding(c: C.LoraEmbeddingCase, device, perturb: Perturb = None) -> dict:
    """The fused gather + low-rank gather vs PEFT's LoRA Embedding formula (frozen table)."""
    from ptune_rt.ops.lora_embedding import lora_embedding

    dt, g = DTYPES[c.dtype], _generator(device, c)
    table = _randn(g, c.V, c.H, device=device, dtype=dt)
    ids = torch.randint(0, c.V, (c.M,), generator=g, device=device)
    a = _randn(g, c.r, c.V, device=device)  # fp32 adapters: PEFT's default
    b = _randn(g, c.H, c.r, device=device, scale=c.r ** -0.5)
    dy = _randn(g, c.M, c.H, device=device, dtype=dt)
    As, Bs = _leaf(a), _leaf(b)
    y = lora_embedding(ids, table, As, Bs, LORA_SCALE, backend="triton")
    y.backward(dy)
    outs = {"y": y.detach(), "dA": As.grad, "dB": Bs.grad}
    del y, As, Bs
    gold_dt = gold_dtype(c, device)
    refs = _lora_embedding_reference(ids, table, a, b, dy)
    golds = _lora_embedding_reference(ids, table, a, b, dy, to=gold_dt)
    outs = _perturbed(outs, perturb)
    return {"gold": str(gold_dt).replace("torch.", ""),
            "rows": compare(outs, refs, golds, {"y": dt, "dA": torch.float32, "dB": torch.float32})}


# ----------------------------------------------------------------------------------------
# Child-tuning AdamW step
# ----------------------------------------------------------------------------------------


def _child_keep(c: C.ChildAdamwCase, step: int, child, device) -> torch.Tensor:
    """The entries step ``step`` trains: mode D's child, or mode F's Philox mask of the parameter
    (stream 0: the optimizer's only parameter) under the step's key."""
    from ptune_rt.reference.child_tuning import keep_mask, step_seed

    if c.mode == "D":
        return child
    return keep_mask((c.N, c.K), c.reserve_p, step_seed(CHILD_SEED, step), 0, device)


def _child_outside_row(param: torch.Tensor, start: torch.Tensor, outs: dict, child: torch.Tensor) -> dict:
    """Mode D: entries outside the child keep their parameter bit for bit and their moments at zero."""
    outside = ~child
    err = max((param[outside] != start[outside]).float().sum().item(),
              outs["exp_avg"][outside].abs().max().item(), outs["exp_avg_sq"][outside].abs().max().item())
    return {"output": "outside the child", "err": err, "ref_err": 0.0, "bound": 0.0, "ok": err == 0.0}


def check_child_adamw(c: C.ChildAdamwCase, device, perturb: Perturb = None) -> dict:
    """``CHILD_STEPS`` steps of ``ChildTuningAdamW`` (the fused kernel) vs the eager masked AdamW
    step with the same masks (mode F: the Philox mask the kernel draws, materialized)."""
    from ptune_rt.methods.child_tuning.config import ChildTuningConfig
    from ptune_rt.methods.child_tuning.mask import ChildMask, pack_bits
    from ptune_rt.methods.child_tuning.optim import ChildTuningAdamW
    from ptune_rt.reference.child_tuning import child_adamw_reference

    dt, g = DTYPES[c.dtype], _generator(device, c)
    start = _randn(g, c.N, c.K, device=device, dtype=dt)
    grads = [_randn(g, c.N, c.K, device=device, dtype=dt) for _ in range(CHILD_STEPS)]
    child = torch.rand(c.N, c.K, generator=g, device=device) < c.reserve_p if c.mode == "D" else None
    param = start.clone().requires_grad_()
    mask = ChildMask({param: pack_bits(child)}, c.reserve_p) if child is not None else None
    opt = ChildTuningAdamW([param], ChildTuningConfig(mode=c.mode, reserve_p=c.reserve_p), **CHILD_HYPER,
                           mask=mask, seed=CHILD_SEED)
    for grad in grads:
        param.grad = grad
        opt.step()
    state = opt.state[param]
    outs = {"param": param.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    del opt, mask
    gold_dt = gold_dtype(c, device)
    ref = [start.clone(), torch.zeros(c.N, c.K, device=device), torch.zeros(c.N, c.K, device=device)]
    gold = [start.to(gold_dt), *(torch.zeros(c.N, c.K, device=device, dtype=gold_dt) for _ in range(2))]
    beta1, beta2 = CHILD_HYPER["betas"]
    hyper = dict(lr=CHILD_HYPER["lr"], beta1=beta1, beta2=beta2, eps=CHILD_HYPER["eps"],
                 weight_decay=CHILD_HYPER["weight_decay"], mode=c.mode, reserve_p=c.reserve_p)
    extra = []
    for step, grad in enumerate(grads, 1):
        keep = _child_keep(c, step, child, device)
        child_adamw_reference(ref[0], grad, ref[1], ref[2], step=step, **hyper, keep=keep)
        child_adamw_reference(gold[0], grad.to(gold_dt), gold[1], gold[2], step=step, **hyper, keep=keep)
        if c.mode == "F" and step == 1:
            extra.append(_lora_mask_row(keep, 1.0 - c.reserve_p, "dropped share"))
    if c.mode == "D":
        extra.append(_child_outside_row(outs["param"], start, outs, child))
    outs = _perturbed(outs, perturb)
    names = ("param", "exp_avg", "exp_avg_sq")
    rows = compare(outs, dict(zip(names, ref)), dict(zip(names, gold)),
                   {"param": dt, "exp_avg": torch.float32, "exp_avg_sq": torch.float32})
    return {"gold": str(gold_dt).replace("torch.", ""), "rows": rows + extra}


CHECKS = {"lora": check_lora, "dora": check_dora, "attention": check_attention, "gather": check_gather,
          "ia3": check_ia3, "lora_embedding": check_lora_embedding, "child_adamw": check_child_adamw}


def check(case: C.Case, device="cuda", perturb: Perturb = None) -> dict:
    """Check one case; ``ok`` is True when every output is within the rule."""
    res = CHECKS[case.kind](case, device, perturb)
    return {**res, "ok": all(r["ok"] for r in res["rows"])}
