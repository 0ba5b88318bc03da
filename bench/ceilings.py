"""Ceilings: how fast could any adapter implementation be, next to PEFT?

A LoRA or prefix training step back-propagates through every layer of the frozen model. The
zero-cost stand-in is the same frozen model, with the gradient flowing to its input embeddings
(``inputs_embeds.requires_grad_()``): the backward a free adapter would still need. For the LoRA
no-grad forward and greedy generate it is the frozen model itself. PEFT's time over the stand-in's
is the ceiling, the best speed ratio over PEFT an implementation whose adapter cost nothing could
reach. The LoRA cases also time the hand-written eager swap (each LoRA layer replaced by
``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s`` on PEFT's own tensors): what a minimal
module without PEFT's bookkeeping gets on this machine. Measured side by side (interleaved rounds,
medians, 95% paired-bootstrap intervals) on the benchmark models; writes JSON and a markdown table.

    python bench/ceilings.py                   # every case: LoRA train / forward / generate, prefix P = 32, 128
    python bench/ceilings.py --cases lora,lora-inference --rounds 15
    python bench/ceilings.py --cases prefix --prefix-seq 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ptune_rt.bench.timing import bootstrap_ratio_ci


def _time(fns: dict, rounds: int) -> dict:
    for f in fns.values():  # one untimed step each
        f()
    runs: dict = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            runs[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in runs.items()}
    ratios = {n: med["peft"] / med[n] for n in names if n != "peft"}  # base: the ceiling
    ci95 = {n: bootstrap_ratio_ci(runs["peft"], runs[n]) for n in ratios}
    return {"median_s": med, "runs_s": runs, "ratio_peft_over": ratios, "ratio_peft_over_ci95": ci95}


def _base_step(base, ids):
    emb = base.get_input_embeddings()

    def step():
        base.train()
        e = emb(ids).detach().requires_grad_()
        base(inputs_embeds=e, labels=ids).loss.backward()
    return step


def _adapter_step(model, ids):
    from ptune_rt.bench import workload as W

    def step():
        model.train()
        W.train_step(model, ids)
        W.zero_grads(model)
    return step


class EagerLoRA(torch.nn.Module):
    """The hand-written eager swap: ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s``, nothing else
    (no dropout, no adapter bookkeeping). Holds the very tensors of the PEFT layer it stands for."""

    def __init__(self, peft_layer):
        super().__init__()
        base = peft_layer.get_base_layer()
        self.weight, self.bias = base.weight, base.bias
        self.lora_a = peft_layer.lora_A["default"].weight
        self.lora_b = peft_layer.lora_B["default"].weight
        self.scale = float(peft_layer.scaling["default"])

    def forward(self, x):
        F = torch.nn.functional
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def eager_swap(peft_model):
    """A copy of the PEFT model's base with every LoRA layer replaced by :class:`EagerLoRA`, sharing
    the PEFT model's weights (its adapters' gradients land in the PEFT parameters' ``.grad``)."""
    import copy

    from ptune_rt.bench.workload import is_lora_module

    inner = peft_model.get_base_model()
    layers = {n: m for n, m in inner.named_modules() if is_lora_module(m)}
    if not layers:
        raise ValueError("peft_model has no LoRA layers to swap")
    memo = {id(p): p for p in inner.parameters()}  # share every tensor, copy only the module tree
    model = copy.deepcopy(inner, memo)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, EagerLoRA(layer))
    return model


def _lora_setup(quick: bool):
    """The LoRA benchmark setup plus the eager swap, checked to give PEFT's logits."""
    from ptune_rt.bench import workload as W

    wl = W.Workload.quick() if quick else W.Workload()
    s = W.build(wl, dropout=0.0, device="cpu")
    eager = eager_swap(s.peft)
    ids = s.input_ids[:1, :32]
    want, got = W.forward_logits(s.peft, ids), W.forward_logits(eager, ids)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the eager swap's logits differ from PEFT's (max |diff| {(got - want).abs().max():.3e})")
    return wl, s, eager


def lora_case(rounds: int, setup) -> dict:
    """The training step; ``setup``: :func:`_lora_setup`'s (workload, models, eager swap)."""
    wl, s, eager = setup
    fns = {"peft": _adapter_step(s.peft, s.input_ids), "ptune-rt": _adapter_step(s.ptune, s.input_ids),
           "eager swap": _adapter_step(eager, s.input_ids), "base": _base_step(s.base, s.input_ids)}
    return {"case": f"LoRA r={wl.r}, all seven projections, dropout 0, batch {wl.batch} x seq {wl.seq}",
            **_time(fns, rounds)}


