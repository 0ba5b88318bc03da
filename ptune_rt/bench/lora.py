"""``ptune-rt bench --suite lora`` (the default suite): the LoRA benchmark + numerical-equality report.

HF PEFT and ptune-rt (and, where it means something, the frozen base model without any adapter)
run side by side in one process on the same weights and inputs, with interleaved timings. The run
writes ``lora_<device>.json`` (all numbers plus provenance), ``lora_<device>.md`` (the tables) and
``lora_<device>.png`` (a plot), and prints the tables.

Modes: the default run times every case on the benchmark model in :data:`MODES` ``["default"]``
rounds (under 5 minutes on a 2-core CPU); ``--full`` is the configuration of the committed results
(``bench/results/lora_cpu.*``); ``--quick`` runs tiny shapes in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ptune_rt.bench.common import add_common_arguments, default_out_dir, provenance, resolve_mode, wait_for_quiet

#: Run order: timings first (right after the optional wait for a quiet machine).
SECTIONS = ("speed", "memory", "ops", "flops", "equality", "analytic", "triton")

#: Targets for ptune-rt vs HF PEFT (speed ratios: PEFT time / ptune-rt time; bytes: ptune-rt / PEFT).
TARGETS = {
    "train_dropout0": 1.05,
    "train_dropout0.1": 1.10,
    "forward_nograd": 1.03,
    "generate_per_token": 1.10,
    "saved_activation_bytes_ratio_dropout0.1": 0.60,
    "compute_ops_per_lora_linear": 1.0,
}

#: The settings of each run mode (an option given on the command line wins). ``default``: the benchmark
#: model, 6 timed rounds per case (the fewest behind a PASS / MISS, ``report.MIN_ROUNDS_FOR_VERDICT``),
#: under 5 minutes on a 2-core CPU; ``full``: the command of the committed ``bench/results/lora_cpu.*``.
MODES = {
    "quick": {"repeats": 5, "train_block": 1, "gate_max_wait": 120.0},
    "default": {"repeats": 6, "train_block": 1, "gate_max_wait": 120.0},
    "full": {"repeats": 61, "train_block": 2, "quiet_gate": 0.85, "gate_max_wait": 60.0},
}
FULL_HELP = ("the configuration of the committed results (bench/results/lora_cpu.*): --repeats 61 --train-block 2 "
             "--quiet-gate 0.85 --gate-max-wait 60, about 25 minutes on a 2-core CPU")

#: Seconds per call on the 2-core CPU of the committed results (runs without the quiet gate, other jobs
#: around), per workload: the plan's prior costs until the run's own calls are measured. Speed cases: one
#: call of one variant; sections: one progress step; ``quiet_gate``: one gated round (a one-second idle
#: sample, plus waits).
PRIOR_S = {
    "default": {"build": 1.0, "train_dropout0": 2.0, "train_dropout0.1": 2.2, "forward_nograd": 0.85,
                "generate_per_token": 1.1, "memory": 2.2, "ops": 5.0, "flops": 2.3, "equality": 4.5,
                "analytic": 0.01, "triton": 9.0, "quiet_gate": 1.5},
    "quick": {"build": 0.2, "train_dropout0": 0.05, "train_dropout0.1": 0.05, "forward_nograd": 0.02,
              "generate_per_token": 0.1, "memory": 0.1, "ops": 0.25, "flops": 0.3, "equality": 0.1,
              "analytic": 0.01, "triton": 10.0, "quiet_gate": 1.5},
}
#: The variants each speed case times, in the order of the run.
SPEED_CASES = {"train_dropout0": ("peft", "ptune-rt"), "train_dropout0.1": ("peft", "ptune-rt"),
               "forward_nograd": ("base", "peft", "ptune-rt"), "generate_per_token": ("base", "peft", "ptune-rt")}
#: Progress steps of each untimed section.
SECTION_STEPS = {"equality": 4, "memory": 4, "ops": 3, "flops": 3, "analytic": 1, "triton": 1}


# ----------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, workload, device, repeats: int, warmup: int, plan, gate=None, train_block: int = 1):
        self.gate = gate
        self.train_block = train_block
        self.wl = workload
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.plan = plan
        self._setups = {}
        self._base = None

    def setup(self, dropout: float):
        from ptune_rt.bench import workload as W

        if dropout not in self._setups:
            if self._base is None:
                self._base = W.build_base(self.wl, self.device)
            self._setups[dropout] = W.build(self.wl, dropout, self.device, base=self._base)
        return self._setups[dropout]

    def tick(self, n: int = 1):
        self.plan.advance(n)

    def status(self, text: str):
        self.plan.status(text)

    # -- equality ---------------------------------------------------------------------------

    def equality(self) -> dict:
        """ptune-rt vs PEFT on the benchmark model (dropout 0), both judged against PEFT in float64."""
        import copy

        import torch

        from ptune_rt.bench import workload as W
        from ptune_rt.testing.tolerances import error_report

        self.status("equality")
        s = self.setup(0.0)
        ids = s.input_ids
        for m in (s.peft, s.ptune, s.base):
            m.eval()
        lp = W.forward_logits(s.peft, ids)
        lt = W.forward_logits(s.ptune, ids)
        lb = W.forward_logits(s.base, ids)
        gold_model = copy.deepcopy(s.peft).double()
        gold_model.eval()
        lg = W.forward_logits(gold_model, ids)
        logits_rule = error_report(lt, lp, lg, torch.float32)
        out = {
            "logits_max_abs_diff_ptune_vs_peft": float((lt - lp).abs().max()),
            "logits_max_abs": float(lp.abs().max()),
            "lora_effect_max_abs_logit_change": float((lp - lb).abs().max()),
            "logits_ptune_err_to_fp64": logits_rule["err"],
            "logits_peft_err_to_fp64": logits_rule["ref_err"],
            "logits_bound": logits_rule["bound"],
            "logits_within_tolerance_rule": bool(logits_rule["ok"]),
            "argmax_agreement": float((lt.argmax(-1) == lp.argmax(-1)).float().mean()),
        }
        del lp, lt, lb, lg
        self.tick()
        losses, grads = {}, {}
        for name, m in (("peft", s.peft), ("ptune-rt", s.ptune), ("fp64", gold_model)):
            m.train()
            W.zero_grads(m)
            losses[name] = W.train_step(m, ids).double()
            grads[name] = {k.removeprefix("base_model.model."): p.grad.detach().double()
                           for k, p in m.named_parameters() if p.requires_grad}
            W.zero_grads(m)
            m.eval()
            self.tick()
        del gold_model
        loss_rule = error_report(losses["ptune-rt"], losses["peft"], losses["fp64"], torch.float32)
        names = sorted(grads["peft"])
        flat = {k: torch.cat([grads[k][n].flatten() for n in names]) for k in grads}
        grad_rule = error_report(flat["ptune-rt"], flat["peft"], flat["fp64"], torch.float32)
        out.update({
            "loss_peft": float(losses["peft"]),
            "loss_ptune": float(losses["ptune-rt"]),
            "loss_abs_diff": abs(float(losses["ptune-rt"] - losses["peft"])),
            "loss_within_tolerance_rule": bool(loss_rule["ok"]),
            "adapter_grad_max_abs_diff_ptune_vs_peft": float((flat["ptune-rt"] - flat["peft"]).abs().max()),
            "adapter_grad_max_abs": float(flat["peft"].abs().max()),
            "adapter_grad_ptune_err_to_fp64": grad_rule["err"],
            "adapter_grad_peft_err_to_fp64": grad_rule["ref_err"],
            "adapter_grad_bound": grad_rule["bound"],
            "adapter_grads_within_tolerance_rule": bool(grad_rule["ok"]),
            "adapter_tensors_compared": len(names),
        })
        return out

    # -- speed ------------------------------------------------------------------------------

    def speed(self) -> dict:
        import torch

        from ptune_rt.bench import workload as W
        from ptune_rt.bench.timing import interleaved, summarize

        res = {}
        for p in (0.0, 0.1):
            key = f"train_dropout{p:g}"
            self.plan.begin(key, f"speed: {key}")
            s = self.setup(p)
            models = {"peft": s.peft, "ptune-rt": s.ptune}
            for m in models.values():
                m.train()
            fns = {n: (lambda m=m: W.train_step(m, s.input_ids)) for n, m in models.items()}
            cpu = {}
            times = interleaved(fns, self.repeats, self.warmup, s.device, setup=lambda n: W.zero_grads(models[n]),
                                tick=self.plan.ticker(self.train_block, self.warmup * len(fns)), cpu_times=cpu,
                                gate=self.gate, block=self.train_block)
            for m in models.values():
                W.zero_grads(m)
                m.eval()
            res[key] = summarize(times, cpu_times=cpu)
            res[key]["what"] = (f"forward + causal-LM loss + backward, batch {self.wl.batch} x seq {self.wl.seq}, "
                                f"dropout {p:g}; seconds per step" + (
                                    f" (steady state: per round {self.train_block} steps in a row, the first "
                                    f"untimed, the mean of the rest)" if self.train_block > 1 else ""))

        s = self.setup(0.0)
        models = s.models
        for m in models.values():
            m.eval()
        self.plan.begin("forward_nograd", "speed: forward_nograd")
        fns = {n: (lambda m=m: W.forward_logits(m, s.input_ids)) for n, m in models.items()}
        cpu = {}
        res["forward_nograd"] = summarize(interleaved(fns, self.repeats, self.warmup, s.device,
                                                      tick=self.plan.ticker(1, self.warmup * len(fns)),
                                                      cpu_times=cpu, gate=self.gate), cpu_times=cpu)
        res["forward_nograd"]["what"] = f"no-grad forward (eval), batch {self.wl.batch} x seq {self.wl.seq}; seconds"

        self.plan.begin("generate_per_token", "speed: generate")
        new = self.wl.gen_new_tokens
        outs = {}

        def gen(n, m):
            outs[n] = W.generate(m, s.prompt_ids, new)

        fns = {n: (lambda n=n, m=m: gen(n, m)) for n, m in models.items()}
        cpu = {}
        times = interleaved(fns, self.repeats, self.warmup, s.device, tick=self.plan.ticker(1, self.warmup * len(fns)),
                            cpu_times=cpu, gate=self.gate)
        res["generate_per_token"] = summarize(times, per=new, cpu_times=cpu)
        res["generate_per_token"]["what"] = (f"greedy generate, batch {self.wl.gen_batch}, {self.wl.gen_prompt}-token "
                                             f"prompt, {new} new tokens; wall time / new tokens (prefill included)")
        res["generate_per_token"]["new_tokens"] = {n: int(o.shape[1] - s.prompt_ids.shape[1]) for n, o in outs.items()}
        res["generate_per_token"]["same_tokens_ptune_vs_peft"] = bool(torch.equal(outs["peft"], outs["ptune-rt"]))
        return res

    # -- memory -----------------------------------------------------------------------------

    def memory(self) -> dict:
        from ptune_rt.bench import workload as W
        from ptune_rt.bench.memory import saved_for_backward

        res = {}
        for p in (0.0, 0.1):
            self.status(f"saved for backward, dropout {p:g}")
            s = self.setup(p)
            row = {}
            for name, m in (("peft", s.peft), ("ptune-rt", s.ptune)):
                m.train()
                W.zero_grads(m)
                row[name] = saved_for_backward(m, lambda m=m: W.train_step(m, s.input_ids))
                W.zero_grads(m)
                m.eval()
                self.tick()
            row["ratio_ptune_over_peft"] = row["ptune-rt"]["activation_bytes"] / row["peft"]["activation_bytes"]
            row["ratio_in_lora_linears"] = (row["ptune-rt"]["activation_bytes_in_lora_linears"]
                                            / row["peft"]["activation_bytes_in_lora_linears"])
            res[f"dropout{p:g}"] = row
        return res

    # -- ops --------------------------------------------------------------------------------

    def ops(self) -> dict:
        import torch

        from ptune_rt.bench import workload as W
        from ptune_rt.bench.opcount import count_ops

        s = self.setup(0.0)
        n = self.wl.n_lora_linears
        res = {"forward": {}, "decode_step": {}}
        for name, m in s.models.items():
            m.eval()
            descend = name == "ptune-rt"
            self.status(f"ops: {name}")
            res["forward"][name] = count_ops(m, lambda m=m: W.forward_logits(m, s.input_ids), n, descend)
            with torch.no_grad():
                out = m(input_ids=s.prompt_ids, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                pkv = out.past_key_values

                def step(m=m, nxt=nxt, pkv=pkv):
                    with torch.no_grad():
                        m(input_ids=nxt, past_key_values=pkv, use_cache=True)

                res["decode_step"][name] = count_ops(m, step, n, descend)
            if name != "base":  # the frozen model has nothing to train
                m.train()
                W.zero_grads(m)
                res.setdefault("train_forward", {})[name] = count_ops(
                    m, lambda m=m: m(input_ids=s.input_ids, labels=s.input_ids), n, descend)
                W.zero_grads(m)
                res.setdefault("train_step", {})[name] = count_ops(
                    m, lambda m=m: W.train_step(m, s.input_ids), n, descend)
                W.zero_grads(m)
                m.eval()
            self.tick()
        res["n_lora_linears"] = n
        res["ptune_backend"] = s.ptune_backends()
        return res

    # -- flops ------------------------------------------------------------------------------

    def flops(self) -> dict:
        from ptune_rt.bench import analytic as A
        from ptune_rt.bench import workload as W
        from ptune_rt.bench.flops import count_flops

        s = self.setup(0.0)
        res = {"train_step": {}, "forward": {}}
        for name, m in s.models.items():
            self.status(f"flops: {name}")
            m.eval()
            res["forward"][name] = count_flops(lambda m=m: W.forward_logits(m, s.input_ids))
            if name != "base":
                m.train()
                W.zero_grads(m)
                res["train_step"][name] = count_flops(lambda m=m: W.train_step(m, s.input_ids))
                W.zero_grads(m)
                m.eval()
            self.tick()
        M = self.wl.batch * self.wl.seq
        fwd = bwd = 0
        for _, k, nn_ in self.wl.linear_shapes():
            f = A.lora_linear_flops(M, k, nn_, self.wl.r)
            fwd += f["forward"] * self.wl.layers
            bwd += f["backward"] * self.wl.layers
        lm_head = 2 * M * self.wl.hidden * self.wl.vocab
        res["analytic_matmul_flops"] = {
            "lora_linears_forward": fwd, "lora_linears_backward": bwd, "lm_head_forward": lm_head,
            "lm_head_backward_dx": lm_head,
            "note": "matrix products of the LoRA linears (base GEMM + shrink + expand) and the LM head; "
                    "attention score/value products excluded (FlopCounterMode has no formula for the CPU SDPA kernel)"}
        return res

    # -- triton path probe ------------------------------------------------------------------

    def triton(self) -> dict:
        import torch

        self.status("triton path (interpreter)")
        if torch.device(self.device).type == "cuda":
            self.tick()
            return {"skipped": "the main run used the Triton kernels on CUDA"}
        env = dict(os.environ, TRITON_INTERPRET="1")
        try:
            r = subprocess.run([sys.executable, "-m", "ptune_rt.bench.triton_probe"], env=env, capture_output=True,
                               text=True, timeout=600)
            if r.returncode != 0:
                out = {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["failed"]}
            else:
                out = json.loads(r.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            out = {"error": [f"{type(e).__name__}: {e}"]}
        self.tick()
        return out


# ----------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------


def evaluate_targets(results: dict) -> list[dict]:
    """One row per target; speed targets are judged on their 95% interval (``report.verdict``)."""
    from ptune_rt.bench.report import judge

    rows = []
    speed = results.get("speed", {})
    labels = {"train_dropout0": "training step, dropout 0", "train_dropout0.1": "training step, dropout 0.1",
              "forward_nograd": "no-grad forward", "generate_per_token": "greedy generate, per token"}
    for key, label in labels.items():
        if key in speed:
            v = speed[key]["speedup"]
            rounds = len(speed[key]["variants"]["peft"]["runs_s"])
            rows.append({"target": f"{label}: ptune-rt speed vs PEFT", "value": v, "goal": f">= {TARGETS[key]:.2f}x",
                         "unit": "x", **judge(v, TARGETS[key], True, speed[key].get("speedup_ci95"), rounds)})
    mem = results.get("memory", {})
    if "dropout0.1" in mem:
        v = mem["dropout0.1"]["ratio_ptune_over_peft"]
        t = TARGETS["saved_activation_bytes_ratio_dropout0.1"]
        rows.append({"target": "activation bytes saved for backward, dropout 0.1: ptune-rt / PEFT", "value": v,
                     "goal": f"<= {t:.2f}x", "unit": "x", **judge(v, t, False)})
    ops = results.get("ops", {})
    tri = results.get("triton", {})
    t = TARGETS["compute_ops_per_lora_linear"]
    if "compute_ops_per_lora_linear_forward" in tri:
        v = tri["compute_ops_per_lora_linear_forward"]
        rows.append({"target": "dispatched ops per LoRA linear per forward, Triton path (interpreter probe)",
                     "value": v, "goal": f"<= {t:g}", "unit": "ops", **judge(v, t, False)})
    elif "forward" in ops and "ptune-rt" in ops["forward"]:
        backend = ",".join(ops.get("ptune_backend", {}))
        v = ops["forward"]["ptune-rt"]["per_lora_linear_compute"]
        rows.append({"target": f"dispatched ops per LoRA linear per forward ({backend} path, top level)",
                     "value": v, "goal": f"<= {t:g}", "unit": "ops", **judge(v, t, False)})
    return rows


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptune-rt bench",
        description="LoRA benchmark + numerical-equality report: HF PEFT vs ptune-rt (and the frozen base model) "
                    "on a Llama-like model with random weights, side by side in one run.")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per variant (median reported; default {MODES['default']['repeats']}, --full "
                        f"{MODES['full']['repeats']}, --quick {MODES['quick']['repeats']})")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (default 1)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--quiet-gate", type=float, default=None, metavar="IDLE",
                   help="CPU runs: before every timed round wait (up to --gate-max-wait s) until the CPUs were at "
                        "least this fraction idle over one second, e.g. 0.9 (Linux; default: off, --full 0.85)")
    p.add_argument("--gate-max-wait", type=float, default=None,
                   help="longest wait per round for --quiet-gate (s; default 120, --full 60)")
    p.add_argument("--train-block", type=int, default=None, metavar="N",
                   help="training steps: per round run each model N steps in a row and time the mean of the last "
                        "N-1 (steady state, as a training loop sees it; default 1: one step per model per round; "
                        "--full 2)")
    add_common_arguments(p, max_wait=1800.0, full=FULL_HELP, plan=True)
    return p


def build_dropouts(sections) -> list:
    """The LoRA dropouts whose models the chosen sections need (built once each, up front)."""
    out = []
    if set(sections) & {"speed", "memory", "ops", "flops", "equality"}:
        out.append(0.0)
    if set(sections) & {"speed", "memory"}:
        out.append(0.1)
    return out


def make_plan(args, sections, gated: bool):
    """The run's plan: every model build, timed call and section step, with its prior cost."""
    from ptune_rt.bench.timing import Plan

    prior = PRIOR_S["quick" if args.quick else "default"]
    plan = Plan()
    n_builds = len(build_dropouts(sections))
    if n_builds:
        plan.add("build", n_builds, prior["build"], "building models")
    for sec in SECTIONS:
        if sec not in sections:
            continue
        if sec != "speed":
            plan.add(sec, SECTION_STEPS[sec], prior[sec])
            continue
        for case, variants in SPEED_CASES.items():
            block = args.train_block if case.startswith("train") else 1
            per_call = prior[case] + (prior["quiet_gate"] / (len(variants) * block) if gated else 0.0)
            plan.add(case, len(variants) * (args.warmup + args.repeats * block), per_call, f"speed: {case}")
    return plan


