"""The Triton path on a CPU-only machine: op counts, kernel launches and equality on a tiny model.

Runs in its own process with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels are
decorated, so it cannot be switched on inside a process that already imported them). The model
is tiny because the interpreter executes kernels element-block by element-block in numpy: the
point is what gets dispatched and launched, and that the kernels compute the same thing as PEFT,
not how fast. Prints one JSON object on stdout.

    TRITON_INTERPRET=1 python -m ptune_rt.bench.triton_probe
"""
from __future__ import annotations

import json
import os
import sys


def probe() -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1")
    from ptune_rt.bench import workload as W
    from ptune_rt.bench.opcount import count_ops
    from ptune_rt.kernels import lora as K

    launches = {"n": 0}
    real_launch = K.launch

    def counting_launch(*args, **kwargs):
        launches["n"] += 1
        return real_launch(*args, **kwargs)

    K.launch = counting_launch
    try:
        wl = W.Workload(hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64, batch=1, seq=8,
                        r=4, alpha=8.0, gen_prompt=4, gen_new_tokens=2)
        s = W.build(wl, dropout=0.0, device="cpu", backend="triton")
        n = wl.n_lora_linears
        backends = s.ptune_backends()

        launches["n"] = 0
        fwd_ops = count_ops(s.ptune, lambda: W.forward_logits(s.ptune, s.input_ids), n, descend=False)
        fwd_launches = launches["n"]

        s.ptune.train()
        launches["n"] = 0
        train_fwd_ops = count_ops(s.ptune, lambda: s.ptune(input_ids=s.input_ids, labels=s.input_ids), n,
                                  descend=False)
        W.zero_grads(s.ptune)
        s.ptune.eval()

        logits_pt = W.forward_logits(s.ptune, s.input_ids)
        logits_peft = W.forward_logits(s.peft, s.input_ids)

        res = {}
        for name, m in (("peft", s.peft), ("ptune-rt", s.ptune)):
            m.train()
            W.zero_grads(m)
            launches["n"] = 0
            out = m(input_ids=s.input_ids, labels=s.input_ids)
            after_fwd = launches["n"]
            out.loss.backward()
            res[name] = {"loss": float(out.loss), "fwd_launches": after_fwd, "bwd_launches": launches["n"] - after_fwd,
                         "grads": {n_: p.grad.detach().clone() for n_, p in m.named_parameters() if p.requires_grad}}
        g_peft = {k.removeprefix("base_model.model."): v for k, v in res["peft"]["grads"].items()}
        grad_diff = max(float((v - g_peft[k]).abs().max()) for k, v in res["ptune-rt"]["grads"].items())
        grad_scale = max(float(v.abs().max()) for v in g_peft.values())
    finally:
        K.launch = real_launch
    return {
        "workload": wl.to_dict(),
        "backends": backends,
        "custom_ops_per_forward": fwd_ops["custom"],
        "compute_ops_per_lora_linear_forward": fwd_ops["per_lora_linear_compute"],
        "all_ops_per_lora_linear_forward": fwd_ops["per_lora_linear_all"],
        "ops_per_lora_linear_forward_by_name": fwd_ops["per_lora_linear_ops"],
        "compute_ops_per_lora_linear_train_forward": train_fwd_ops["per_lora_linear_compute"],
        "ops_per_lora_linear_train_forward_by_name": train_fwd_ops["per_lora_linear_ops"],
        "kernel_launches_per_lora_linear_forward": fwd_launches / n,
        "kernel_launches_per_lora_linear_backward": res["ptune-rt"]["bwd_launches"] / n,
        "kernel_launches_per_lora_linear_train_forward": res["ptune-rt"]["fwd_launches"] / n,
        "equality": {
            "logits_max_abs_diff": float((logits_pt - logits_peft).abs().max()),
            "logits_max_abs": float(logits_peft.abs().max()),
            "loss_abs_diff": abs(res["ptune-rt"]["loss"] - res["peft"]["loss"]),
            "adapter_grad_max_abs_diff": grad_diff,
            "adapter_grad_max_abs": grad_scale,
        },
    }


def main() -> int:
    json.dump(probe(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
