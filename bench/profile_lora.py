"""Where the time goes: torch.profiler tables of one benchmark case, HF PEFT vs ptune-rt.

    python bench/profile_lora.py --case decode      # one KV-cached decode step (batch 1)
    python bench/profile_lora.py --case train --dropout 0.1
    python bench/profile_lora.py --case forward --quick

Uses the benchmark's setup factory (same model, weights and inputs as ``ptune-rt bench``), runs a few
warm-up calls, then profiles ``--steps`` calls of each implementation and prints the ops sorted by
self CPU time (CUDA time on a GPU), plus the share spent inside LoRA linears
(``record_function`` ranges put around each LoRA module's forward).
"""
import argparse
import contextlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ptune_rt.bench import workload as W


def _lora_ranges(model):
    """Wrap every LoRA module's forward in a profiler range named 'lora_linear_module'."""
    handles = []
    for m in model.modules():
        if W.is_lora_module(m):
            def pre(mod, args):
                mod._bench_rf = record_function("lora_linear_module")
                mod._bench_rf.__enter__()

            def post(mod, args, out):
                mod._bench_rf.__exit__(None, None, None)

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


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
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet-gate", type=float, default=None, metavar="IDLE",
                   help="before each profiled variant, wait until the CPUs were this fraction idle (e.g. 0.9)")
    args = p.parse_args(argv)
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
    for name in variants:
        model = s.models[name]
        fn = _step_fn(args.case, s, model)
        for _ in range(2):
            fn()
        handles = _lora_ranges(model)
        if gate:
            gate()
        try:
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    with record_function("step"):
                        fn()
        finally:
            for h in handles:
                h.remove()
        events = prof.key_averages()
        total = sum(e.cpu_time_total for e in events if e.key == "step") / steps
        lora = sum(e.cpu_time_total for e in events if e.key == "lora_linear_module") / steps
        print(f"\n=== {name}: {args.case}, dropout {args.dropout:g}: {total / 1e3:.2f} ms per step (CPU wall "
              f"inside the profiler), {lora / 1e3:.2f} ms inside LoRA linears ({wl.n_lora_linears} per step: "
              f"{lora / max(1, wl.n_lora_linears):.1f} us each) ===")
        if gate:
            print(f"(CPUs {gate.log[-1]['idle']:.0%} idle before this profile)")
        print(events.table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
