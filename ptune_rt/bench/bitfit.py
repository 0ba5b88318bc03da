"""``ptune-rt bench --suite bitfit``: one BitFit training step against full fine-tuning and against
PEFT-style ``requires_grad`` masking.

Two models from configs with random weights (never from the hub): a BERT-like
``BertForSequenceClassification`` (the BitFit paper's setting: GLUE-style classification, biases and
the classifier head trained) and the Llama-like model of the other suites built with
``attention_bias=True, mlp_bias=True`` (Llama has no biases by default, and BitFit refuses a model
without any). For each, three copies of the same weights train on the same batch:

* ``full``: full fine-tuning, every parameter trainable;
* ``masked``: PEFT-style masking on plain torch modules, ``requires_grad_(False)`` on every
  parameter except the biases (and, for the classifier, its head, as PEFT's ``modules_to_save``);
* ``ptune-rt``: ``ptune_rt.apply(model, ptune_rt.BitFitConfig())``.

A training step is ``zero_grad`` + forward + loss + backward + ``AdamW.step()``, timed round-robin
(interleaved, rotating order) so the three ratios come from one run with paired-bootstrap 95%
intervals. Besides the times the run counts the matrix products (``mm`` / ``addmm`` / ``bmm`` ...)
dispatched during ``loss.backward()`` and how many of them are weight-gradient GEMMs, the dispatched
compute ops of the backward and of the optimizer step, the backward FLOPs, the activation bytes
autograd saves, the gradient and AdamW-state bytes, and checks that the masked model and ptune-rt's
BitFit compute the same loss and the same trainable gradients on the same batch (judged against a
float64 run by the tolerance rule of ``ptune_rt.testing.tolerances``).

Writes ``bitfit_<device>.json`` (all numbers plus provenance), ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

from ptune_rt.bench.report import MIN_ROUNDS_FOR_VERDICT
from ptune_rt.bench.workload import ModelShape

FAMILIES = ("bert", "llama")
VARIANTS = ("full", "masked", "ptune-rt")
LABELS = {"full": "full fine-tuning", "masked": "requires_grad masking (PEFT-style)",
          "ptune-rt": "ptune-rt BitFit"}
#: (baseline, candidate) pairs reported as baseline median time / candidate median time
PAIRS = (("full", "masked"), ("full", "ptune-rt"), ("masked", "ptune-rt"))
#: aten matrix products as they reach the dispatcher (``matmul`` and ``linear`` decompose into these)
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_scaled_mm")
HEAD = {"bert": "classifier", "llama": None}
#: Each run mode's settings where the command line gives none: --quick a smoke test, the default
#: under 5 minutes on 2 CPU cores (about 13 s a round), --full the committed run.
MODE_SETTINGS = {"quick": {"repeats": 7}, "default": {"repeats": 15},
                 "full": {"repeats": 31, "wait_for_load": 0.7, "max_wait": 900.0, "quiet_gate": 0.8,
                          "gate_max_wait": 5.0}}


@dataclasses.dataclass(frozen=True)
class BitFitWorkload(ModelShape):
    """The two models and their batches. The Llama-like model is the other suites' ``ModelShape``
    (with biases); the BERT-like one has its own fields (``bert_*``). Row counts (tokens, and the
    classifier's batch rows) differ from every linear's dimensions, so a backward GEMM's output shape
    tells a weight gradient from an input gradient."""

    batch: int = 4
    seq: int = 96
    bert_hidden: int = 512
    bert_intermediate: int = 2048
    bert_layers: int = 8
    bert_heads: int = 8
    bert_vocab: int = 30522
    bert_labels: int = 3
    bert_batch: int = 8
    bert_seq: int = 128
    lr: float = 1e-5

    @classmethod
    def quick(cls) -> "BitFitWorkload":
        """Tiny shapes for smoke tests: the same two structures, seconds to run."""
        return cls(**cls.QUICK, batch=2, seq=40, bert_hidden=64, bert_intermediate=256, bert_layers=2, bert_heads=4,
                   bert_vocab=512, bert_batch=4, bert_seq=24)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["llama_tokens_per_step"] = self.batch * self.seq
        d["bert_tokens_per_step"] = self.bert_batch * self.bert_seq
        return d


# ----------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    model: object
    optimizer: object
    inputs: dict

    def trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self):
        return self.model(**self.inputs).loss

    def step(self):
        """One training step: zero_grad, forward + loss, backward, AdamW step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def build_base(wl: BitFitWorkload, family: str, device):
    """(model with random weights, inputs, description) of one family; every parameter trainable."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wl.seed)
        if family == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            cfg = BertConfig(hidden_size=wl.bert_hidden, intermediate_size=wl.bert_intermediate,
                             num_hidden_layers=wl.bert_layers, num_attention_heads=wl.bert_heads,
                             vocab_size=wl.bert_vocab, max_position_embeddings=max(512, wl.bert_seq),
                             num_labels=wl.bert_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             classifier_dropout=0.0, pad_token_id=0)
            cfg._attn_implementation = "sdpa"
            model = BertForSequenceClassification(cfg)
            B, L, vocab = wl.bert_batch, wl.bert_seq, wl.bert_vocab
            what = (f"BERT-like `BertForSequenceClassification` (hidden {wl.bert_hidden}, intermediate "
                    f"{wl.bert_intermediate}, {wl.bert_layers} layers, {wl.bert_heads} heads, vocab {wl.bert_vocab}, "
                    f"{wl.bert_labels} labels), batch {B} x seq {L}, cross-entropy over the labels")
        elif family == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(hidden_size=wl.hidden, intermediate_size=wl.intermediate, num_hidden_layers=wl.layers,
                              num_attention_heads=wl.heads, num_key_value_heads=wl.kv_heads, vocab_size=wl.vocab,
                              max_position_embeddings=max(2048, wl.seq), tie_word_embeddings=False,
                              attention_bias=True, mlp_bias=True, use_cache=False)
            cfg._attn_implementation = "sdpa"
            model = LlamaForCausalLM(cfg)
            B, L, vocab = wl.batch, wl.seq, wl.vocab
            what = (f"Llama-like `LlamaForCausalLM` with `attention_bias=True, mlp_bias=True` (hidden {wl.hidden}, "
                    f"intermediate {wl.intermediate}, {wl.layers} layers, {wl.heads} heads / {wl.kv_heads} KV heads, "
                    f"vocab {wl.vocab}, untied LM head without bias), batch {B} x seq {L}, causal-LM loss")
        else:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model = model.to(device=device, dtype=wl.torch_dtype)
    model.requires_grad_(True)
    model.train()  # no dropout anywhere (configs above): train mode changes nothing numerically
    g = torch.Generator().manual_seed(wl.seed + 2)
    ids = torch.randint(3, vocab, (B, L), generator=g).to(device)
    labels = torch.randint(0, wl.bert_labels, (B,), generator=g).to(device) if family == "bert" else ids
    return model, {"input_ids": ids, "labels": labels}, what


def mask_like_peft(model, family: str):
    """PEFT-style masking on plain modules: every bias trainable (and the classifier head, as PEFT's
    ``modules_to_save``), every other parameter ``requires_grad_(False)``."""
    head = HEAD[family]
    for n, p in model.named_parameters():
        p.requires_grad_(n.rpartition(".")[2] == "bias" or (head is not None and n.startswith(head + ".")))
    return model


def build_variants(wl: BitFitWorkload, family: str, device) -> tuple[dict, str]:
    import torch

    import ptune_rt

    base, inputs, what = build_base(wl, family, device)
    models = {"full": copy.deepcopy(base), "masked": mask_like_peft(copy.deepcopy(base), family),
              "ptune-rt": ptune_rt.apply(copy.deepcopy(base), ptune_rt.BitFitConfig())}
    del base
    out = {}
    for name, m in models.items():
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        out[name] = Variant(name, m, torch.optim.AdamW(params, lr=wl.lr), inputs)
    return out, what


def _linear_weights(model) -> dict:
    import torch

    return {f"{mn}.weight": m.weight for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def row_counts(wl: BitFitWorkload, family: str) -> set:
    """Numbers of rows the model's linears see: tokens (and the classifier's batch rows)."""
    if family == "bert":
        return {wl.bert_batch * wl.bert_seq, wl.bert_batch}
    return {wl.batch * wl.seq}


def check_shapes(model, wl: BitFitWorkload, family: str, head_weights: set) -> None:
    """Refuse a workload whose GEMM classification would be ambiguous: a row count equal to a linear's
    dimension, or a trained head weight shaped like a frozen body weight."""
    weights = _linear_weights(model)
    dims = {d for w in weights.values() for d in w.shape}
    clash = row_counts(wl, family) & dims
    if clash:
        raise ValueError(f"bitfit bench: {family} row counts {sorted(clash)} equal a linear's dimension; "
                         "choose another batch or sequence length")
    head = {tuple(w.shape) for n, w in weights.items() if n in head_weights}
    body = {tuple(w.shape) for n, w in weights.items() if n not in head_weights}
    both = {s for s in head for s2 in body if s in (s2, s2[::-1])}
    if both:
        raise ValueError(f"bitfit bench: head weight shapes {sorted(both)} equal a body weight's shape")


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------


def equality(variants: dict) -> dict:
    """The masked model and ptune-rt's BitFit on the same batch: same trained parameters, same loss and
    same gradients of every trainable tensor, both judged against the masked model in float64 (and
    full fine-tuning's gradients of the same tensors beside them). No optimizer step is taken."""
    import torch

    from ptune_rt.testing.tolerances import error_report

    masked, ours, full = variants["masked"], variants["ptune-rt"], variants["full"]
    names_m, names_p = sorted(masked.trainable()), sorted(ours.trainable())
    gold_model = copy.deepcopy(masked.model).double()
    runs = {"masked": masked.model, "ptune-rt": ours.model, "full": full.model, "fp64": gold_model}
    losses, grads = {}, {}
    for key, m in runs.items():
        for p in m.parameters():
            p.grad = None
        loss = m(**masked.inputs).loss
        loss.backward()
        params = dict(m.named_parameters())
        losses[key] = loss.detach().double()
        grads[key] = torch.cat([params[n].grad.detach().double().flatten() for n in names_m])
        for p in m.parameters():
            p.grad = None
    del gold_model
    loss_rule = error_report(losses["ptune-rt"], losses["masked"], losses["fp64"], torch.float32)
    grad_rule = error_report(grads["ptune-rt"], grads["masked"], grads["fp64"], torch.float32)
    full_rule = error_report(grads["full"], grads["masked"], grads["fp64"], torch.float32)
    n_bias = sum(1 for n in names_m if n.rpartition(".")[2] == "bias")
    same_names = names_m == names_p
    ok = bool(same_names and loss_rule["ok"] and grad_rule["ok"])
    return {
        "same_trainable_parameters": same_names,
        # a head's bias counts as a bias; head_tensors are its other trained tensors (classifier.weight)
        "trainable_tensors": len(names_m), "bias_tensors": n_bias, "head_tensors": len(names_m) - n_bias,
        "loss_masked": float(losses["masked"]), "loss_ptune": float(losses["ptune-rt"]),
        "loss_fp64": float(losses["fp64"]),
        "loss_abs_diff_ptune_vs_masked": abs(float(losses["ptune-rt"] - losses["masked"])),
        "loss_ptune_err_to_fp64": loss_rule["err"], "loss_masked_err_to_fp64": loss_rule["ref_err"],
        "loss_bound": loss_rule["bound"], "loss_within_tolerance_rule": bool(loss_rule["ok"]),
        "grad_max_abs_diff_ptune_vs_masked": float((grads["ptune-rt"] - grads["masked"]).abs().max()),
        "grad_max_abs": float(grads["masked"].abs().max()),
        "grad_ptune_err_to_fp64": grad_rule["err"], "grad_masked_err_to_fp64": grad_rule["ref_err"],
        "grad_bound": grad_rule["bound"], "grads_within_tolerance_rule": bool(grad_rule["ok"]),
        "full_ft_same_tensors_grad_err_to_fp64": full_rule["err"],
        "full_ft_same_tensors_within_tolerance_rule": bool(full_rule["ok"]),
        "passed": ok,
        "rule": "max|out - fp64| <= 2 * max|masked - fp64| + 1e-5 * max(1, max|fp64|) (float32 tolerance)",
    }


class _BackwardGemms:
    """Records every matrix product dispatched while it is active: the op, its output shape, and
    whether that shape is a linear weight's (a weight-gradient GEMM), split into the weights BitFit
    freezes (the body) and the trained head."""

    def __init__(self, model, head_weights: set):
        from torch.utils._python_dispatch import TorchDispatchMode

        weights = _linear_weights(model)
        body = {tuple(w.shape) for n, w in weights.items() if n not in head_weights}
        head = {tuple(w.shape) for n, w in weights.items() if n in head_weights}
        self.body = body | {s[::-1] for s in body}
        self.head = head | {s[::-1] for s in head}
        self.records: list = []
        rec = self.records

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if name.rstrip("_") in MATMUL_OPS:
                    rec.append((name, tuple(out.shape) if hasattr(out, "shape") else ()))
                return out

        self.mode = Mode()

    def result(self) -> dict:
        by_op: dict = {}
        shapes: dict = {}
        body = head = 0
        for name, shape in self.records:
            by_op[name] = by_op.get(name, 0) + 1
            key = f"{name} -> {'x'.join(map(str, shape))}"
            shapes[key] = shapes.get(key, 0) + 1
            if len(shape) == 2 and shape in self.body:
                body += 1
            elif len(shape) == 2 and shape in self.head:
                head += 1
        return {"gemms": len(self.records), "by_op": dict(sorted(by_op.items())),
                "weight_grad_gemms": body + head, "weight_grad_gemms_frozen_under_bitfit": body,
                "weight_grad_gemms_head": head, "input_grad_and_other_gemms": len(self.records) - body - head,
                "by_output_shape": dict(sorted(shapes.items(), key=lambda kv: -kv[1]))}


def op_counts(v: Variant, head_weights: set) -> dict:
    """Matrix products, compute ops and FLOPs of one step's backward, and compute ops of its optimizer
    step (the forward runs outside the counters)."""
    from ptune_rt.bench.flops import count_flops
    from ptune_rt.bench.opcount import OpCounter

    v.optimizer.zero_grad(set_to_none=True)
    loss = v.loss()
    gemms = _BackwardGemms(v.model, head_weights)
    ops = OpCounter(None)

    def backward():
        with ops, gemms.mode:
            loss.backward()

    flops = count_flops(backward)
    out = gemms.result()
    r = ops.result(1)
    out["backward_compute_ops"] = r["compute"]
    out["backward_all_ops"] = r["all"]
    out["backward_gflop"] = flops["flop_counter_mode"] / 1e9
    out["backward_flop_by_op"] = flops["by_op"]
    opt_ops = OpCounter(None)
    with opt_ops:
        v.optimizer.step()
    r = opt_ops.result(1)
    out["optimizer_step_compute_ops"] = r["compute"]
    out["optimizer_step_all_ops"] = r["all"]
    v.optimizer.zero_grad(set_to_none=True)
    return out


def memory(v: Variant, device) -> dict:
    """Activation bytes autograd saves in one forward + backward, and the bytes of the gradients and
    AdamW's two moment buffers of the trainable parameters; on CUDA also the peak allocated memory of
    a whole training step."""
    import torch

    from ptune_rt.bench.memory import saved_for_backward

    v.optimizer.zero_grad(set_to_none=True)
    saved = saved_for_backward(v.model, lambda: v.loss().backward())
    v.optimizer.zero_grad(set_to_none=True)
    trainable = list(v.trainable().values())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    out = {"activation_bytes": saved["activation_bytes"],
           "activation_bytes_by_module_type": saved["activation_bytes_by_module_type"],
           "saved_tensor_count": saved["saved_tensor_count"],
           "parameter_bytes_saved_by_reference": saved["parameter_bytes_by_reference"],
           "gradient_bytes": grad_bytes, "adamw_state_bytes": 2 * grad_bytes,
           "parameter_bytes": sum(p.numel() * p.element_size() for p in v.model.parameters())}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        v.step()
        torch.cuda.synchronize(dev)
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["cuda_peak_above_start_bytes"] = torch.cuda.max_memory_allocated(dev) - before
    return out


def median_ci(xs: list, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list:
    """Bootstrap interval of the median of ``xs`` (deterministic for a given ``seed``)."""
    rng = random.Random(seed)
    n = len(xs)
    meds = sorted(statistics.median(xs[rng.randrange(n)] for _ in range(n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return [meds[int(tail * (resamples - 1))], meds[int(round((1.0 - tail) * (resamples - 1)))]]


def verdict(ratio: float, ci, rounds: int) -> str:
    """faster / slower (baseline / candidate against 1.0) by the rule every suite uses
    (:func:`ptune_rt.bench.report.verdict`): only when the whole 95% interval is on one side and at
    least ``MIN_ROUNDS_FOR_VERDICT`` paired rounds stand behind it, else inconclusive (noise)."""
    from ptune_rt.bench.report import verdict as judge

    return judge(ratio, 1.0, True, ci, rounds, labels=("faster", "slower"))


def pair(times: dict, cpu: dict, base: str, cand: str) -> dict:
    """baseline median / candidate median (above 1: the candidate's step is faster) with its paired
    bootstrap 95% interval over the interleaved rounds, and second opinions."""
    from ptune_rt.bench.timing import bootstrap_ratio_ci

    b, c = times[base], times[cand]
    ratio = statistics.median(b) / statistics.median(c)
    ci = list(bootstrap_ratio_ci(b, c)) if len(b) > 1 else None
    paired = [x / y for x, y in zip(b, c)]
    out = {"baseline": base, "candidate": cand, "ratio": ratio, "ci95": ci, "verdict": verdict(ratio, ci, len(b)),
           "ratio_paired_median": statistics.median(paired), "ratio_of_minima": min(b) / min(c)}
    if cpu.get(base) and cpu.get(cand):
        out["ratio_cpu_time"] = statistics.median(cpu[base]) / statistics.median(cpu[cand])
    return out


def speed(variants: dict, repeats: int, warmup: int, device, tick, gate=None, block: int = 1,
          lr: float = 0.0) -> dict:
    import torch

    from ptune_rt.bench.timing import interleaved

    fns = {n: v.step for n, v in variants.items()}
    cpu: dict = {}
    times = interleaved(fns, repeats, warmup, torch.device(device), tick=tick, cpu_times=cpu, gate=gate, block=block)
    res = {"variants": {}, "ratios": {}}
    for n, ts in times.items():
        d = {"median_s": statistics.median(ts), "median_ci95_s": median_ci(ts) if len(ts) > 1 else None,
             "min_s": min(ts), "max_s": max(ts), "runs_s": ts}
        if cpu.get(n):
            d["cpu_median_s"] = statistics.median(cpu[n])
            d["cpu_runs_s"] = cpu[n]
        res["variants"][n] = d
    for b, c in PAIRS:
        res["ratios"][f"{b}/{c}"] = pair(times, cpu, b, c)
    with torch.no_grad():  # every timed step trained its copy: finite losses show nothing diverged
        res["loss_after_timing"] = {n: float(v.loss()) for n, v in variants.items()}
    res["what"] = ("one training step: optimizer.zero_grad(set_to_none=True), forward + loss, backward, "
                   f"AdamW(lr={lr:g}).step(); seconds per step, medians of interleaved rounds" + (
                       f" (steady state: per round {block} steps in a row, the first untimed, the mean of the rest)"
                       if block > 1 else ""))
    return res


def bench_family(wl: BitFitWorkload, family: str, device, args, progress, gate) -> dict:
    import torch

    progress.set_description_str(f"{family}: building")
    variants, what = build_variants(wl, family, device)
    ours = variants["ptune-rt"]
    head_weights = {n for n, p in ours.trainable().items() if n.rpartition(".")[2] != "bias"}
    check_shapes(ours.model, wl, family, head_weights)
    res: dict = {"model": what, "variants": {}}
    for n, v in variants.items():
        tr = v.trainable()
        res["variants"][n] = {"label": LABELS[n], "trainable_parameters": sum(p.numel() for p in tr.values()),
                              "trainable_tensors": len(tr),
                              "total_parameters": sum(p.numel() for p in v.model.parameters())}
    res["head_weights_trained_by_bitfit"] = sorted(head_weights)
    progress.update(1)
    progress.set_description_str(f"{family}: equality")
    res["equality"] = equality(variants)
    progress.update(1)
    progress.set_description_str(f"{family}: op counts")
    # op counts before timing: each runs one optimizer step, like a timed one
    res["ops"] = {n: op_counts(v, head_weights) for n, v in variants.items()}
    progress.update(1)
    progress.set_description_str(f"{family}: memory")
    res["memory"] = {n: memory(v, device) for n, v in variants.items()}
    progress.update(1)
    progress.set_description_str(f"{family}: timing")
    res["speed"] = speed(variants, args.repeats, args.warmup, device, lambda: progress.update(1), gate,
                         args.train_block, wl.lr)
    res["optimizer"] = {"class": "torch.optim.AdamW", "lr": wl.lr,
                        "implementation": "torch's default (foreach / fused left unset: a loop over the tensors on "
                                          "CPU, foreach on CUDA)",
                        "param_groups": {n: len(v.optimizer.param_groups[0]["params"]) for n, v in variants.items()}}
    del variants
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def file_stem(results: dict) -> str:
    from ptune_rt.bench.report import suite_stem

    return suite_stem(results, "bitfit")


def _ms(s) -> str:
    return f"{s * 1e3:.1f}"


def _ratio_cell(r: dict) -> str:
    ci = r.get("ci95")
    return f"{r['ratio']:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})" if ci else f"{r['ratio']:.2f}x"


def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


FAMILY_TITLES = {"bert": "BERT-like classifier", "llama": "Llama-like causal LM with biases"}


def markdown(results: dict) -> str:
    from ptune_rt.bench.report import commit_label, load_label, peak_load

    pv, wl = results["provenance"], results["workload"]
    v = pv["versions"]
    out = [f"# ptune-rt BitFit benchmark: training step vs full fine-tuning and requires_grad masking "
           f"({pv['device']}, {wl['dtype']})", "",
           f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['device']}, {pv['torch_threads']} threads, "
           f"{load_label(pv)}); torch {v['torch']}, transformers {v['transformers']}; commit {commit_label(pv)}; mode "
           f"{results['mode']}, {results['repeats']} interleaved rounds per model after {results['warmup']} warm-up; "
           f"command `{pv['command']}`.", "",
           "Variants, three copies of the same random weights on the same batch: *full fine-tuning* (every parameter "
           "trainable); *requires_grad masking (PEFT-style)*: plain torch modules, `requires_grad_(False)` on every "
           "parameter but the biases (and the classifier head, PEFT's `modules_to_save`); *ptune-rt BitFit*: "
           "`ptune_rt.apply(model, ptune_rt.BitFitConfig())` (every bias, and a classification model's head). "
           f"A step is `zero_grad` + forward + loss + backward + `AdamW(lr={wl['lr']:g}).step()` (torch's default "
           "implementation: a loop over the tensors on CPU), no dropout.", ""]
    cpus = pv.get("cpu_count") or 1
    top = peak_load(pv)
    if pv["device"].startswith("cpu") and top > 0.5 * cpus:
        out += [f"> Note: the 1-minute load average reached {top:.1f} on {cpus} CPUs during this run: other "
                "processes competed for the cores, so the timings are noisy (interleaved rounds and medians, but "
                "treat small ratios with care).", ""]
    qg = pv.get("quiet_gate")
    if qg:
        out += [f"Quiet gate: before each of the {qg['rounds']} timed rounds the run waited (up to "
                f"{qg['max_wait_s']:g} s) for the CPUs to be at least {qg['min_idle']:.0%} idle over one second; "
                f"{qg['rounds_quiet']} rounds started quiet, {qg['total_wait_s']:.0f} s spent waiting.", ""]
    out += ["## Summary", "",
            "| Model | Variant | trainable params | step, median ms (95% CI) | speed vs full FT (95% CI) | verdict | "
            "speed vs masking (95% CI) | verdict | backward GEMMs | of which weight-gradient (frozen body / head) | "
            "activations saved, MiB | grads + AdamW state, MiB |",
            "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    fams = results.get("models", {})
    for fam, d in fams.items():
        sp = d["speed"]
        for n in VARIANTS:
            var = sp["variants"][n]
            ci = var.get("median_ci95_s")
            step = f"{_ms(var['median_s'])} ({_ms(ci[0])}-{_ms(ci[1])})" if ci else _ms(var["median_s"])
            vs_full = sp["ratios"].get(f"full/{n}")
            vs_mask = sp["ratios"].get(f"masked/{n}")
            ops, mem = d["ops"][n], d["memory"][n]
            out.append(
                f"| {FAMILY_TITLES[fam]} | {LABELS[n]} | {d['variants'][n]['trainable_parameters']:,} | {step} | "
                f"{_ratio_cell(vs_full) if vs_full else '(baseline)'} | {vs_full['verdict'] if vs_full else ''} | "
                f"{_ratio_cell(vs_mask) if vs_mask else ('(baseline)' if n == 'masked' else '–')} | "
                f"{vs_mask['verdict'] if vs_mask else ''} | {ops['gemms']} | "
                f"{ops['weight_grad_gemms']} ({ops['weight_grad_gemms_frozen_under_bitfit']} / "
                f"{ops['weight_grad_gemms_head']}) | {_mib(mem['activation_bytes'])} | "
                f"{_mib(mem['gradient_bytes'] + mem['adamw_state_bytes'])} |")
    out += ["",
            "*speed vs X* = X's median step time / this variant's (above 1: this variant's step is faster), with "
            "the 95% paired-bootstrap interval over the interleaved rounds; the verdict says *faster* or *slower* "
            f"only when the whole interval lies on one side of 1.0 (and at least {MIN_ROUNDS_FOR_VERDICT} rounds "
            "were run), *inconclusive* otherwise. *Backward GEMMs*: "
            "matrix products (`mm` / `addmm` / `bmm` ...) dispatched during `loss.backward()` "
            "(`TorchDispatchMode`); a *weight-gradient* GEMM is one whose output has a linear weight's shape (the "
            "batch's row counts differ from every weight dimension, so input-gradient GEMMs never do), split into "
            "the weights BitFit freezes and the trained classifier head. *Activations*: unique storages autograd "
            "saves for backward in one step (`saved_tensors_hooks`, parameters excluded). *Grads + AdamW state*: "
            "gradient, `exp_avg` and `exp_avg_sq` of every trainable parameter.", ""]
    for fam, d in fams.items():
        out += [f"## {FAMILY_TITLES[fam]}", "", d["model"] + ".", ""]
        sp = d["speed"]
        out += ["| Ratio (baseline / candidate median time) | ratio | 95% interval | verdict | paired median | "
                "fastest runs | CPU time |", "|---|---:|---:|---|---:|---:|---:|"]
        for key, r in sp["ratios"].items():
            ci = r.get("ci95")
            cpu = r.get("ratio_cpu_time")
            out.append(f"| {LABELS[r['baseline']]} / {LABELS[r['candidate']]} | **{r['ratio']:.3f}x** | "
                       f"{f'{ci[0]:.3f}x - {ci[1]:.3f}x' if ci else '–'} | {r['verdict']} | "
                       f"{r['ratio_paired_median']:.3f}x | {r['ratio_of_minima']:.3f}x | "
                       f"{f'{cpu:.3f}x' if cpu else '–'} |")
        out += ["", "| Variant | trainable params (tensors) | backward GEMMs by op | backward compute ops | "
                "backward GFLOP | optimizer-step compute ops | saved tensors | parameters MiB |",
                "|---|---:|---|---:|---:|---:|---:|---:|"]
        for n in VARIANTS:
            ops, mem, var = d["ops"][n], d["memory"][n], d["variants"][n]
            by_op = ", ".join(f"{k} {c}" for k, c in ops["by_op"].items()) or "none"
            out.append(f"| {LABELS[n]} | {var['trainable_parameters']:,} ({var['trainable_tensors']}) | {by_op} | "
                       f"{ops['backward_compute_ops']} | {ops['backward_gflop']:.2f} | "
                       f"{ops['optimizer_step_compute_ops']} | {mem['saved_tensor_count']} | "
                       f"{_mib(mem['parameter_bytes'])} |")
        if any("cuda_peak_allocated_bytes" in d["memory"][n] for n in VARIANTS):
            out += ["", "CUDA peak allocated during one step (MiB): " + ", ".join(
                f"{LABELS[n]} {_mib(d['memory'][n]['cuda_peak_allocated_bytes'])}" for n in VARIANTS) + "."]
        eq = d["equality"]
        out += ["", f"Equality (masking vs ptune-rt BitFit, one forward + backward on the same batch, judged against "
                f"the masked model in float64): same trainable parameters: {eq['same_trainable_parameters']} "
                f"({eq['bias_tensors']} biases, {eq['head_tensors']} other head tensors); loss "
                f"{eq['loss_masked']:.6f} vs {eq['loss_ptune']:.6f} (|diff| {eq['loss_abs_diff_ptune_vs_masked']:.2e}, "
                f"within the rule: {eq['loss_within_tolerance_rule']}); gradients max |diff| "
                f"{eq['grad_max_abs_diff_ptune_vs_masked']:.2e} of max |g| {eq['grad_max_abs']:.2e}, ptune-rt error to "
                f"float64 {eq['grad_ptune_err_to_fp64']:.2e} against the bound {eq['grad_bound']:.2e} (within the "
                f"rule: {eq['grads_within_tolerance_rule']}). Full fine-tuning's gradients of the same tensors: "
                f"within the rule: {eq['full_ft_same_tensors_within_tolerance_rule']}. **Equality check "
                f"{'passed' if eq['passed'] else 'FAILED'}.**", ""]
        out += ["| Variant | median ms | min ms | max ms | runs (ms) |", "|---|---:|---:|---:|---|"]
        for n in VARIANTS:
            var = sp["variants"][n]
            out.append(f"| {LABELS[n]} | {_ms(var['median_s'])} | {_ms(var['min_s'])} | {_ms(var['max_s'])} | "
                       f"{', '.join(_ms(t) for t in var['runs_s'])} |")
        out.append("")
    out += ["## What the masking does", "",
            "Autograd computes a matrix product's gradient with respect to an operand only when that operand "
            "requires grad, so a linear whose weight is frozen runs only the input-gradient GEMM (`dX = dY W`) and "
            "the bias gradient (a column sum of `dY`) in backward, whichever way the weight was frozen. ptune-rt's "
            "BitFit is this masking, chosen by name, recorded for `ptune_rt.restore` and for its checkpoints: the "
            "two run the same autograd graph, so their GEMM counts are equal and their step times differ only by "
            "noise. What BitFit saves over full fine-tuning is the weight-gradient GEMMs, the embedding gradient, "
            "the activations kept only for weight gradients, and the optimizer's work and state over the weights.",
            ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptune_rt.bench.report import bar_groups

    fams = results.get("models", {})
    fig = Figure(figsize=(15, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    pv = results["provenance"]
    fig.suptitle(f"BitFit training step: full fine-tuning vs requires_grad masking vs ptune-rt BitFit "
                 f"({pv['device']}, {results['workload']['dtype']}, {results['mode']})")
    colors = {"full": "tab:gray", "masked": "tab:orange", "ptune-rt": "tab:blue"}
    labels = [FAMILY_TITLES[f].replace(" ", "\n", 1) for f in fams]
    xs = list(range(len(fams)))
    width = 0.8 / len(VARIANTS)
    for k, n in enumerate(VARIANTS):
        meds, lo, hi = [], [], []
        for d in fams.values():
            var = d["speed"]["variants"][n]
            m = var["median_s"] * 1e3
            ci = var.get("median_ci95_s") or [var["median_s"]] * 2
            meds.append(m)
            lo.append(max(0.0, m - ci[0] * 1e3))
            hi.append(max(0.0, ci[1] * 1e3 - m))
        offset = (k - (len(VARIANTS) - 1) / 2) * width
        ax1.bar([x + offset for x in xs], meds, width=width, yerr=[lo, hi], capsize=3, label=LABELS[n],
                color=colors[n])
    ax1.set_xticks(xs)
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("ms per training step (median, 95% CI)")
    ax1.set_title("Training step time")
    tops = [d["speed"]["variants"][n].get("median_ci95_s") or [0.0, d["speed"]["variants"][n]["median_s"]]
            for d in fams.values() for n in VARIANTS]
    ax1.set_ylim(0, 1.45 * max([t[1] * 1e3 for t in tops] or [1.0]))  # room for the legend above the bars
    ax1.legend(fontsize=8, loc="upper right")
    wg = [[d["ops"][n]["weight_grad_gemms"] for d in fams.values()] for n in VARIANTS]
    other = [[d["ops"][n]["gemms"] - d["ops"][n]["weight_grad_gemms"] for d in fams.values()] for n in VARIANTS]
    for k, n in enumerate(VARIANTS):
        offset = (k - (len(VARIANTS) - 1) / 2) * width
        ax2.bar([x + offset for x in xs], other[k], width=width, color=colors[n], label=LABELS[n])
        ax2.bar([x + offset for x in xs], wg[k], width=width, bottom=other[k], color=colors[n], hatch="//",
                edgecolor="black", label="weight-gradient GEMMs" if k == 0 else None)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_ylabel("matrix products in loss.backward()")
    ax2.set_title("Backward GEMMs (hatched: weight gradients)")
    ax2.set_ylim(0, 1.35 * max([a + b for ra, rb in zip(wg, other) for a, b in zip(ra, rb)] or [1]))
    ax2.legend(fontsize=8)
    series = []
    for n in VARIANTS:
        series.append(([(d["memory"][n]["activation_bytes"] + d["memory"][n]["gradient_bytes"]
                         + d["memory"][n]["adamw_state_bytes"]) / 2**20 for d in fams.values()], LABELS[n], colors[n]))
    bar_groups(ax3, labels, series, "MiB", "Activations saved + gradients + AdamW state")
    ax3.set_ylim(0, 1.35 * max([v for vals, _, _ in series for v in vals] or [1]))
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ptune_rt.bench.common import add_common_arguments

    p = argparse.ArgumentParser(
        prog="ptune-rt bench --suite bitfit",
        description="BitFit training step (forward + backward + AdamW) vs full fine-tuning vs PEFT-style "
                    "requires_grad masking, on a BERT-like classifier and a Llama-like model with biases (random "
                    "weights), side by side in one run: step times with intervals, backward GEMM counts, memory, "
                    "equality of the masked model and ptune-rt's BitFit.")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per model, each variant once per round (median; default "
                        f"{MODE_SETTINGS['default']['repeats']}, --quick {MODE_SETTINGS['quick']['repeats']}, --full "
                        f"{MODE_SETTINGS['full']['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing (default 1)")
    p.add_argument("--models", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--quiet-gate", type=float, default=None, metavar="IDLE",
                   help="CPU runs: before every timed round wait (up to --gate-max-wait s) until the CPUs were at "
                        "least this fraction idle over one second, e.g. 0.9 (Linux; default: off)")
    p.add_argument("--gate-max-wait", type=float, default=60.0, help="longest wait per round for --quiet-gate (s)")
    p.add_argument("--train-block", type=int, default=1, metavar="N",
                   help="per round run each variant N steps in a row and time the mean of the last N-1 (steady "
                        "state; default 1)")
    add_common_arguments(p, max_wait=1200.0, full="the committed run: 31 rounds, waiting for a quiet machine "
                         "(about 7 minutes on 2 quiet CPU cores)")
    return p


def run(args, command_argv) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ptune_rt.bench.common import provenance, wait_for_quiet
    from ptune_rt.bench.workload import default_device

    families = [f.strip() for f in args.models.split(",") if f.strip()]
    if not families or set(families) - set(FAMILIES):
        raise SystemExit(f"ptune-rt bench --suite bitfit: --models must name some of {FAMILIES}, got {args.models!r}")
    mode = args.mode
    if args.repeats < 2:
        raise SystemExit("ptune-rt bench --suite bitfit: --repeats must be >= 2 (an interval needs paired rounds)")
    if args.warmup < 0 or args.train_block < 1:
        raise SystemExit("ptune-rt bench --suite bitfit: --warmup must be >= 0 and --train-block >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = BitFitWorkload.quick() if args.quick else BitFitWorkload.default()
    waited = None
    if args.wait_for_load is not None and device.type == "cpu" and hasattr(os, "getloadavg"):
        waited = wait_for_quiet(args.wait_for_load, args.max_wait)
    results: dict = {"schema": "ptune-rt-bench-bitfit/1", "provenance": provenance(device, command_argv),
                     "workload": wl.to_dict(), "mode": mode, "repeats": args.repeats, "warmup": args.warmup,
                     "train_block": args.train_block, "variants": dict(LABELS)}
    if waited is not None:
        results["provenance"]["wait_for_load"] = waited
        results["provenance"]["load_average_at_start"] = list(os.getloadavg())
    gate = None
    if args.quiet_gate is not None and device.type == "cpu":
        from ptune_rt.bench.timing import QuietGate

        gate = QuietGate(args.quiet_gate, args.gate_max_wait)
    t0 = time.perf_counter()
    progress = tqdm(total=len(families) * (4 + len(VARIANTS) * args.repeats), disable=args.no_progress, unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    results["models"] = {}
    section_s = results["section_wall_s"] = {}
    try:
        for fam in families:
            ts = time.perf_counter()
            results["models"][fam] = bench_family(wl, fam, device, args, progress, gate)
            section_s[fam] = time.perf_counter() - ts
    finally:
        progress.close()
    results["provenance"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if gate is not None:
        results["provenance"]["quiet_gate"] = gate.summary()
    results["provenance"]["wall_time_s"] = time.perf_counter() - t0
    results["equality_passed"] = all(d["equality"]["passed"] for d in results["models"].values())
    results["verdicts"] = [{"model": fam, "baseline": r["baseline"], "candidate": r["candidate"], "ratio": r["ratio"],
                            "ci95": r["ci95"], "verdict": r["verdict"]}
                           for fam, d in results["models"].items() for r in d["speed"]["ratios"].values()]
    return results


def main(argv=None, command_argv=None) -> int:
    from ptune_rt.bench.report import write_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from ptune_rt.bench.common import default_out_dir, resolve_mode

    resolve_mode(args, parser, argv, MODE_SETTINGS)

    command_argv = list(command_argv) if command_argv is not None else ["--suite", "bitfit"] + argv
    out_dir = args.out or default_out_dir()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        results = run(args, command_argv)
    paths = write_outputs(results, Path(out_dir), file_stem(results), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