def lora_inference_cases(rounds: int, setup) -> list:
    """The LoRA no-grad forward and greedy generate of ``ptune-rt bench``; the zero-cost stand-in is the
    frozen model itself (inference needs no backward)."""
    from ptune_rt.bench import workload as W

    wl, s, eager = setup
    models = {"peft": s.peft, "ptune-rt": s.ptune, "eager swap": eager, "base": s.base}
    for m in models.values():
        m.eval()
    fwd = {n: (lambda m=m: W.forward_logits(m, s.input_ids)) for n, m in models.items()}
    gen = {n: (lambda m=m: W.generate(m, s.prompt_ids, wl.gen_new_tokens)) for n, m in models.items()}
    return [{"case": f"LoRA no-grad forward, batch {wl.batch} x seq {wl.seq}", **_time(fwd, rounds)},
            {"case": f"LoRA greedy generate, batch {wl.gen_batch}, {wl.gen_prompt}-token prompt, "
                     f"{wl.gen_new_tokens} new tokens", **_time(gen, rounds)}]


def prefix_case(P: int, seq: int, rounds: int, quick: bool = False) -> dict:
    from ptune_rt.bench import workload as W
    from ptune_rt.bench.prefix import PrefixWorkload, build, make_inputs

    wl = dataclasses.replace(PrefixWorkload.quick() if quick else PrefixWorkload.default(), seqs=(seq,))
    base = W.build_base(wl.model_workload(), "cpu")
    s = build(wl, P, base)
    ids = make_inputs(wl, "cpu")[0][seq]
    fns = {"peft": _adapter_step(s.peft, ids), "ptune-rt": _adapter_step(s.ptune, ids), "base": _base_step(base, ids)}
    return {"case": f"prefix tuning P={P}, batch {wl.batch} x seq {seq}", **_time(fns, rounds)}


CASES = ("lora", "lora-inference", "prefix")


def _cell(c: dict, n: str) -> str:
    from ptune_rt.bench.report import ci_cell

    if n not in c["ratio_peft_over"]:
        return "–"
    return f"{c['ratio_peft_over'][n]:.3f}x ({ci_cell(c['ratio_peft_over_ci95'], n, 3)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default all)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (default 9)")
    p.add_argument("--prefix-seq", type=int, default=256, help="sequence length of the prefix cases (default 256)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="the benchmarks' tiny shapes (a smoke run, seconds)")
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown or not chosen:
        p.error(f"--cases: unknown case(s) {unknown or chosen}; expected a comma-separated subset of "
                f"{', '.join(CASES)}")
    if args.rounds < 2:
        p.error(f"--rounds must be at least 2 (paired intervals), got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ptune_rt.bench.report import _ms, commit_label, load_label
    from ptune_rt.bench.common import provenance

    pv = provenance("cpu", [])
    pv["command"] = "python bench/ceilings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cases, lora_setup = [], None
    for name in chosen:
        print(f"[ceilings] {name} ...", flush=True)
        if name.startswith("lora") and lora_setup is None:
            lora_setup = _lora_setup(args.quick)  # one set of models for both LoRA cases
        if name == "lora":
            cases.append(lora_case(args.rounds, lora_setup))
        elif name == "lora-inference":
            cases += lora_inference_cases(args.rounds, lora_setup)
        else:
            cases += [prefix_case(P, args.prefix_seq, args.rounds, args.quick) for P in (32, 128)]
    pv["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "provenance": pv, "rounds": args.rounds,
               "quick": args.quick, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "ceilings_cpu"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = ["# Ceilings (CPU, fp32)", "", results["what"], "",
             f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['torch_threads']} threads, {load_label(pv)}); "
             f"torch {pv['versions']['torch']}, transformers {pv['versions']['transformers']}, peft "
             f"{pv['versions']['peft']}; commit {commit_label(pv)}; command `{pv['command']}`.", "",
             f"{args.rounds} interleaved rounds, medians; speed ratios are PEFT's median time over the variant's, "
             "with 95% paired-bootstrap intervals.", "",
             "| Case | PEFT ms | ptune-rt ms | eager swap ms | zero-cost stand-in ms | ptune-rt vs PEFT | "
             "eager swap vs PEFT | ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        ms = {n: _ms(c["median_s"].get(n)) for n in ("peft", "ptune-rt", "eager swap", "base")}
        lines.append(f"| {c['case']} | {ms['peft']} | {ms['ptune-rt']} | {ms['eager swap']} | {ms['base']} | "
                     f"{_cell(c, 'ptune-rt')} | {_cell(c, 'eager swap')} | {_cell(c, 'base')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
