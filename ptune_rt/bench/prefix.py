"""``ptune-rt bench --suite prefix``: prefix tuning, HF PEFT vs ptune-rt's fused prefix attention.

The Llama-like benchmark model (random weights from a ``LlamaConfig``) gets a prefix of P virtual
tokens twice: HF PEFT's ``get_peft_model(PrefixTuningConfig)`` (the prefix goes into
``past_key_values``; every layer concatenates it with the sequence's keys/values, transformers
builds a [B, 1, L, P + L] mask and, because a mask is present, repeats K/V for GQA before SDPA) and
``ptune_rt.apply(PrefixConfig)`` on an identical copy of the base (the prefix stays out of the
cache; one fused op per layer attends over prefix and sequence without any of those tensors).
Both hold the same random, non-zero prompt embeddings. Per (P, seq) case, in one process:

* speed: a training step (forward + causal-LM loss + backward) and a no-grad forward, the two
  implementations interleaved round by round, medians (``ptune_rt.bench.timing``);
* bytes saved for backward: every tensor autograd saves in one training step (unique storages),
  classified by shape: attention-matrix sized ``[..., L, P + L]``, masks, K/V concatenated with the
  prefix; the largest ones of each side are listed by shape;
* equality: logits, loss and prefix gradient of ptune-rt vs PEFT on the same inputs.

Per P: greedy generation latency per token (batch 1), dispatched ops (``ptune_rt.bench.opcount``)
of a forward, a training step and a generate call, and the logits of both against PEFT in float64.
Finally an analytic HBM-bytes / H100-roofline model of one 7B-class attention layer: PEFT's op
chain vs the fused Triton kernels (a model, not a measurement).

Writes ``prefix_<device>.json`` (numbers + provenance), ``.md`` and ``.png``.

Modes (:data:`MODES`): the default run times P = 32 at both sequence lengths in 6 rounds (under 5
minutes on a 2-core CPU); ``--full`` is the configuration of the committed results
(``bench/results/prefix_cpu.*``: both prefix lengths); ``--quick`` runs tiny shapes in seconds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from ptune_rt.bench.workload import ModelShape

#: Speed of ptune-rt vs PEFT (PEFT time / ptune-rt time) per training step and per no-grad forward.
SPEED_TARGET = 1.10
SPEED_CASES = ("train", "forward")
MiB = 2**20

#: The settings of each run mode (an option given on the command line wins). ``default``: one prefix
#: length at both sequence lengths, 6 timed rounds per case (the fewest behind a PASS / MISS), under 5
#: minutes on a 2-core CPU; ``full``: the command of the committed ``bench/results/prefix_cpu.*``.
MODES = {
    "quick": {"repeats": 5},
    "default": {"repeats": 6, "prefix_lengths": "32"},
    "full": {"repeats": 9, "long_train_repeats": 5, "wait_for_load": 1.5, "max_wait": 300.0},
}
FULL_HELP = ("the configuration of the committed results (bench/results/prefix_cpu.*): P in 32,128, --repeats 9 "
             "--long-train-repeats 5 --wait-for-load 1.5 --max-wait 300, about 6 minutes on a 2-core CPU")


def prior_s(wl: "PrefixWorkload", quick: bool) -> dict:
    """Seconds per call in the committed run on its 2-core CPU: the plan's prior costs until
    the run's own calls are measured. ``train`` / ``forward`` / ``saved`` are functions of the sequence
    length (one call of one variant); the rest per progress step."""
    if quick:
        ref_l, base = 32, {"train": 0.05, "forward": 0.02, "saved_extra": 0.1, "generate": 0.1, "ops": 0.3,
                           "float64": 0.1, "build": 0.5}
    else:
        ref_l, base = 256, {"train": 0.92, "forward": 0.37, "saved_extra": 1.3, "generate": 0.36, "ops": 1.8,
                            "float64": 2.4, "build": 2.2}
    b = wl.batch / (2 if quick else 4)
    out = dict(base)
    out["train"] = lambda L: base["train"] * b * (L / ref_l) ** 1.24
    out["forward"] = lambda L: base["forward"] * b * (L / ref_l) ** 1.06
    out["saved"] = lambda L: 1.9 * out["train"](L) + base["saved_extra"]
    return out


# ----------------------------------------------------------------------------------------
# workload and setup factory
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefixWorkload(ModelShape):
    """Model shape, prefix lengths, batch and sequence lengths of one prefix-tuning run."""

    batch: int = 4
    seqs: tuple = (256, 1024)
    prefix_lengths: tuple = (32, 128)
    gen_batch: int = 1
    gen_prompt: int = 64
    gen_new_tokens: int = 32
    #: standard deviation of the random prompt embeddings (PEFT's own nn.Embedding init is N(0, 1))
    prompt_std: float = 1.0

    @classmethod
    def quick(cls) -> "PrefixWorkload":
        """Tiny shapes for smoke tests: same structure (GQA, two prefix lengths, two sequence lengths)."""
        return cls(**cls.QUICK, batch=2, seqs=(24, 40), prefix_lengths=(4, 12), gen_prompt=8, gen_new_tokens=4)

    @property
    def cases(self) -> list[tuple[int, int]]:
        """(P, seq) of every speed / memory case, in run order."""
        return [(p, s) for p in self.prefix_lengths for s in self.seqs]

    def model_workload(self):
        """The LoRA benchmark's ``Workload`` with this model shape (its frozen-model factory)."""
        from ptune_rt.bench.workload import Workload

        longest = max(self.prefix_lengths) + max(max(self.seqs), self.gen_prompt + self.gen_new_tokens)
        return Workload(**self.model_fields(), batch=self.batch, seq=longest, gen_batch=self.gen_batch,
                        gen_prompt=self.gen_prompt, gen_new_tokens=self.gen_new_tokens)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seqs"], d["prefix_lengths"] = list(self.seqs), list(self.prefix_lengths)
        d["head_dim"] = self.head_dim
        d["cases"] = [list(c) for c in self.cases]
        return d


@dataclasses.dataclass
class PrefixSetup:
    """PEFT's and ptune-rt's prefix models for one P, over copies of the same frozen base."""

    P: int
    peft: object
    ptune: object
    prompt_embeddings: object  # [P, 2 * layers * kv_heads * head_dim], the values both hold

    @property
    def models(self) -> dict:
        return {"peft": self.peft, "ptune-rt": self.ptune}


