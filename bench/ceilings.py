"""Training-step ceilings: how fast could any adapter implementation be, next to PEFT?

A LoRA or prefix training step back-propagates through every layer of the frozen model. The
zero-cost stand-in is the same frozen model, with the gradient flowing to its input embeddings
(``inputs_embeds.requires_grad_()``): the backward a free adapter would still need. PEFT's
step time over that one is the ceiling, the best speed ratio over PEFT an implementation whose
adapter cost nothing could reach. Measured side by side (interleaved rounds, medians) with PEFT
and ptune-rt on the benchmark models; writes JSON and a markdown table.

    python bench/ceilings.py                   # LoRA (dropout 0) and prefix (P = 32, 128) at seq 256
    python bench/ceilings.py --rounds 15 --prefix-seq 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch


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
    return {"median_s": med, "runs_s": runs, "ratio_peft_over_ptune": med["peft"] / med["ptune-rt"],
            "ceiling_peft_over_base": med["peft"] / med["base"]}


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


def lora_case(rounds: int) -> dict:
    from ptune_rt.bench.workload import Workload, build

    s = build(Workload(), dropout=0.0, device="cpu")
    fns = {"peft": _adapter_step(s.peft, s.input_ids), "ptune-rt": _adapter_step(s.ptune, s.input_ids),
           "base": _base_step(s.base, s.input_ids)}
    return {"case": "LoRA r=16, all seven projections, dropout 0, batch 4 x seq 256", **_time(fns, rounds)}


def prefix_case(P: int, seq: int, rounds: int) -> dict:
    from ptune_rt.bench import workload as W
    from ptune_rt.bench.prefix import PrefixWorkload, build, make_inputs

    wl = dataclasses.replace(PrefixWorkload.default(), seqs=(seq,))
    base = W.build_base(wl.model_workload(), "cpu")
    s = build(wl, P, base)
    ids = make_inputs(wl, "cpu")[0][seq]
    fns = {"peft": _adapter_step(s.peft, ids), "ptune-rt": _adapter_step(s.ptune, ids), "base": _base_step(base, ids)}
    return {"case": f"prefix tuning P={P}, batch {wl.batch} x seq {seq}", **_time(fns, rounds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (default 9)")
    p.add_argument("--prefix-seq", type=int, default=256, help="sequence length of the prefix cases (default 256)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "torch_threads": torch.get_num_threads(),
               "rounds": args.rounds,
               "cases": [lora_case(args.rounds)] + [prefix_case(P, args.prefix_seq, args.rounds) for P in (32, 128)]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "ceilings_cpu"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = ["# Training-step ceilings (CPU, fp32)", "", results["what"], "",
             f"{args.rounds} interleaved rounds, medians, {results['torch_threads']} threads.", "",
             "| Case | PEFT ms | ptune-rt ms | frozen model, grad to embeddings, ms | ptune-rt vs PEFT | ceiling |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in results["cases"]:
        m = c["median_s"]
        lines.append(f"| {c['case']} | {m['peft'] * 1e3:.1f} | {m['ptune-rt'] * 1e3:.1f} | {m['base'] * 1e3:.1f} | "
                     f"{c['ratio_peft_over_ptune']:.3f}x | {c['ceiling_peft_over_base']:.3f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