def run(args, argv) -> dict:
    import torch

    from ptune_rt.bench import analytic
    from ptune_rt.bench.workload import Workload, default_device

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"ptune-rt bench: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    if args.repeats < 1:
        raise SystemExit("ptune-rt bench: --repeats must be >= 1")
    if args.train_block < 1:
        raise SystemExit("ptune-rt bench: --train-block must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    wl = Workload.quick() if args.quick else Workload.default()
    results: dict = {"schema": "ptune-rt-bench-lora/1", "provenance": provenance(device, argv),
                     "workload": wl.to_dict(), "mode": args.mode,
                     "repeats": args.repeats, "warmup": args.warmup, "train_block": args.train_block}
    if args.wait_for_load is not None and torch.device(device).type == "cpu" and hasattr(os, "getloadavg"):
        results["provenance"]["wait_for_load"] = wait_for_quiet(args.wait_for_load, args.max_wait)
        results["provenance"]["load_average_at_start"] = list(os.getloadavg())
    t0 = time.perf_counter()
    gate = None
    if args.quiet_gate is not None and torch.device(device).type == "cpu":
        from ptune_rt.bench.timing import QuietGate

        gate = QuietGate(args.quiet_gate, args.gate_max_wait)
    plan = make_plan(args, sections, gate is not None).start(disable=args.no_progress)
    bench = Bench(wl, device, args.repeats, args.warmup, plan, gate, train_block=args.train_block)
    try:
        section_s = results["section_wall_s"] = {}
        ts = time.perf_counter()
        for p in build_dropouts(sections):
            plan.begin("build", f"building models (dropout {p:g})")
            bench.setup(p)
            plan.advance()
        if "build" in plan.kinds:
            section_s["build"] = time.perf_counter() - ts
        for sec in SECTIONS:
            if sec not in sections:
                continue
            ts = time.perf_counter()
            if sec != "speed":
                plan.begin(sec)
            if sec == "analytic":
                plan.status("analytic HBM / roofline")
                results["analytic"] = {"seven_b": analytic.seven_b_table(r=16, e=2),
                                       "bench_model_fp32": _bench_model_analytic(wl)}
                plan.advance()
            else:
                results[sec] = getattr(bench, sec)()
            section_s[sec] = time.perf_counter() - ts
    finally:
        plan.close()
    results["provenance"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if gate is not None:
        results["provenance"]["quiet_gate"] = gate.summary()
    results["provenance"]["wall_time_s"] = time.perf_counter() - t0
    results["plan"] = plan.summary()
    results["targets"] = evaluate_targets(results)
    return results


def _bench_model_analytic(wl) -> dict:
    """The same HBM model on the benchmark's own linears (fp32, 4-byte elements), summed over a layer."""
    from ptune_rt.bench import analytic as A

    M = wl.batch * wl.seq
    out = {}
    for p in (0.0, 0.1):
        tot = {"forward": {"unfused": 0, "fused": 0}, "backward": {"unfused": 0, "fused": 0}}
        for _, k, n in wl.linear_shapes():
            m = A.linear_model(M, k, n, wl.r, e=4, p=p)
            for pass_ in tot:
                for impl in ("unfused", "fused"):
                    tot[pass_][impl] += m[pass_][impl]["bytes"] * wl.layers
        out[f"dropout{p:g}"] = tot
    return out


def parse(argv) -> argparse.Namespace:
    """The options of ``argv`` with the run mode's settings (:data:`MODES`) filled in; ``.mode`` says which."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODES)
    return args


def main(argv=None, command_argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from ptune_rt.bench import report

    if args.dry_run:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        plan = make_plan(args, sections, args.quiet_gate is not None)
        print(f"ptune-rt bench (LoRA), mode {args.mode}: {args.repeats} timed rounds per case, warm-up "
              f"{args.warmup}, train block {args.train_block}, quiet gate {args.quiet_gate}; would write to "
              f"{args.out or default_out_dir()}\n")
        print("\n".join(plan.table()))
        return 0
    out_dir = args.out or default_out_dir()
    with warnings.catch_warnings():
        # transformers' own deprecation notice, raised from inside PEFT on every training forward
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        results = run(args, command_argv if command_argv is not None else argv)
    paths = report.write_all(results, Path(out_dir))
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"ptune-rt bench: {report.finished_line(results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
