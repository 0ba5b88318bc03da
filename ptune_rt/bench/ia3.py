"""``ptune-rt bench --suite ia3`` (``python -m ptune_rt.bench.ia3``): ptune-rt's IA3 against PEFT's
IA3 on the benchmark's Llama-like model (random weights, the family's default targets: k_proj,
v_proj and the input of down_proj), both with the same vectors.

Timed side by side (interleaved rounds, paired-bootstrap 95% intervals, the verdict rule of
``ptune_rt.bench.report``): a training step (``zero_grad``, forward + loss, backward, AdamW step)
and an inference forward (``torch.no_grad``). On CPU both run torch ops (ptune-rt's torch path
is PEFT's arithmetic in fewer Python layers); the fused kernels run on CUDA.

Device-independent: the analytic HBM bytes of one IA3 layer's forward, fused (the scale inside the
GEMM: read x and W, write y; training also writes ``x W^T`` for the vector's gradient on an
output-scaled layer) against PEFT's chain (an output scale writes the base output, then reads it
for the multiply and writes y; an input scale writes ``x * l`` and the GEMM reads it back), at
this model's shapes and at a 7B-like one (4096 tokens, hidden 4096, intermediate 11008, fp16).

Writes ``ia3_<device>.json`` (all numbers plus provenance), ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import warnings
from pathlib import Path

from ptune_rt.bench.workload import ModelShape

VARIANTS = ("peft", "ptune-rt")
LABELS = {"peft": "PEFT IA3", "ptune-rt": "ptune-rt IA3"}
PHASES = ("train", "forward")
MODE_SETTINGS = {"quick": {"repeats": 5}, "default": {"repeats": 15}, "full": {"repeats": 31}}
#: 7B-like layer shapes for the analytic bytes: tokens, hidden (k/v in and out), intermediate (down in).
SEVEN_B = {"tokens": 4096, "hidden": 4096, "intermediate": 11008, "layers": 32, "bytes_per_element": 2}


@dataclasses.dataclass(frozen=True)
class IA3Workload(ModelShape):
    batch: int = 4
    seq: int = 128
    lr: float = 1e-3

    @classmethod
    def quick(cls) -> "IA3Workload":
        return cls(**cls.QUICK, batch=2, seq=16)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build(wl: IA3Workload, device) -> tuple[dict, object]:
    """({variant: (model, optimizer)}, input ids): PEFT's and ptune-rt's IA3 on copies of one base."""
    import torch
    from peft import IA3Config as PeftIA3Config, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import ptune_rt
    from ptune_rt.methods.ia3 import IA3Config

    cfg = LlamaConfig(hidden_size=wl.hidden, intermediate_size=wl.intermediate, num_hidden_layers=wl.layers,
                      num_attention_heads=wl.heads, num_key_value_heads=wl.kv_heads, vocab_size=wl.vocab,
                      max_position_embeddings=max(256, wl.seq), tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wl.seed)
        base = LlamaForCausalLM(cfg).to(device=device, dtype=wl.torch_dtype)
    models = {"peft": get_peft_model(copy.deepcopy(base), PeftIA3Config()),
              "ptune-rt": ptune_rt.apply(copy.deepcopy(base), IA3Config())}
    for model in models.values():  # the same non-trivial vectors in both
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                if ".ia3_l." in n:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, wl.vocab, (wl.batch, wl.seq), generator=g).to(device)
    return {n: (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=wl.lr))
            for n, m in models.items()}, ids


def step_fns(variants: dict, ids) -> dict:
    """{(phase, variant): one call}: a training step, or an inference forward."""
    import torch

    def train(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return run

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run
    fns = {}
    for n, (model, opt) in variants.items():
        fns[("train", n)] = train(model, opt)
        fns[("forward", n)] = forward(model)
    return fns


def equality(variants: dict, ids) -> dict:
    """Logits and vector gradients of the two on one batch (before any step): max |difference|."""
    out = {}
    for n, (model, _) in variants.items():
        model.zero_grad(set_to_none=True)
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = {k.replace("base_model.model.", "").replace(".ia3_l.default", ""): p.grad.double()
                 for k, p in model.named_parameters() if p.requires_grad}
        out[n] = (res.logits.detach().double(), grads)
        model.zero_grad(set_to_none=True)
    (lp, gp), (lo, go) = out["peft"], out["ptune-rt"]
    grad_diff = max((gp[k] - go[k]).abs().max().item() for k in gp)
    return {"max_abs_logits": (lp - lo).abs().max().item(), "max_abs_vector_grads": grad_diff,
            "same_parameters": sorted(gp) == sorted(go), "vectors": len(gp)}


def ratio(times: dict, base: str, cand: str) -> dict:
    from ptune_rt.bench.report import verdict
    from ptune_rt.bench.timing import bootstrap_ratio_ci

    b, c = times[base], times[cand]
    r = statistics.median(b) / statistics.median(c)
    ci = list(bootstrap_ratio_ci(b, c)) if len(b) > 1 else None
    return {"baseline": base, "candidate": cand, "ratio": r, "ci95": ci,
            "verdict": verdict(r, 1.0, True, ci, len(b), labels=("faster", "slower"))}


def layer_bytes(tokens: int, k: int, n: int, feedforward: bool, e: int, training: bool) -> dict:
    """HBM bytes of one IA3 layer's forward, fused vs PEFT's chain (weights, activations, scales)."""
    gemm = e * (tokens * k + n * k + tokens * n)  # read x (or x * l) and W, write the GEMM's output
    vector = 4 * (k if feedforward else n)  # the fp32 vector
    fused = gemm + vector + (e * tokens * n if training and not feedforward else 0)  # z_out: x W^T for dl
    # PEFT: an output scale reads the base output back and writes y; an input scale reads x and
    # writes x * l before its GEMM (which then reads x * l in place of x)
    peft = gemm + vector + 2 * e * tokens * (k if feedforward else n)
    return {"fused": fused, "peft": peft, "saved_fraction": 1 - fused / peft}


def analytic_bytes(hidden: int, kv: int, intermediate: int, tokens: int, layers: int, e: int) -> dict:
    out = {}
    for training in (False, True):
        rows = {"k_proj": layer_bytes(tokens, hidden, kv, False, e, training),
                "v_proj": layer_bytes(tokens, hidden, kv, False, e, training),
                "down_proj": layer_bytes(tokens, intermediate, hidden, True, e, training)}
        fused = layers * sum(r["fused"] for r in rows.values())
        peft = layers * sum(r["peft"] for r in rows.values())
        out["training" if training else "inference"] = {"per_layer": rows, "model_fused": fused, "model_peft": peft,
                                                        "saved_fraction": 1 - fused / peft}
    return out


def run(args, command_argv) -> dict:
    import torch

    from ptune_rt.bench.common import provenance
    from ptune_rt.bench.timing import interleaved
    from ptune_rt.bench.workload import default_device

    if args.repeats < 2:
        raise SystemExit("ptune-rt bench --suite ia3: --repeats must be >= 2 (an interval needs paired rounds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    wl = IA3Workload.quick() if args.quick else IA3Workload()
    variants, ids = build(wl, device)
    res = {"schema": "ptune-rt-bench-ia3/1", "provenance": provenance(device, command_argv), "workload": wl.to_dict(),
           "mode": args.mode, "repeats": args.repeats, "variants": dict(LABELS),
           "equality": equality(variants, ids)}
    for model, _ in variants.values():
        model.train()
    times = interleaved({f"{p}/{n}": f for (p, n), f in step_fns(variants, ids).items()}, args.repeats,
                        args.warmup, device)
    res["speed"] = {}
    for phase in PHASES:
        ts = {n: times[f"{phase}/{n}"] for n in VARIANTS}
        res["speed"][phase] = {"median_s": {n: statistics.median(t) for n, t in ts.items()}, "runs_s": ts,
                               "ratio": ratio(ts, "peft", "ptune-rt")}
    kv = wl.kv_heads * wl.hidden // wl.heads
    esize = torch.empty((), dtype=wl.torch_dtype).element_size()
    res["hbm_bytes"] = {
        "this_model": analytic_bytes(wl.hidden, kv, wl.intermediate, wl.batch * wl.seq, wl.layers, esize),
        "7b_like_fp16": analytic_bytes(SEVEN_B["hidden"], SEVEN_B["hidden"], SEVEN_B["intermediate"],
                                       SEVEN_B["tokens"], SEVEN_B["layers"], SEVEN_B["bytes_per_element"])}
    res["verdicts"] = [{"phase": p, **{k: res["speed"][p]["ratio"][k] for k in ("ratio", "ci95", "verdict")}}
                       for p in PHASES]
    return res


def markdown(res: dict) -> str:
    pv, wl, eq = res["provenance"], res["workload"], res["equality"]
    lines = [f"# IA3: ptune-rt vs PEFT ({pv['device']}, {wl['dtype']}, {res['mode']})", "",
             f"Llama-like model: hidden {wl['hidden']}, intermediate {wl['intermediate']}, {wl['layers']} layers, "
             f"batch {wl['batch']} x {wl['seq']} tokens; targets k_proj, v_proj, down_proj (input-scaled); "
             f"{res['repeats']} interleaved rounds.", "", "## Summary", "",
             "| phase | PEFT IA3 (ms) | ptune-rt IA3 (ms) | PEFT / ptune-rt (95% CI) | verdict |", "|---|---|---|---|---|"]
    for p in PHASES:
        s = res["speed"][p]
        r = s["ratio"]
        ci = f" ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if r["ci95"] else ""
        lines.append(f"| {p} | {s['median_s']['peft'] * 1e3:.1f} | {s['median_s']['ptune-rt'] * 1e3:.1f} | "
                     f"{r['ratio']:.2f}x{ci} | {r['verdict']} |")
    lines += ["", f"Equality on one batch: max |logits diff| {eq['max_abs_logits']:.2e}, max |vector grad diff| "
              f"{eq['max_abs_vector_grads']:.2e} over {eq['vectors']} vectors.", "",
              "## Analytic HBM bytes of the forward (fused vs PEFT's chain)", "",
              "| shapes | phase | fused (MiB) | PEFT (MiB) | saved |", "|---|---|---|---|---|"]
    for shapes, d in res["hbm_bytes"].items():
        for phase, v in d.items():
            lines.append(f"| {shapes} | {phase} | {v['model_fused'] / 2**20:.1f} | {v['model_peft'] / 2**20:.1f} | "
                         f"{100 * v['saved_fraction']:.0f}% |")
    lines += ["", "PEFT's output scale writes the base output and reads it back for the multiply; its input scale "
              "writes x * l and the GEMM reads it back. Fused: the scale inside the GEMM (training also keeps "
              "x W^T of an output-scaled layer for the vector's gradient).", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    fig.suptitle(f"IA3: ptune-rt vs PEFT ({res['provenance']['device']}, {res['mode']})")
    colors = {"peft": "tab:orange", "ptune-rt": "tab:blue"}
    for k, n in enumerate(VARIANTS):
        ax1.bar([i + (k - 0.5) * 0.4 for i in range(len(PHASES))],
                [res["speed"][p]["median_s"][n] * 1e3 for p in PHASES], width=0.4, label=LABELS[n], color=colors[n])
    ax1.set_xticks(range(len(PHASES)))
    ax1.set_xticklabels(PHASES)
    ax1.set_ylabel("ms (median)")
    ax1.legend(fontsize=8)
    shapes = list(res["hbm_bytes"])
    labels = [f"{s}\n{p}" for s in shapes for p in res["hbm_bytes"][s]]
    for k, key in enumerate(("model_peft", "model_fused")):
        vals = [res["hbm_bytes"][s][p][key] / res["hbm_bytes"][s][p]["model_peft"] for s in shapes
                for p in res["hbm_bytes"][s]]
        ax2.bar([i + (k - 0.5) * 0.4 for i in range(len(vals))], vals, width=0.4,
                color=colors["peft" if key == "model_peft" else "ptune-rt"],
                label="PEFT chain" if key == "model_peft" else "fused")
    ax2.set_xticks(range(len(labels)))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("forward HBM bytes / PEFT's")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    from ptune_rt.bench.common import add_common_arguments

    p = argparse.ArgumentParser(prog="ptune-rt bench --suite ia3",
                                description="IA3 training step and forward, ptune-rt vs PEFT, plus analytic HBM "
                                            "bytes of the fused forward vs PEFT's chain.")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, --quick 5, --full 31)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function before timing (default 1)")
    add_common_arguments(p, max_wait=600.0, full="the committed run: 31 rounds")
    return p


def main(argv=None, command_argv=None) -> int:
    from ptune_rt.bench.common import default_out_dir, resolve_mode
    from ptune_rt.bench.report import suite_stem, write_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(args, parser, argv, MODE_SETTINGS)
    command_argv = list(command_argv) if command_argv is not None else ["--suite", "ia3"] + argv
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        results = run(args, command_argv)
    paths = write_outputs(results, Path(args.out or default_out_dir()), suite_stem(results, "ia3"), markdown, plot)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
