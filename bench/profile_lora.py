"""Where the time goes: torch.profiler tables of one benchmark case, HF PEFT vs ptune-rt.

    python bench/profile_lora.py --case decode      # one KV-cached decode step (batch 1)
    python bench/profile_lora.py --case train --dropout 0.1
    python bench/profile_lora.py --case forward --quick
    python bench/profile_lora.py --case train --gemm-shapes   # matrix products by shape, low-rank vs base

Uses the benchmark's setup factory (same model, weights and inputs as ``ptune-rt bench``), runs a few
warm-up calls, then profiles ``--steps`` calls of each implementation and prints the ops sorted by
self CPU time (CUDA time on a GPU), plus the share spent inside LoRA linears
(``record_function`` ranges put around each LoRA module's forward). ``--gemm-shapes`` adds the
matrix products grouped by operand shape, split into low-rank ones (a dimension of r, 2 r or 3 r:
shrinks, expands and the adapter gradients, shared q/k/v and gate/up shrinks included) and the rest
(the frozen weights' GEMMs, the same work on both sides), with their self time per step.
"""
import argparse
import contextlib
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ptune_rt.bench import workload as W


def _lora_ranges(model):
    """Wrap every LoRA module's forward in a profiler range named 'lora_linear_module'.

    Global module hooks, not hooks on the modules: ptune-rt runs a module with its own hooks on the
    plain per-layer path (no projection group, no SwiGLU recompute), which is not what the benchmark
    times. In a projection group the first member's range holds the whole group's work."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    lora = {id(m) for m in model.modules() if W.is_lora_module(m)}

    def pre(mod, args):
        if id(mod) in lora:
            mod._bench_rf = record_function("lora_linear_module")
            mod._bench_rf.__enter__()

    def post(mod, args, out):
        if id(mod) in lora:
            mod._bench_rf.__exit__(None, None, None)

    return [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]


#: the matrix-product ops whose self time holds the BLAS call
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def gemm_shapes(prof, steps: int, r: int) -> tuple[list[str], dict]:
    """Table lines of the matrix products by shape (ms per step) and the per-step totals
    {"low-rank": ms, "base": ms, "low-rank calls": n, "base calls": n}."""
    rows, totals = [], {"low-rank": 0.0, "base": 0.0, "low-rank calls": 0, "base calls": 0}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in GEMM_OPS:
            continue
        mats = [sh for sh in e.input_shapes if len(sh) >= 2][-2:]  # the two factors (addmm: after C)
        if len(mats) != 2:
            continue
        m, k, n = mats[0][-2], mats[0][-1], mats[1][-1]
        kind = "low-rank" if {m, k, n} & {r, 2 * r, 3 * r} else "base"  # one rank, or a group's ranks
        ms = e.self_cpu_time_total / steps / 1e3
        totals[kind] += ms
        totals[kind + " calls"] += e.count // steps
        rows.append((ms, f"| {e.key} | {m} x {k} x {n} | {kind} | {e.count // steps} | {ms:.2f} |"))
    lines = ["| op | M x K x N | kind | calls per step | ms per step |", "|---|---|---|---:|---:|"]
    lines += [line for _, line in sorted(rows, reverse=True)]
    return lines, totals


def _step_fn(case, s, model):
    if case == "train":
        model.train()
        return lambda: (W.zero_grads(model), W.train_step(model, s.input_ids))
    model.eval()
    if case == "forward":
        return lambda: W.forward_logits(model, s.input_ids)
    # decode: one cached step after the prompt; the cache is cropped back after each step
    with torch.no_grad():
        out = model(input_ids=s.prompt_ids, use_cache=True)
    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step():
        with torch.no_grad():
            model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv.crop(-1)  # drop the token just appended

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=("train", "forward", "decode"), default="decode")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="profile the variants in this many alternating rounds and print the medians over rounds "
                        "(the tables are of the last round)")
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--device", default=None)
    p.add_argument("--gemm-shapes", action="store_true",
                   help="also list the matrix products by shape: low-rank (a dimension of r, 2 r or 3 r) vs base GEMMs")
    p.add_argument("--quiet-gate", type=float, default=None, metavar="IDLE",
                   help="before each profiled variant, wait until the CPUs were this fraction idle (e.g. 0.9)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    gate = None
    if args.quiet_gate is not None:
        from ptune_rt.bench.timing import QuietGate

        gate = QuietGate(args.quiet_gate, max_wait=600)
    wl = W.Workload.quick() if args.quick else W.Workload.default()
    s = W.build(wl, args.dropout, args.device)
    steps = args.steps or (20 if args.case == "decode" else 3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
    variants = ["peft", "ptune-rt"] + (["base"] if args.case != "train" else [])
    fns = {}
    for name in variants:
        fns[name] = _step_fn(args.case, s, s.models[name])
        for _ in range(2):
            fns[name]()
    per = {name: [] for name in variants}  # per round: ms per step of the step, LoRA ranges, GEMM kinds
    for rnd in range(args.rounds):
        last = rnd == args.rounds - 1
        k = rnd % len(variants)
        for name in variants[k:] + variants[:k]:
            handles = _lora_ranges(s.models[name])
            if gate:
                gate()
            try:
                with profile(activities=acts, record_shapes=args.gemm_shapes) as prof:
                    for _ in range(steps):
                        with record_function("step"):
                            fns[name]()
            finally:
                for h in handles:
                    h.remove()
            events = prof.key_averages()
            total = sum(e.cpu_time_total for e in events if e.key == "step") / steps / 1e3
            lora = sum(e.cpu_time_total for e in events if e.key == "lora_linear_module") / steps / 1e3
            row = {"step": total, "LoRA linears": lora}
            lines = None
            if args.gemm_shapes:
                lines, t = gemm_shapes(prof, steps, wl.r)
                row.update({"low-rank GEMMs": t["low-rank"], "base GEMMs": t["base"]})
            per[name].append(row)
            if not last:
                continue
            print(f"\n=== {name}: {args.case}, dropout {args.dropout:g}: {total:.2f} ms per step (CPU wall inside "
                  f"the profiler), {lora:.2f} ms inside LoRA linears ({wl.n_lora_linears} per step: "
                  f"{lora * 1e3 / max(1, wl.n_lora_linears):.1f} us each) ===")
            if gate:
                print(f"(CPUs {gate.log[-1]['idle']:.0%} idle before this profile)")
            print(events.table(sort_by=sort, row_limit=args.rows))
            if lines:
                print("\n".join(lines))
                print(f"{name}: low-rank GEMMs {t['low-rank']:.1f} ms per step ({t['low-rank calls']} calls), base "
                      f"GEMMs {t['base']:.1f} ms ({t['base calls']} calls)")
    if args.rounds > 1:
        cols = list(per[variants[0]][0])
        print(f"\nMedians over {args.rounds} alternating rounds of {steps} profiled steps (ms per step):\n")
        print("| variant | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name in variants:
            print(f"| {name} | " + " | ".join(f"{statistics.median(r[c] for r in per[name]):.1f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
