"""Prefix-tuning decode steps: the prefixed KV cache against concatenation, and against PEFT.

A decode step on the torch path attends one query over [prefix ; cache]. ptune-rt keeps the cache
in a buffer with P free rows in front (``ptune_rt.methods.prefix.cache``); switched off, every step
concatenates the prefix and the whole cache per layer (and ``DynamicLayer`` concatenates the cache
with the new token). PEFT keeps the prefix inside its cache and pays ``DynamicLayer``'s copy.

Each variant runs ``generate`` (greedy, batch 1) on the prefix benchmark's model; a logits
processor stamps the time of every step, so the figure is the median interval between decode
steps, with the prompt's prefill left out. Variants run interleaved, several rounds; ratios come
with 95% paired-bootstrap intervals. Writes JSON and a markdown table.

    python bench/prefix_decode.py                        # contexts 128 and 1024, P = 32 and 128
    python bench/prefix_decode.py --contexts 2048 --rounds 9
    python bench/prefix_decode.py --quick                # a smoke run on tiny shapes

With ``--loop-rounds`` (default 80) each case also times single decode steps in a hand-written loop,
ptune-rt with and without the prefixed cache alternating step by step: a steadier A/B of the same
change (PEFT cannot run such a loop correctly, so it is not in it).
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

VARIANTS = ("peft", "ptune-rt", "ptune-rt, concatenating")


class _Clock:
    """A logits processor that records when each generation step reaches it."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def _generate(model, prompt, new_tokens: int, adopt: bool):
    """(tokens, median seconds between decode steps) of one greedy generation."""
    from transformers import LogitsProcessorList

    import ptune_rt.methods.prefix.inject as H
    from ptune_rt.methods.prefix.cache import adopt_cache

    clock = _Clock()
    H.adopt_cache = adopt_cache if adopt else (lambda *a, **k: None)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]))
    finally:
        H.adopt_cache = adopt_cache
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])]
    return out, statistics.median(steps)


def case(wl, base, P: int, context: int, rounds: int, new_tokens: int) -> dict:
    from ptune_rt.bench.prefix import build
    from ptune_rt.bench.timing import bootstrap_ratio_ci

    s = build(wl, P, base)
    for m in (s.peft, s.ptune):
        m.eval()
    prompt = torch.randint(3, wl.vocab, (1, context), generator=torch.Generator().manual_seed(wl.seed))
    fns = {"peft": lambda: _generate(s.peft, prompt, new_tokens, True),
           "ptune-rt": lambda: _generate(s.ptune, prompt, new_tokens, True),
           "ptune-rt, concatenating": lambda: _generate(s.ptune, prompt, new_tokens, False)}
    tokens = {n: f()[0] for n, f in fns.items()}  # also the untimed warm-up
    same = all(torch.equal(tokens["peft"], t) for t in tokens.values())
    runs: dict = {n: [] for n in fns}
    for r in range(rounds):
        for n in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            runs[n].append(fns[n]()[1])
    med = {n: statistics.median(v) for n, v in runs.items()}
    ours = "ptune-rt"
    return {"P": P, "context": context, "new_tokens": new_tokens, "same_tokens": same, "median_step_s": med,
            "runs_s": runs,
            "speedup_vs_peft": med["peft"] / med[ours],
            "speedup_vs_peft_ci95": list(bootstrap_ratio_ci(runs["peft"], runs[ours])),
            "speedup_vs_concatenating": med["ptune-rt, concatenating"] / med[ours],
            "speedup_vs_concatenating_ci95": list(bootstrap_ratio_ci(runs["ptune-rt, concatenating"], runs[ours]))}