def build(wl: PrefixWorkload, P: int, base, backend: str = "auto") -> PrefixSetup:
    """PEFT ``PrefixTuningConfig`` and ptune-rt ``PrefixConfig`` models holding the same seeded random prompt
    embeddings; raises unless both hold identical frozen weights and identical trainable prefixes."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    import ptune_rt
    from ptune_rt.methods.prefix.inject import prefix_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wl.seed + 10)
        peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=P))
    emb = peft_model.prompt_encoder["default"].embedding.weight
    g = torch.Generator().manual_seed(wl.seed + 1000 + P)
    values = (torch.randn(tuple(emb.shape), generator=g) * wl.prompt_std).to(device=emb.device, dtype=emb.dtype)
    with torch.no_grad():
        emb.copy_(values)
    ptune_model = ptune_rt.apply(copy.deepcopy(base), ptune_rt.PrefixConfig(P, backend=backend))
    prefix_encoder(ptune_model).load_prompt_embeddings(values)
    _check_same(peft_model, ptune_model)
    return PrefixSetup(P, peft_model, ptune_model, values)


def _check_same(peft_model, ptune_model) -> None:
    import torch

    ours = dict(ptune_model.named_parameters())
    theirs = {}
    for n, p in peft_model.named_parameters():  # PEFT wraps the model itself as ``base_model``
        theirs[n.removeprefix("base_model.")] = p
    if set(ours) != set(theirs):
        raise RuntimeError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))[:6]}")
    for n, p in ours.items():
        q = theirs[n]
        if p.requires_grad != q.requires_grad or not torch.equal(p, q):
            raise RuntimeError(f"parameter {n} differs between the PEFT and the ptune-rt model")
    trainable = sorted(n for n, p in ours.items() if p.requires_grad)
    if trainable != ["prompt_encoder.default.embedding.weight"]:
        raise RuntimeError(f"expected the prompt embeddings to be the only trainable parameter, got {trainable}")


def make_inputs(wl: PrefixWorkload, device) -> tuple[dict, object]:
    """({seq: input_ids [batch, seq]}, prompt_ids [gen_batch, gen_prompt]) from fixed seeds."""
    import torch

    g = torch.Generator().manual_seed(wl.seed + 2)
    ids = {s: torch.randint(3, wl.vocab, (wl.batch, s), generator=g).to(device) for s in wl.seqs}
    prompt = torch.randint(3, wl.vocab, (wl.gen_batch, wl.gen_prompt), generator=g).to(device)
    return ids, prompt


def prefix_grad(model):
    return model.prompt_encoder["default"].embedding.weight.grad


# ----------------------------------------------------------------------------------------
# bytes saved for backward, by shape
# ----------------------------------------------------------------------------------------


def classify(shape, dtype: str, L: int, P: int, Hq: int, Hkv: int, D: int) -> str:
    """What a saved tensor of this shape is, as far as attention over [prefix ; sequence] goes."""
    s = list(shape)
    if len(s) >= 2 and s[-2] == L and s[-1] == P + L:
        if dtype == "bool" or (len(s) >= 3 and s[-3] == 1):
            return "attention mask"
        return "attention matrix"
    if dtype == "bool" and len(s) >= 2:
        return "attention mask"
    if len(s) >= 3 and s[-2] == P + L and s[-1] == D:
        return "K/V concatenated with the prefix, repeated for GQA" if s[-3] == Hq and Hq != Hkv else \
            "K/V concatenated with the prefix"
    return "other"


QUADRATIC_KINDS = ("attention matrix", "attention mask")


def saved_inventory(model, step, L: int, P: int, Hq: int, Hkv: int, D: int, top: int = 10) -> dict:
    """Run ``step()`` and list what autograd saved for backward: unique storages (as
    ``ptune_rt.bench.memory`` counts them), with the shape, dtype and innermost module of the first
    tensor saved on each, classified by :func:`classify`. Parameters are saved by reference and
    reported apart."""
    import torch

    from ptune_rt.bench.memory import _storage_key, _Where

    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    where = _Where(model, track_modules=True)
    seen: dict = {}
    count = [0]

    def pack(t):
        count[0] += 1
        if t.device.type == "meta":
            return t
        key = _storage_key(t)
        rec = seen.get(key)
        if rec is None:
            dtype = str(t.dtype).removeprefix("torch.")
            seen[key] = {"shape": list(t.shape), "dtype": dtype, "bytes": key[3], "module": where.module(),
                         "parameter": key in params, "kind": classify(t.shape, dtype, L, P, Hq, Hkv, D)}
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        where.remove()
    acts = [r for r in seen.values() if not r["parameter"]]
    by_kind: dict = {}
    by_module: dict = {}
    groups: dict = {}
    for r in acts:
        k = by_kind.setdefault(r["kind"], {"count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += r["bytes"]
        by_module[r["module"]] = by_module.get(r["module"], 0) + r["bytes"]
        g = groups.setdefault((tuple(r["shape"]), r["dtype"], r["module"], r["kind"]), [0, 0])
        g[0] += 1
        g[1] += r["bytes"]
    largest = [{"shape": list(sh), "dtype": dt, "module": mod, "kind": kind, "count": n, "bytes_each": b // n,
                "bytes_total": b}
               for (sh, dt, mod, kind), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]]
    quad = [r for r in acts if r["kind"] in QUADRATIC_KINDS]
    return {
        "activation_bytes": sum(r["bytes"] for r in acts),
        "parameter_bytes_by_reference": sum(r["bytes"] for r in seen.values() if r["parameter"]),
        "unique_activation_storages": len(acts),
        "saved_tensor_count": count[0],
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
        "by_module_type": dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
        "largest": largest,
        "quadratic_count": len(quad),
        "quadratic_bytes": sum(r["bytes"] for r in quad),
        "mask_count": sum(1 for r in acts if r["kind"] == "attention mask"),
        "concat_kv_count": sum(1 for r in acts if r["kind"].startswith("K/V concatenated")),
    }


# ----------------------------------------------------------------------------------------
# dispatched ops
# ----------------------------------------------------------------------------------------


class _AttentionScope:
    """Forward hooks that keep ``depth`` above 0 while a self-attention module runs; it stands in for
    ``OpCounter``'s LoRA tracker, so "inside" counts become per-attention-layer counts."""

    def __init__(self, model):
        self.depth = 0
        self.handles = []
        for m in model.modules():
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def remove(self):
        for h in self.handles:
            h.remove()


def count_ops(model, fn, layers: int) -> dict:
    """Ops dispatched by ``fn()``: top level (ptune-rt's custom ops counted once) and expanded (the
    torch path's ops inside them counted instead), whole model and per attention layer (forward)."""
    from ptune_rt.bench.opcount import OpCounter

    counter = OpCounter(None, descend=True)
    counter.where = _AttentionScope(model)
    try:
        with counter:
            fn()
    finally:
        counter.close()
    r = counter.result(layers)
    return {"all": r["all"], "compute": r["compute"], "custom": r["custom"],
            "inside_custom_compute": r["inside_custom_compute"], "compute_expanded": r["compute_expanded"],
            "in_attention_all": r["in_lora_all"], "in_attention_compute": r["in_lora_compute"],
            "per_attention_layer_compute": r["per_lora_linear_compute"],
            "per_attention_layer_compute_expanded": r["per_lora_linear_compute_expanded"],
            "per_attention_layer_ops": r["per_lora_linear_ops"], "top_ops": r["top_ops"]}


# ----------------------------------------------------------------------------------------
# analytic model: one 7B-class attention layer on an H100 (not a measurement)
# ----------------------------------------------------------------------------------------

SEVEN_B_LAYER = {"heads": 32, "kv_heads": 8, "head_dim": 128, "P": 128, "L": 4096, "layers": 32, "dtype_bytes": 2}