def loop_case(wl, base, P: int, context: int, rounds: int) -> dict:
    """Single decode steps in a hand-written loop (the cache cropped back after each step), ptune-rt
    with the prefixed cache against ptune-rt concatenating, alternating step by step. PEFT is left
    out: its prefix cache is rebuilt on every call outside ``generate``, so such a loop is wrong there."""
    import ptune_rt.methods.prefix.inject as H
    from ptune_rt.bench.prefix import build
    from ptune_rt.bench.timing import bootstrap_ratio_ci
    from ptune_rt.methods.prefix.cache import adopt_cache

    s = build(wl, P, base)
    s.ptune.eval()
    prompt = torch.randint(3, wl.vocab, (1, context), generator=torch.Generator().manual_seed(wl.seed))
    names = ("ptune-rt", "ptune-rt, concatenating")
    state, runs = {}, {n: [] for n in names}
    try:
        with torch.no_grad():
            for n in names:
                H.adopt_cache = adopt_cache if n == "ptune-rt" else (lambda *a, **k: None)
                out = s.ptune(input_ids=prompt, use_cache=True)
                state[n] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            for r in range(rounds):
                for n in (names if r % 2 else names[::-1]):
                    cache, nxt = state[n]
                    H.adopt_cache = adopt_cache if n == "ptune-rt" else (lambda *a, **k: None)
                    t = time.perf_counter()
                    s.ptune(input_ids=nxt, past_key_values=cache, use_cache=True)
                    runs[n].append(time.perf_counter() - t)
                    cache.crop(-1)
    finally:
        H.adopt_cache = adopt_cache
    med = {n: statistics.median(v) for n, v in runs.items()}
    return {"P": P, "context": context, "median_step_s": med, "runs_s": runs,
            "speedup_vs_concatenating": med[names[1]] / med[names[0]],
            "speedup_vs_concatenating_ci95": list(bootstrap_ratio_ci(runs[names[1]], runs[names[0]]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,1024", help="prompt lengths, comma-separated (default 128,1024)")
    p.add_argument("--prefix-lengths", default="32,128", help="P values, comma-separated (default 32,128)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (default 7, at least 2)")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens generated per run (default 33)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--loop-rounds", type=int, default=80,
                   help="single-step A/B rounds in a hand-written decode loop, per case (default 80; 0: skip)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds (a smoke run)")
    args = p.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
        prefixes = [int(c) for c in args.prefix_lengths.split(",") if c.strip()]
    except ValueError:
        p.error("--contexts and --prefix-lengths take comma-separated integers")
    if not contexts or not prefixes or min(contexts + prefixes) < 1:
        p.error("--contexts and --prefix-lengths need positive integers")
    if args.rounds < 2 or args.new_tokens < 3:
        p.error("--rounds must be at least 2 and --new-tokens at least 3")
    from ptune_rt.bench import workload as W
    from ptune_rt.bench.prefix import PrefixWorkload
    from ptune_rt.bench.report import ci_cell, commit_label, load_label
    from ptune_rt.bench.common import provenance

    wl = PrefixWorkload.quick() if args.quick else PrefixWorkload.default()
    if args.quick:
        contexts, prefixes = [min(c, 16) for c in contexts[:1]], [min(P, 4) for P in prefixes[:1]]
        args.new_tokens = min(args.new_tokens, 5)
    longest = max(prefixes) + max(contexts) + args.new_tokens
    base = W.build_base(dataclasses.replace(wl.model_workload(), seq=longest), "cpu")
    pv = provenance("cpu", [])
    pv["command"] = "python bench/prefix_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cases = []
    for context in contexts:
        for P in prefixes:
            print(f"[prefix-decode] P={P}, context {context} ...", flush=True)
            cases.append(case(wl, base, P, context, args.rounds, args.new_tokens))
            if args.loop_rounds > 0:
                cases[-1]["loop"] = loop_case(wl, base, P, context, max(2, args.loop_rounds))
    pv["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "provenance": pv, "rounds": args.rounds,
               "quick": args.quick, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("prefix_decode_cpu_quick" if args.quick else "prefix_decode_cpu")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = ["# Prefix-tuning decode steps (CPU, fp32)", "", results["what"], "",
             f"Run {pv['timestamp_utc']} on {pv['device_name']} ({pv['torch_threads']} threads, {load_label(pv)}); "
             f"torch {pv['versions']['torch']}, transformers {pv['versions']['transformers']}, peft "
             f"{pv['versions']['peft']}; commit {commit_label(pv)}; command `{pv['command']}`; {args.rounds} "
             f"interleaved rounds of {args.new_tokens}-token greedy generations, batch 1.", "",
             "| P | context | PEFT ms/step | ptune-rt ms/step | ptune-rt concatenating ms/step | vs PEFT | "
             "vs concatenating | same tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cases:
        ms = [f"{c['median_step_s'][n] * 1e3:.2f}" for n in VARIANTS]
        lines.append(f"| {c['P']} | {c['context']} | {' | '.join(ms)} | {c['speedup_vs_peft']:.3f}x "
                     f"({ci_cell(c, 'speedup_vs_peft_ci95', 3)}) | {c['speedup_vs_concatenating']:.3f}x "
                     f"({ci_cell(c, 'speedup_vs_concatenating_ci95', 3)}) | {c['same_tokens']} |")
    loops = [c for c in cases if "loop" in c]
    if loops:
        lines += ["", f"Single decode steps in a hand-written loop ({args.loop_rounds} alternating rounds; PEFT is not in "
                  "it: outside `generate` its prefix cache is rebuilt on every call):", "",
                  "| P | context | ptune-rt ms/step | concatenating ms/step | vs concatenating |", "|---:|---:|---:|---:|---:|"]
        for c in loops:
            lp = c["loop"]
            ms = [f"{lp['median_step_s'][n] * 1e3:.2f}" for n in ("ptune-rt", "ptune-rt, concatenating")]
            lines.append(f"| {c['P']} | {c['context']} | {' | '.join(ms)} | {lp['speedup_vs_concatenating']:.3f}x "
                         f"({ci_cell(lp, 'speedup_vs_concatenating_ci95', 3)}) |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c["same_tokens"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