def _prefix_bwd_splits(B: int, Hkv: int, P: int, L: int) -> int:
    """Query chunks of the fused backward's prefix dK/dV pass (the kernel wrapper's own rule)."""
    try:
        from ptune_rt.kernels.prefix_attention import BWD_DKDV_CONFIGS, PREFIX_BWD_TARGET_PROGRAMS

        block_n, target = BWD_DKDV_CONFIGS[0].meta["BLOCK_N"], PREFIX_BWD_TARGET_PROGRAMS
    except Exception:  # the kernels' defaults, should triton be unavailable
        block_n, target = 64, 264

    def cdiv(a, b):
        return -(-a // b)

    base = cdiv(P, block_n) * B * Hkv
    splits = max(1, min(cdiv(L, 64), cdiv(target, base)))
    return cdiv(L, cdiv(L, splits))


def peft_chain(B, Hq, Hkv, L, P, D, e=2, layers=32, backward=False) -> list:
    """HF PEFT's op chain for one attention layer (the prefix in the cache, SDPA with a mask).

    Per-forward work shared by all layers (the prefix gather, the boolean mask) is charged 1/layers.
    """
    from ptune_rt.bench.analytic import Kernel

    S = P + L
    q = B * Hq * L * D * e
    kv_seq, kv_pre, kv_cat = B * Hkv * L * D * e, B * Hkv * P * D * e, B * Hkv * S * D * e
    kv_rep = B * Hq * S * D * e
    lse = B * Hq * L * 4
    mask_bool, mask_add = B * L * S, B * L * S * e
    attn_flops = 4 * B * Hq * L * S * D
    if not backward:
        return [
            Kernel("prefix gather: prompt embeddings -> per-row past_key_values (1/layers share)",
                   2 * Hkv * P * D * e, 2 * kv_pre, 0),
            Kernel("cache update: cat(prefix K, K)", kv_pre + kv_seq, kv_cat, 0),
            Kernel("cache update: cat(prefix V, V)", kv_pre + kv_seq, kv_cat, 0),
            Kernel("boolean [B, 1, L, P+L] mask (once per forward; 1/layers share)", 0, mask_bool / layers, 0),
            Kernel("SDPA: boolean mask -> additive mask", mask_bool, mask_add, B * L * S),
            Kernel("repeat_kv K (GQA)", kv_cat, kv_rep, 0),
            Kernel("repeat_kv V (GQA)", kv_cat, kv_rep, 0),
            Kernel("attention with a mask (memory-efficient SDPA; every block computed)",
                   q + 2 * kv_rep + mask_add, q + lse, attn_flops),
        ]
    return [
        Kernel("delta = rowsum(dO * O)", 2 * q, lse, 2 * B * Hq * L * D),
        Kernel("attention backward (dQ, dK, dV over all P+L keys, mask re-read)",
               3 * q + 2 * kv_rep + lse * 2 + mask_add, q + 2 * kv_rep, 2.5 * attn_flops),
        Kernel("repeat_kv backward dK (sum over the GQA group)", kv_rep, kv_cat, B * Hq * S * D),
        Kernel("repeat_kv backward dV (sum over the GQA group)", kv_rep, kv_cat, B * Hq * S * D),
        Kernel("cat backward: per-row prefix dK, dV into the prompt gradient", 2 * kv_pre, 2 * kv_pre, 0),
        Kernel("embedding backward: sum of the per-row prefix gradients (1/layers share)",
               2 * kv_pre, 2 * Hkv * P * D * 4, 2 * B * Hkv * P * D),
    ]


def fused_chain(B, Hq, Hkv, L, P, D, e=2, layers=32, backward=False) -> list:
    """ptune-rt's Triton kernels for one attention layer (prefix parameters fp32, cast per layer)."""
    from ptune_rt.bench.analytic import Kernel

    q = B * Hq * L * D * e
    kv_seq = B * Hkv * L * D * e
    pre, pre32 = Hkv * P * D * e, Hkv * P * D * 4
    lse = B * Hq * L * 4
    causal_keys = P + (L + 1) / 2  # keys a query sees on average: the prefix + half the sequence
    fwd_flops = 4 * B * Hq * L * causal_keys * D
    if not backward:
        return [
            Kernel("prefix cast fp32 -> activation dtype (K and V)", 2 * pre32, 2 * pre, 2 * Hkv * P * D),
            Kernel("fused prefix attention (online softmax over prefix + causal sequence blocks)",
                   q + 2 * kv_seq + 2 * pre, q + lse, fwd_flops),
        ]
    splits = _prefix_bwd_splits(B, Hkv, P, L)
    part = splits * B * Hkv * P * D * 4
    seq_pairs = B * Hq * D * L * (L + 1) / 2
    return [
        Kernel("delta = rowsum(dO * O)", 2 * q, lse, 2 * B * Hq * L * D),
        Kernel("dQ kernel (prefix + causal sequence keys)", 2 * q + 2 * kv_seq + 2 * pre + 2 * lse, q,
               6 * B * Hq * L * causal_keys * D),
        Kernel("dK/dV kernel, sequence keys (GQA group summed in-kernel)", 2 * q + 2 * kv_seq + 2 * lse,
               2 * kv_seq, 8 * seq_pairs),
        Kernel(f"dK/dV kernel, prefix keys ({splits} query chunks x {B} rows, fp32 partials)",
               2 * q + 2 * pre + 2 * lse, 2 * part, 8 * B * Hq * L * P * D),
        Kernel("sum of the prefix partials (K and V)", 2 * part, 2 * pre32, 2 * splits * B * Hkv * P * D),
    ]


def seven_b_model(batches=(1, 8), shape: Optional[dict] = None) -> dict:
    from ptune_rt.bench.analytic import H100_SXM, _chain

    sh = dict(SEVEN_B_LAYER, **(shape or {}))
    rows = []
    for B in batches:
        args = (B, sh["heads"], sh["kv_heads"], sh["L"], sh["P"], sh["head_dim"], sh["dtype_bytes"], sh["layers"])
        row = {"batch": B}
        for pass_ in ("forward", "backward"):
            bwd = pass_ == "backward"
            un = _chain(peft_chain(*args, backward=bwd), H100_SXM)
            fu = _chain(fused_chain(*args, backward=bwd), H100_SXM)
            row[pass_] = {"unfused": un, "fused": fu, "bytes_ratio_fused_over_unfused": fu["bytes"] / un["bytes"],
                          "bound_speedup_unfused_over_fused": un["bound_s"] / fu["bound_s"]}
        rows.append(row)
    return {"hardware": H100_SXM, "shape": sh, "dtype": "bfloat16" if sh["dtype_bytes"] == 2 else "other",
            "rows": rows,
            "note": "analytic model, not a measurement: one attention layer, ideal tiling (every operand read once per "
                    "kernel, every result written once, no L2 reuse across kernels), per-kernel roofline "
                    "max(FLOPs / peak, bytes / bandwidth), kernels serialized; the q/k/v/o projections are the same "
                    "on both sides and left out"}


def attention_flops(B, Hq, L, P, D, layers) -> dict:
    """Attention matrix-product FLOPs of one step on the benchmark model (a model of the CPU kernels:
    PEFT's masked SDPA computes every query/key pair, the fused op skips causally invisible ones)."""
    full = 4 * B * Hq * L * (P + L) * D * layers
    causal = 4 * B * Hq * L * (P + (L + 1) / 2) * D * layers
    return {"peft_forward": full, "ptune_forward": causal, "peft_train": 3.5 * full, "ptune_train": 3.5 * causal}


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


class PrefixBench:
    def __init__(self, wl: PrefixWorkload, device, repeats: int, long_train_repeats: int, warmup: int, plan):
        import torch

        from ptune_rt.bench.workload import build_base

        self.wl, self.device = wl, torch.device(device)
        self.repeats, self.long_train_repeats, self.warmup = repeats, long_train_repeats, warmup
        self.plan = plan
        self.status("building models")
        self.base = build_base(wl.model_workload(), self.device)
        self.setups = {P: build(wl, P, self.base) for P in wl.prefix_lengths}
        self.ids, self.prompt_ids = make_inputs(wl, self.device)

    def status(self, text: str):
        self.plan.status(text)

    def tick(self, n: int = 1):
        self.plan.advance(n)

    def train_repeats(self, L: int) -> int:
        return self.long_train_repeats if L == max(self.wl.seqs) else self.repeats

    # -- one (P, seq) case: bytes saved, training step, forward, equality ------------------------

    def case(self, P: int, L: int) -> dict:
        from ptune_rt.bench import workload as W
        from ptune_rt.bench.timing import interleaved, summarize

        wl, s, ids = self.wl, self.setups[P], self.ids[L]
        models = s.models
        out = {"P": P, "seq": L, "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

        # bytes saved for backward; this step is also each model's untimed warm-up training step
        self.plan.begin(f"P{P}_seq{L}_saved", f"P={P} seq={L}: saved for backward")
        mem = {}
        for name, m in models.items():
            m.train()
            W.zero_grads(m)
            mem[name] = saved_inventory(m, lambda m=m: W.train_step(m, ids), L, P, wl.heads, wl.kv_heads,
                                        wl.head_dim)
            W.zero_grads(m)
            self.tick()
        mem["ratio_ptune_over_peft"] = mem["ptune-rt"]["activation_bytes"] / mem["peft"]["activation_bytes"]
        mem["attention_matrix_elements_B_H_L_PL"] = wl.batch * wl.heads * L * (P + L)
        out["memory"] = mem

        self.plan.begin(f"P{P}_seq{L}_train", f"P={P} seq={L}: training step")
        losses = {}

        def train(n, m):
            losses[n] = W.train_step(m, ids)

        n_train = self.train_repeats(L)
        fns = {n: (lambda n=n, m=m: train(n, m)) for n, m in models.items()}
        cpu: dict = {}
        times = interleaved(fns, n_train, self.warmup, self.device, setup=lambda n: W.zero_grads(models[n]),
                            tick=self.plan.ticker(1, self.warmup * len(fns)), cpu_times=cpu)
        train_res = summarize(times, cpu_times=cpu)
        train_res["what"] = (f"forward + causal-LM loss + backward, batch {wl.batch} x seq {L}, P = {P}; seconds "
                             f"per step ({n_train} interleaved runs after {self.warmup + 1} untimed steps)")
        train_res["repeats"] = n_train
        gp, gm = prefix_grad(s.peft), prefix_grad(s.ptune)
        eq = {"loss_peft": float(losses["peft"]), "loss_ptune": float(losses["ptune-rt"]),
              "loss_abs_diff": abs(float(losses["peft"]) - float(losses["ptune-rt"])),
              "prefix_grad_max_abs_diff": float((gp - gm).abs().max()), "prefix_grad_max_abs": float(gp.abs().max())}
        for m in models.values():
            W.zero_grads(m)
            m.eval()

        self.plan.begin(f"P{P}_seq{L}_forward", f"P={P} seq={L}: no-grad forward")
        logits = {}

        def fwd(n, m):
            logits[n] = W.forward_logits(m, ids)

        # the frozen base model without a prefix runs alongside: PEFT / base is the ceiling, the ratio
        # a prefix costing nothing at all would reach
        fns = {n: (lambda n=n, m=m: fwd(n, m)) for n, m in {**models, "base": self.base}.items()}
        cpu = {}
        times = interleaved(fns, self.repeats, self.warmup, self.device,
                            tick=self.plan.ticker(1, self.warmup * len(fns)), cpu_times=cpu)
        fwd_res = summarize(times, cpu_times=cpu)
        fwd_res["what"] = (f"no-grad forward (eval), batch {wl.batch} x seq {L}, P = {P}; seconds; 'base' is the frozen "
                           "model without a prefix")
        fwd_res["repeats"] = self.repeats
        lp, lm = logits["peft"], logits["ptune-rt"]
        eq.update({"logits_shape": list(lm.shape), "logits_max_abs_diff": float((lm - lp).abs().max()),
                   "logits_max_abs": float(lp.abs().max()),
                   "argmax_agreement": float((lm.argmax(-1) == lp.argmax(-1)).float().mean())})
        logits.clear()  # the closure above holds the dict: empty it rather than del the name
        del lp, lm
        out["speed"] = {"train": train_res, "forward": fwd_res}
        out["equality"] = eq
        return out

    # -- per P: generate, ops, float64 equality --------------------------------------------

    def generate(self, P: int) -> dict:
        import torch

        from ptune_rt.bench import workload as W
        from ptune_rt.bench.timing import interleaved, summarize

        self.plan.begin(f"P{P}_generate", f"P={P}: generate")
        s, wl = self.setups[P], self.wl
        outs = {}

        def gen(n, m):
            outs[n] = W.generate(m, self.prompt_ids, wl.gen_new_tokens)

        for m in s.models.values():
            m.eval()
        fns = {n: (lambda n=n, m=m: gen(n, m)) for n, m in s.models.items()}
        cpu: dict = {}
        times = interleaved(fns, self.repeats, self.warmup, self.device,
                            tick=self.plan.ticker(1, self.warmup * len(fns)), cpu_times=cpu)
        res = summarize(times, per=wl.gen_new_tokens, cpu_times=cpu)
        res["what"] = (f"greedy generate, batch {wl.gen_batch}, {wl.gen_prompt}-token prompt, {wl.gen_new_tokens} new "
                       f"tokens, P = {P}; wall time / new tokens (prefill included)")
        res["new_tokens"] = {n: int(o.shape[1] - self.prompt_ids.shape[1]) for n, o in outs.items()}
        res["same_tokens_ptune_vs_peft"] = bool(torch.equal(outs["peft"], outs["ptune-rt"]))
        return res

    def ops(self, P: int) -> dict:
        from ptune_rt.bench import workload as W

        s, wl = self.setups[P], self.wl
        L = min(wl.seqs)
        ids = self.ids[L]
        res = {"seq": L}
        self.plan.begin(f"P{P}_ops")
        for name, m in s.models.items():
            self.status(f"P={P}: ops ({name})")
            m.eval()
            r = {"forward": count_ops(m, lambda m=m: W.forward_logits(m, ids), wl.layers),
                 "generate": count_ops(m, lambda m=m: W.generate(m, self.prompt_ids, wl.gen_new_tokens), wl.layers)}
            m.train()
            W.zero_grads(m)
            r["train_step"] = count_ops(m, lambda m=m: W.train_step(m, ids), wl.layers)
            W.zero_grads(m)
            m.eval()
            r["generate_per_token"] = {k: r["generate"][k] / wl.gen_new_tokens
                                       for k in ("all", "compute", "custom", "compute_expanded")}
            res[name] = r
            self.tick()
        return res

    def float64_check(self, P: int) -> dict:
        """Logits of both fp32 models against PEFT run in float64 (the project's tolerance rule), and how
        much the prefix changes the logits (the prefix is not a no-op)."""
        import torch

        from ptune_rt.bench import workload as W
        from ptune_rt.testing.tolerances import error_report

        self.plan.begin(f"P{P}_float64", f"P={P}: equality vs float64")
        s = self.setups[P]
        ids = self.ids[min(self.wl.seqs)]
        for m in s.models.values():
            m.eval()
        lp, lm = W.forward_logits(s.peft, ids), W.forward_logits(s.ptune, ids)
        lb = W.forward_logits(self.base, ids)
        gold = copy.deepcopy(s.peft).double()
        gold.eval()
        lg = W.forward_logits(gold, ids)
        del gold
        rule = error_report(lm, lp, lg, torch.float32)
        self.tick()
        return {"seq": int(ids.shape[1]), "logits_max_abs_diff_ptune_vs_peft": float((lm - lp).abs().max()),
                "logits_ptune_err_to_fp64": rule["err"], "logits_peft_err_to_fp64": rule["ref_err"],
                "logits_bound": rule["bound"], "logits_within_tolerance_rule": bool(rule["ok"]),
                "prefix_effect_max_abs_logit_change": float((lp - lb).abs().max())}


def evaluate_targets(results: dict) -> list[dict]:
    """One row per target; speed targets are judged on their 95% interval (``report.verdict``)."""
    from ptune_rt.bench.report import judge

    rows = []
    for c in results.get("cases", []):
        P, L = c["P"], c["seq"]
        for key, label in (("train", "training step"), ("forward", "no-grad forward")):
            d = c.get("speed", {}).get(key)
            if d:
                v = d["speedup"]
                rows.append({"target": f"P={P}, seq {L}: {label}, ptune-rt speed vs PEFT", "case": [P, L],
                             "measure": key, "value": v, "goal": f">= {SPEED_TARGET:.2f}x", "unit": "x",
                             **judge(v, SPEED_TARGET, True, d.get("speedup_ci95"), d["repeats"])})
        mem = c.get("memory", {}).get("ptune-rt")
        if mem:
            v = mem["quadratic_count"]
            rows.append({"target": f"P={P}, seq {L}: ptune-rt saves no [.., L, P+L] tensor and no mask for backward",
                         "case": [P, L], "measure": "saved", "value": v, "goal": "0 tensors", "unit": "tensors",
                         **judge(v + mem["mask_count"], 0, at_least=False)})
    return rows


def make_plan(wl: PrefixWorkload, repeats: int, long_train: int, warmup: int, quick: bool):
    """The run's plan: model builds, every case's saved-bytes step and timed calls, per P the generate
    timing, op counts and float64 check, with their prior costs."""
    from ptune_rt.bench.timing import Plan

    pr = prior_s(wl, quick)
    plan = Plan()
    plan.add("build", 1, pr["build"] * len(wl.prefix_lengths), "building models")
    for P, L in wl.cases:
        n_train = long_train if L == max(wl.seqs) else repeats
        plan.add(f"P{P}_seq{L}_saved", 2, pr["saved"](L), f"P={P} seq={L}: saved for backward")
        plan.add(f"P{P}_seq{L}_train", 2 * (warmup + n_train), pr["train"](L), f"P={P} seq={L}: training step")
        plan.add(f"P{P}_seq{L}_forward", 3 * (warmup + repeats), pr["forward"](L), f"P={P} seq={L}: no-grad forward")
    for P in wl.prefix_lengths:
        plan.add(f"P{P}_generate", 2 * (warmup + repeats), pr["generate"], f"P={P}: generate")
    for P in wl.prefix_lengths:
        plan.add(f"P{P}_ops", 2, pr["ops"], f"P={P}: ops")
    for P in wl.prefix_lengths:
        plan.add(f"P{P}_float64", 1, pr["float64"], f"P={P}: equality vs float64")
    plan.add("analytic", 1, 0.01, "analytic model")
    return plan


def workload(args) -> PrefixWorkload:
    """The run's workload: the mode's shapes with --prefix-lengths / --seqs applied."""
    wl = PrefixWorkload.quick() if args.quick else PrefixWorkload.default()
    for field, text in (("prefix_lengths", args.prefix_lengths), ("seqs", args.seqs)):
        if text:
            try:
                values = tuple(int(x) for x in text.split(",") if x.strip())
            except ValueError:
                values = ()
            if not values or min(values) < 1:
                raise SystemExit(f"ptune-rt bench --suite prefix: --{field.replace('_', '-')} takes comma-separated "
                                 f"positive integers, got {text!r}")
            wl = dataclasses.replace(wl, **{field: values})
    return wl


def run(args, command_argv) -> dict:
    import torch

    import ptune_rt
    from ptune_rt.bench.common import provenance, wait_for_quiet
    from ptune_rt.bench.workload import default_device

    if args.repeats < 1 or (args.long_train_repeats is not None and args.long_train_repeats < 1):
        raise SystemExit("ptune-rt bench --suite prefix: --repeats and --long-train-repeats must be >= 1")
    if args.warmup < 0:
        raise SystemExit("ptune-rt bench --suite prefix: --warmup must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = workload(args)
    long_train = args.long_train_repeats if args.long_train_repeats is not None else args.repeats
    waited = None
    if args.wait_for_load is not None and device.type == "cpu" and hasattr(os, "getloadavg"):
        waited = wait_for_quiet(args.wait_for_load, args.max_wait)
    results: dict = {"schema": "ptune-rt-bench-prefix/1", "provenance": provenance(device, command_argv),
                     "workload": wl.to_dict(), "mode": args.mode,
                     "repeats": args.repeats, "long_train_repeats": long_train, "warmup": args.warmup,
                     "targets_definition": {"speed": SPEED_TARGET,
                                            "saved": "no [.., L, P+L] (attention-matrix or mask) tensor on ptune-rt's side"}}
    if waited is not None:
        results["provenance"]["wait_for_load"] = waited
    t0 = time.perf_counter()
    plan = make_plan(wl, args.repeats, long_train, args.warmup, args.quick).start(disable=args.no_progress)
    section_s = results["section_wall_s"] = {}
    try:
        ts = time.perf_counter()
        plan.begin("build")
        bench = PrefixBench(wl, device, args.repeats, long_train, args.warmup, plan)
        plan.advance()
        section_s["build"] = time.perf_counter() - ts
        results["backend"] = sorted({row["backend"] for s in bench.setups.values() for row in ptune_rt.report(s.ptune)})
        results["cases"] = []
        for P, L in wl.cases:
            ts = time.perf_counter()
            results["cases"].append(bench.case(P, L))
            section_s[f"case_P{P}_seq{L}"] = time.perf_counter() - ts
        for key, fn in (("generate", bench.generate), ("ops", bench.ops), ("float64", bench.float64_check)):
            ts = time.perf_counter()
            results[key] = {str(P): fn(P) for P in wl.prefix_lengths}
            section_s[key] = time.perf_counter() - ts
        plan.begin("analytic")
        results["attention_flops_model"] = {
            f"P{P}_seq{L}": attention_flops(wl.batch, wl.heads, L, P, wl.head_dim, wl.layers) for P, L in wl.cases}
        results["analytic"] = seven_b_model()
        plan.advance()
    finally:
        plan.close()
    results["provenance"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["provenance"]["wall_time_s"] = time.perf_counter() - t0
    results["plan"] = plan.summary()
    results["targets"] = evaluate_targets(results)
    return results


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def file_stem(results: dict) -> str:
    from ptune_rt.bench.report import suite_stem

    return suite_stem(results, "prefix")


def _target(results, P, L, measure):
    for t in results.get("targets", []):
        if t["case"] == [P, L] and t["measure"] == measure:
            return t
    return None


def _verdict(t) -> str:
    from ptune_rt.bench.report import verdict_of

    return verdict_of(t)


def _shape(sh) -> str:
    return "[" + ", ".join(str(x) for x in sh) + "]"


def summary_table(results: dict) -> list[str]:
    """The headline table: one row per (P, seq) case."""
    from ptune_rt.bench.report import _mib, _ms, _sci

    lines = ["| P | seq | Training step ms, PEFT / ptune-rt | Training speed vs PEFT | No-grad forward ms, PEFT / "
             "ptune-rt | Forward speed vs PEFT | Saved for backward MiB, PEFT / ptune-rt | [L, P+L] tensors + masks "
             "saved, PEFT / ptune-rt | max abs logit diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results.get("cases", []):
        P, L = c["P"], c["seq"]
        tr, fw = c["speed"]["train"], c["speed"]["forward"]
        mem = c["memory"]
        t_tr, t_fw, t_mem = _target(results, P, L, "train"), _target(results, P, L, "forward"), \
            _target(results, P, L, "saved")
        reps = f" ({tr['repeats']} runs)" if tr["repeats"] != results["repeats"] else ""
        lines.append(
            f"| {P} | {L} | {_ms(tr['variants']['peft']['median_s'])} / {_ms(tr['variants']['ptune-rt']['median_s'])}"
            f"{reps} | **{tr['speedup']:.2f}x** {_verdict(t_tr)} | {_ms(fw['variants']['peft']['median_s'])} / "
            f"{_ms(fw['variants']['ptune-rt']['median_s'])} | **{fw['speedup']:.2f}x** {_verdict(t_fw)}{_ceiling(fw)} | "
            f"{_mib(mem['peft']['activation_bytes'])} / {_mib(mem['ptune-rt']['activation_bytes'])} | "
            f"{mem['peft']['quadratic_count']} ({_mib(mem['peft']['quadratic_bytes'])} MiB) / "
            f"{mem['ptune-rt']['quadratic_count']} {_verdict(t_mem)} | {_sci(c['equality']['logits_max_abs_diff'])} |")
    return lines


def _ceiling(d: dict) -> str:
    c = d.get("ceiling_speedup_zero_cost_adapter")
    return "" if c is None else f" (ceiling {c:.2f}x)"


def generate_table(results: dict) -> list[str]:
    from ptune_rt.bench.report import _ms

    g = results.get("generate") or {}
    if not g:
        return []
    lines = ["| P | Greedy generate, ms per new token: PEFT / ptune-rt | ptune-rt vs PEFT | fastest runs ratio | "
             "same tokens |", "|---:|---:|---:|---:|---|"]
    for P, d in g.items():
        v = d["variants"]
        lines.append(f"| {P} | {_ms(v['peft']['median_s'])} / {_ms(v['ptune-rt']['median_s'])} | {d['speedup']:.2f}x | "
                     f"{d['speedup_of_minima']:.2f}x | {d['same_tokens_ptune_vs_peft']} |")
    return lines


def _header(results: dict) -> list[str]:
    from ptune_rt.bench.report import commit_label, load_label, mode_label, peak_load

    pv, wl = results["provenance"], results["workload"]
    v = pv["versions"]
    commit, loads = commit_label(pv), load_label(pv)
    reps = f"{results['repeats']} interleaved runs per variant"
    if results["long_train_repeats"] != results["repeats"]:
        reps += (f" ({results['long_train_repeats']} for the training step at seq {max(wl['seqs'])}, where one step "
                 "takes seconds)")
    reps += (f" after {results['warmup']} untimed run(s) per variant (the training step's saved-bytes step runs "
             "untimed before those)")
    out = [f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, {loads}, "
           f"{pv['wall_time_s']:.0f} s); torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
           f"commit {commit}; {mode_label(results)}; {reps}, medians; command `{pv['command']}`.", "",
           f"Workload: Llama-like model from a `LlamaConfig` with random weights (hidden {wl['hidden']}, intermediate "
           f"{wl['intermediate']}, {wl['layers']} layers, {wl['heads']} heads / {wl['kv_heads']} KV heads, head dim "
           f"{wl['head_dim']}, vocab {wl['vocab']}), {wl['dtype']}, batch {wl['batch']}, no padding; prefix tuning with "
           f"P in {wl['prefix_lengths']} virtual tokens, seq in {wl['seqs']}. *PEFT*: `get_peft_model(model, "
           "PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=P))`, SDPA attention; *ptune-rt*: "
           f"`ptune_rt.apply(copy, PrefixConfig(P))` on an identical copy of the base (backend "
           f"{', '.join(results.get('backend', []))}); both hold the same random N(0, {wl['prompt_std']:g}) prompt "
           "embeddings, the only trainable parameter."]
    cpus = pv.get("cpu_count") or 1
    own = min(pv.get("torch_threads") or 1, cpus)
    before = [c["load_average_before"][0] for c in results.get("cases", []) if c.get("load_average_before")]
    top = max([peak_load(pv)] + before)
    if before:
        out += ["", f"1-minute load average before each case: {', '.join(f'{x:.2f}' for x in before)} (this run's own "
                f"{own} compute threads included: about {own} is this run alone on {cpus} CPUs)."]
    if pv["device"].startswith("cpu") and top > own + 0.5:
        out += ["", f"> Note: the 1-minute load average reached {top:.1f} on {cpus} CPUs during this run, more than this "
                "run's own threads: other processes competed for the cores, so the timings are noisy (interleaved runs "
                "and medians, but treat small ratios with care)."]
    return out


def _targets_md(results) -> list[str]:
    tg = results.get("targets", [])
    if not tg:
        return []
    from ptune_rt.bench.report import VERDICT_RULE, ci_cell, verdict_counts, verdict_of

    out = ["| Target | Measured | 95% interval | Goal | Result |", "|---|---:|---:|---|---|"]
    for t in tg:
        val = f"{t['value']:.3f}x" if t["unit"] == "x" else f"{t['value']} {t['unit']}"
        out.append(f"| {t['target']} | {val} | {ci_cell(t, 'ci95', 3)} | {t['goal']} | {verdict_of(t)} |")
    out += ["", f"{len(tg)} targets: {verdict_counts(tg)}. {VERDICT_RULE}"]
    return out


def _timing_md(results) -> list[str]:
    from ptune_rt.bench.report import _ms, _x, ci_cell

    out = ["| P | seq | case | variant | median ms | min ms | max ms | median CPU ms | runs (ms) |",
           "|---:|---:|---|---|---:|---:|---:|---:|---|"]
    ratios = ["| P | seq | case | ratio of medians (headline) | 95% interval | median of paired ratios | "
              "paired min / max | ratio of fastest runs | ratio of median CPU times | load before the case |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(c["P"], c["seq"], k, c["speed"][k], c.get("load_average_before")) for c in results.get("cases", [])
            for k in SPEED_CASES]
    rows += [(P, "–", "generate / token", d, None) for P, d in (results.get("generate") or {}).items()]
    for P, L, k, d, load in rows:
        for n, v in d["variants"].items():
            runs = ", ".join(f"{t * 1e3:.0f}" if t > 0.1 else f"{t * 1e3:.1f}" for t in v["runs_s"])
            out.append(f"| {P} | {L} | {k} | {n} | {_ms(v['median_s'])} | {_ms(v['min_s'])} | {_ms(v['max_s'])} | "
                       f"{_ms(v.get('cpu_median_s'))} | {runs} |")
        ratios.append(f"| {P} | {L} | {k} | {_x(d['speedup'])} | {ci_cell(d)} | {_x(d['speedup_paired_median'])} | "
                      f"{_x(d['speedup_paired_min'])} / {_x(d['speedup_paired_max'])} | {_x(d['speedup_of_minima'])} | "
                      f"{_x(d.get('speedup_cpu_time'))} | {f'{load[0]:.2f}' if load else '–'} |")
    return out + [""] + ratios + [
        "", "All ratios are PEFT / ptune-rt (above 1: ptune-rt faster). *95% interval*: paired bootstrap of the "
        "ratio of medians over the rounds. *Paired*: per interleaved round. *Fastest "
        "runs*: contention only slows runs down, so the minima are the least disturbed. *CPU time*: process CPU "
        "seconds (all threads) per call."]


def _memory_md(results) -> list[str]:
    from ptune_rt.bench.report import _mib

    out = []
    for c in results.get("cases", []):
        P, L, mem = c["P"], c["seq"], c["memory"]
        wl = results["workload"]
        out += [f"### P = {P}, seq = {L}", "",
                f"Activations saved: PEFT {_mib(mem['peft']['activation_bytes'])} MiB, ptune-rt "
                f"{_mib(mem['ptune-rt']['activation_bytes'])} MiB ({mem['ratio_ptune_over_peft']:.3f}x of PEFT); "
                f"parameters saved by reference (no extra memory): {_mib(mem['peft']['parameter_bytes_by_reference'])} / "
                f"{_mib(mem['ptune-rt']['parameter_bytes_by_reference'])} MiB. A B x H x L x (P+L) tensor here is "
                f"{wl['batch']} x {wl['heads']} x {L} x {P + L} = {mem['attention_matrix_elements_B_H_L_PL']:,} elements.",
                "", "| Kind | PEFT count | PEFT MiB | ptune-rt count | ptune-rt MiB |", "|---|---:|---:|---:|---:|"]
        kinds = list(dict.fromkeys(list(mem["peft"]["by_kind"]) + list(mem["ptune-rt"]["by_kind"])))
        for k in kinds:
            a = mem["peft"]["by_kind"].get(k, {"count": 0, "bytes": 0})
            b = mem["ptune-rt"]["by_kind"].get(k, {"count": 0, "bytes": 0})
            out.append(f"| {k} | {a['count']} | {_mib(a['bytes'])} | {b['count']} | {_mib(b['bytes'])} |")
        for name in ("peft", "ptune-rt"):
            out += ["", f"Largest saved activations, {'PEFT' if name == 'peft' else name} (grouped by shape, dtype, "
                    "module):", "", "| shape | dtype | saved in | kind | count | MiB each | MiB total |",
                    "|---|---|---|---|---:|---:|---:|"]
            for r in mem[name]["largest"]:
                out.append(f"| {_shape(r['shape'])} | {r['dtype']} | {r['module']} | {r['kind']} | {r['count']} | "
                           f"{r['bytes_each'] / MiB:.2f} | {r['bytes_total'] / MiB:.2f} |")
        out.append("")
    out += ["Unique storages autograd saves in one training step (`saved_tensors_hooks`), by the innermost module "
            "running when they were saved and by shape: *attention matrix* = `[..., L, P+L]` with a head dimension; *attention mask* = the same with a broadcast head dimension of 1, or any boolean "
            "tensor; *K/V concatenated with the prefix* = `[..., P+L, head_dim]`. The storage's full size is counted."]
    return out


def _ops_md(results) -> list[str]:
    ops = results.get("ops") or {}
    if not ops:
        return []
    out = ["| P | step | variant | all ops | compute ops (top level) | custom ops | compute, custom ops expanded | "
           "compute ops per attention layer (forward; top level / expanded) |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
    for P, d in ops.items():
        for step in ("forward", "train_step", "generate", "generate_per_token"):
            for n in ("peft", "ptune-rt"):
                r = d[n][step]
                per = ""
                if step == "forward":
                    per = f"{r['per_attention_layer_compute']:.1f} / {r['per_attention_layer_compute_expanded']:.1f}"
                f = (lambda v: f"{v:.1f}") if step == "generate_per_token" else (lambda v: f"{int(v)}")
                out.append(f"| {P} | {step} | {n} | {f(r['all'])} | {f(r['compute'])} | {f(r['custom'])} | "
                           f"{f(r['compute_expanded'])} | {per} |")
    P0 = next(iter(ops))
    out += ["", f"Ops dispatched inside one attention layer per forward, by name (P = {P0}, top level):", ""]
    for n in ("peft", "ptune-rt"):
        per = ops[P0][n]["forward"]["per_attention_layer_ops"]
        out.append(f"- {n}: " + ", ".join(f"`{k}` x{v:g}" for k, v in per.items()))
    seq = ops[P0]["seq"]
    out += ["", f"Counted with a `TorchDispatchMode` (`ptune_rt.bench.opcount`) at batch {results['workload']['batch']} "
            f"x seq {seq} (forward, training step) and for one whole greedy generate call (batch "
            f"{results['workload']['gen_batch']}, {results['workload']['gen_new_tokens']} new tokens; per token = that "
            "/ new tokens). *compute* = dispatched ops minus metadata-only ones (views, `detach`, ...); *custom* = "
            "ptune-rt's own `ptune_rt::` ops dispatched (the fused attention's forward and backward); *expanded* = "
            "each custom op replaced by what its torch path dispatches. An attention layer includes its q/k/v/o projections and RoPE."]
    return out


def _equality_md(results) -> list[str]:
    from ptune_rt.bench.report import _sci

    out = ["| P | seq | max abs logit diff ptune-rt vs PEFT | max abs logit | argmax agreement | loss PEFT / ptune-rt | "
           "max abs prefix-grad diff / max abs prefix grad |", "|---:|---:|---:|---:|---:|---|---|"]
    for c in results.get("cases", []):
        e = c["equality"]
        out.append(f"| {c['P']} | {c['seq']} | {_sci(e['logits_max_abs_diff'])} | {e['logits_max_abs']:.3f} | "
                   f"{e['argmax_agreement']:.4f} | {e['loss_peft']:.6f} / {e['loss_ptune']:.6f} | "
                   f"{_sci(e['prefix_grad_max_abs_diff'])} / {_sci(e['prefix_grad_max_abs'])} |")
    f64 = results.get("float64") or {}
    if f64:
        out += ["", "| P | seq | logits error to PEFT in float64: ptune-rt / PEFT fp32 / allowed bound | within the "
                "project's tolerance rule | max abs logit change by the prefix (PEFT vs base) |",
                "|---:|---:|---|---|---:|"]
        for P, e in f64.items():
            out.append(f"| {P} | {e['seq']} | {_sci(e['logits_ptune_err_to_fp64'])} / {_sci(e['logits_peft_err_to_fp64'])}"
                       f" / {_sci(e['logits_bound'])} | {e['logits_within_tolerance_rule']} | "
                       f"{e['prefix_effect_max_abs_logit_change']:.3f} |")
    out += ["", "Logits from the last timed no-grad forward of each case, loss and prefix gradient from the last timed "
            "training step (same inputs on both sides)."]
    return out


def _flops_md(results) -> list[str]:
    fm = results.get("attention_flops_model") or {}
    if not fm:
        return []
    out = ["| case | attention GFLOP per forward, PEFT (all P+L keys) / ptune-rt (prefix + causal) | per training step "
           "(x3.5) |", "|---|---:|---:|"]
    for k, d in fm.items():
        out.append(f"| {k} | {d['peft_forward'] / 1e9:.2f} / {d['ptune_forward'] / 1e9:.2f} | "
                   f"{d['peft_train'] / 1e9:.2f} / {d['ptune_train'] / 1e9:.2f} |")
    out += ["", "A model, not a measurement: the attention score and value products over all layers. PEFT's SDPA gets "
            "an explicit mask (the keys outnumber the queries), so no key block can be skipped; the fused op runs the "
            "sequence part causally. The linears and the LM head, identical on both sides, are left out."]
    return out


def _analytic_md(results) -> list[str]:
    a = results.get("analytic")
    if not a:
        return []
    hw, sh = a["hardware"], a["shape"]
    out = [f"**Model, not a measurement.** One attention layer of a 7B-class model: {sh['heads']} heads, "
           f"{sh['kv_heads']} KV heads, head dim {sh['head_dim']}, P = {sh['P']}, L = {sh['L']}, {a['dtype']}, "
           f"{sh['layers']} layers (per-forward work shared by the layers is charged 1/{sh['layers']}), on an "
           f"{hw['name']} ({hw['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16, {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s "
           "HBM3). *PEFT chain*: prefix gathered per row, K/V concatenated with it in the cache, a [B, 1, L, P+L] "
           "boolean mask, converted to an additive mask inside SDPA, repeat_kv for GQA, masked memory-efficient "
           "attention over every block; backward through the same chain (repeat_kv's group sum, the per-row prefix "
           "gradient summed by the embedding backward). *Fused*: ptune-rt's Triton kernels (prefix cast from the "
           "fp32 parameter, one forward kernel; backward: delta, dQ, dK/dV for the sequence, dK/dV partials for the "
           "prefix, their sum).", "",
           "| batch | pass | kernels PEFT / fused | HBM MB PEFT | HBM MB fused | fused / PEFT bytes | GFLOP PEFT / fused | "
           "bound us PEFT | bound us fused | bound speedup |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in a["rows"]:
        for pass_ in ("forward", "backward"):
            d = r[pass_]
            u, f = d["unfused"], d["fused"]
            out.append(f"| {r['batch']} | {pass_} | {u['kernels']} / {f['kernels']} | {u['bytes'] / 1e6:.1f} | "
                       f"{f['bytes'] / 1e6:.1f} | {d['bytes_ratio_fused_over_unfused']:.2f} | {u['flops'] / 1e9:.0f} / "
                       f"{f['flops'] / 1e9:.0f} | {u['bound_s'] * 1e6:.0f} | {f['bound_s'] * 1e6:.0f} | "
                       f"**{d['bound_speedup_unfused_over_fused']:.2f}x** |")
    r0 = a["rows"][0]
    for pass_ in ("forward", "backward"):
        out += ["", f"Per kernel, batch {r0['batch']}, {pass_} (MB read + written, GFLOP, bound us):", ""]
        for impl, label in (("unfused", "PEFT"), ("fused", "fused")):
            out.append(f"- {label}: " + "; ".join(
                f"{k['kernel']} {(k['read'] + k['write']) / 1e6:.1f} MB, {k['flops'] / 1e9:.1f} GFLOP, "
                f"{k['bound_s'] * 1e6:.1f} us" for k in r0[pass_][impl]["detail"]))
    out += ["", a["note"] + ". Attention backward FLOPs: 2.5x the forward for PEFT's single masked kernel; the fused "
            "backward recomputes the scores in its dQ and its dK/dV kernels (no atomics), 3.5x its forward."]
    return out


def markdown(results: dict) -> str:
    wl = results["workload"]
    out = [f"# ptune-rt prefix-tuning benchmark ({results['provenance']['device']}, {wl['dtype']})", ""]
    out += _header(results) + [""] + summary_table(results)
    out += ["", "Speed: PEFT median / ptune-rt median (above 1: ptune-rt faster), target >= "
            f"{SPEED_TARGET:.2f}x; *ceiling* = PEFT median / median of the frozen base model without a prefix, "
            "timed in the same rounds: the ratio a prefix costing nothing at all would reach (the linears, the LM "
            "head and the loss are the same on both sides). The saved-bytes target: no attention-matrix-sized "
            "tensor and no mask on ptune-rt's side. *max abs logit diff*: ptune-rt vs PEFT on the same inputs.", ""]
    out += generate_table(results)
    for head, body in (("Targets", _targets_md(results)), ("Timing detail", _timing_md(results)),
                       ("Bytes saved for backward", _memory_md(results)), ("Dispatched ops", _ops_md(results)),
                       ("Equality", _equality_md(results)), ("Attention FLOPs (model)", _flops_md(results)),
                       ("Analytic HBM traffic and H100 roofline (7B-class layer)", _analytic_md(results))):
        if body:
            out += ["", f"## {head}", ""] + body
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptune_rt.bench.report import bar_groups

    fig = Figure(figsize=(13, 9.5), dpi=110)
    FigureCanvasAgg(fig)
    axs = fig.subplots(2, 2)
    wl = results["workload"]
    fig.suptitle(f"Prefix tuning: ptune-rt vs HF PEFT ({results['provenance']['device']}, {wl['dtype']}, "
                 f"{results['mode']})")
    cases = results.get("cases", [])

    ax = axs[0][0]
    if cases:
        labels = [f"P={c['P']}\nseq {c['seq']}" for c in cases]
        xs = list(range(len(cases)))
        for off, key, color in ((-0.2, "train", "tab:blue"), (0.2, "forward", "tab:cyan")):
            vals = [c["speed"][key]["speedup"] for c in cases]
            lo = [max(0.0, v - c["speed"][key]["speedup_paired_min"]) for v, c in zip(vals, cases)]
            hi = [max(0.0, c["speed"][key]["speedup_paired_max"] - v) for v, c in zip(vals, cases)]
            ax.bar([x + off for x in xs], vals, width=0.4, yerr=[lo, hi], capsize=3, color=color,
                   label="training step" if key == "train" else "no-grad forward")
        ax.axhline(SPEED_TARGET, color="black", ls="--", lw=1, label=f"target {SPEED_TARGET:.2f}x")
        ax.axhline(1.0, color="gray", lw=0.8)
        span = [c["speed"][k][q] for c in cases for k in SPEED_CASES for q in ("speedup_paired_min", "speedup_paired_max")]
        ax.set_ylim(min(0.8, min(span) - 0.05), max(1.25, max(span) + 0.05))
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("PEFT time / ptune-rt time")
        ax.set_title("Speed vs PEFT (median; bars: paired min-max)")
        ax.legend(fontsize=8, loc="upper left")

    ax = axs[0][1]
    if cases:
        labels, quad, kv, other = [], [], [], []
        for c in cases:
            for n in ("peft", "ptune-rt"):
                bk = c["memory"][n]["by_kind"]
                labels.append(f"{'PEFT' if n == 'peft' else n}\nP={c['P']} L={c['seq']}")
                quad.append(sum(v["bytes"] for k, v in bk.items() if k in QUADRATIC_KINDS) / MiB)
                kv.append(sum(v["bytes"] for k, v in bk.items() if k.startswith("K/V concatenated")) / MiB)
                other.append(bk.get("other", {"bytes": 0})["bytes"] / MiB)
        xs = list(range(len(labels)))
        ax.bar(xs, other, color="tab:gray", label="other activations")
        ax.bar(xs, kv, bottom=other, color="tab:orange", label="K/V concatenated with the prefix")
        ax.bar(xs, quad, bottom=[a + b for a, b in zip(other, kv)], color="tab:red", label="[L, P+L] masks / matrices")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylim(0, 1.3 * max(o + k + q for o, k, q in zip(other, kv, quad)))  # room for the legend
        ax.set_ylabel("MiB")
        ax.set_title("Activations saved for backward per training step")
        ax.legend(fontsize=8, loc="upper left")

    ax = axs[1][0]
    ops = results.get("ops") or {}
    if ops:
        labels, peft_v, mine_v, mine_x = [], [], [], []
        for P, d in ops.items():
            for step in ("forward", "train_step", "generate_per_token"):
                labels.append(f"P={P}\n{step.replace('_', ' ')}")
                peft_v.append(d["peft"][step]["compute"])
                mine_v.append(d["ptune-rt"][step]["compute"])
                mine_x.append(d["ptune-rt"][step]["compute_expanded"])
        bar_groups(ax, labels, [(peft_v, "PEFT", "tab:orange"), (mine_v, "ptune-rt (top level)", "tab:blue"),
                                (mine_x, "ptune-rt (torch path expanded)", "tab:purple")],
                   "dispatched compute ops", "Dispatched compute ops per step", fontsize=7)
        ax.set_ylim(0, 1.3 * max(peft_v + mine_v + mine_x))

    ax = axs[1][1]
    a = results.get("analytic")
    if a:
        labels, un, fu = [], [], []
        for r in a["rows"]:
            for pass_ in ("forward", "backward"):
                labels.append(f"batch {r['batch']}\n{pass_}")
                un.append(r[pass_]["unfused"]["bound_s"] * 1e6)
                fu.append(r[pass_]["fused"]["bound_s"] * 1e6)
        sh = a["shape"]
        bar_groups(ax, labels, [(un, "PEFT chain", "tab:orange"), (fu, "fused Triton kernels", "tab:blue")],
                   "roofline time bound per layer, us", f"MODEL: H100 SXM, 7B layer, P={sh['P']}, L={sh['L']}, bf16")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ptune_rt.bench.common import add_common_arguments

    p = argparse.ArgumentParser(
        prog="ptune-rt bench --suite prefix",
        description="Prefix-tuning benchmark + equality report: HF PEFT vs ptune-rt's fused prefix attention on a "
                    "Llama-like model with random weights, side by side in one run.")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per variant and case (median; default {MODES['default']['repeats']}, --full "
                        f"{MODES['full']['repeats']}, --quick {MODES['quick']['repeats']})")
    p.add_argument("--long-train-repeats", type=int, default=None, metavar="N",
                   help="timed runs of the training step at the longest sequence (default: --repeats; --full "
                        f"{MODES['full']['long_train_repeats']})")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per variant before each timing (default 1; the training step also runs the "
                        "saved-bytes step untimed first)")
    p.add_argument("--prefix-lengths", default=None, metavar="P,P",
                   help="comma-separated prefix lengths (default: 32; --full: 32,128; --quick: 4,12)")
    p.add_argument("--seqs", default=None, metavar="L,L",
                   help="comma-separated sequence lengths (default: 256,1024; --quick: 24,40)")
    add_common_arguments(p, max_wait=1500.0, full=FULL_HELP, plan=True)
    return p


def parse(argv) -> argparse.Namespace:
    """The options of ``argv`` with the run mode's settings (:data:`MODES`) filled in; ``.mode`` says which."""
    from ptune_rt.bench.common import resolve_mode

    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODES)
    return args


def main(argv=None, command_argv=None) -> int:
    from ptune_rt.bench.report import write_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from ptune_rt.bench.common import default_out_dir
    from ptune_rt.bench.report import finished_line

    command_argv = list(command_argv) if command_argv is not None else ["--suite", "prefix"] + argv
    out_dir = args.out or default_out_dir()
    if args.dry_run:
        wl = workload(args)
        long_train = args.long_train_repeats if args.long_train_repeats is not None else args.repeats
        print(f"ptune-rt bench --suite prefix, mode {args.mode}: P in {list(wl.prefix_lengths)}, seq in "
              f"{list(wl.seqs)}, {args.repeats} timed rounds per case ({long_train} for the training step at seq "
              f"{max(wl.seqs)}), warm-up {args.warmup}, wait for load {args.wait_for_load}; would write to {out_dir}\n")
        print("\n".join(make_plan(wl, args.repeats, long_train, args.warmup, args.quick).table()))
        return 0
    with warnings.catch_warnings():
        # transformers' own deprecation notice, raised from inside PEFT on every training forward
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        results = run(args, command_argv)
    paths = write_outputs(results, Path(out_dir), file_stem(results), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"ptune-rt bench --suite prefix: {finished_line(results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
