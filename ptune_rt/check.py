"""``ptune-rt check``: numerical-equality report of every fused kernel against its eager reference.

For every case it prints the kernel's max error to a float64 reference, eager PyTorch's own error
in the same dtype, the bound of the rule in ``ptune_rt.testing.tolerances`` and the verdict.
Without CUDA the kernels run through Triton's interpreter (the command re-runs itself with
``TRITON_INTERPRET=1``); with CUDA they run compiled, on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _cases():
    import torch

    from ptune_rt.testing.lora_cases import DTYPES, SHAPES

    for dtype in DTYPES:
        for shape in SHAPES:
            yield "lora", dtype, shape, {}
        yield "lora", dtype, (45, 70, 50, 8), {"dropout_p": 0.3}
        yield "lora", dtype, (45, 70, 50, 8), {"conv1d": True, "strided": True, "bias": False}
        yield "lora", dtype, (45, 70, 50, 8), {"adapter_dtype": dtype}
    from ptune_rt.testing.attention_cases import CASES
    for dtype in DTYPES:
        for case in CASES:
            yield "prefix", dtype, case, {}
    for dtype in DTYPES:  # (M, K, N): both IA3 scales on one odd-sized linear
        yield "ia3", dtype, (45, 70, 50), {"scale": "output"}
        yield "ia3", dtype, (45, 70, 50), {"scale": "input"}
    for dtype in DTYPES:  # (tokens, V, D, r): more tokens than ids (repeats), a rank above one tile
        yield "lora_embedding", dtype, (39, 37, 48, 4), {}
        yield "lora_embedding", dtype, (16, 37, 48, 20), {}
    del torch


def _run_prefix(dtype, case, device):
    from ptune_rt.kernels import prefix_attention as K
    from ptune_rt.testing import error_report
    from ptune_rt.testing.attention_cases import make_case, reference_and_gold

    q, k, v, pk, pv, kv_mask, task_ids, do = make_case(*case, dtype, device=device)
    causal = case[7]
    pk, pv = pk.to(dtype), pv.to(dtype)
    if q.shape[2] == 1 and task_ids is None:
        out, lse = K.prefix_attention_decode(q, k, v, pk, pv, kv_mask)
    else:
        out, lse = K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, task_ids, causal)
    grads = K.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, kv_mask, task_ids, causal)
    ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, causal, do)
    names = ("out", "lse", "dq", "dk", "dv", "dpk", "dpv")
    return [{"output": n, **error_report(o, r, g, dtype)} for n, o, r, g in zip(names, (out, lse, *grads), ref, gold)]


def _run_lora(dtype, shape, opts, device):
    import torch

    from ptune_rt.kernels import lora as K
    from ptune_rt.kernels._triton_utils import dropout_mask
    from ptune_rt.testing import error_report
    from ptune_rt.testing.lora_cases import make_case, reference_and_gold

    M, K_, N, r = shape
    p = opts.get("dropout_p", 0.0)
    adapter_dtype = opts.get("adapter_dtype", torch.float32)
    x, w, b, a, bb = make_case(M, K_, N, r, dtype, adapter_dtype, bias=opts.get("bias", True),
                               conv1d=opts.get("conv1d", False), strided=opts.get("strided", False),
                               device=device)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    seed = 1234
    y, S = K.lora_forward(x, w, b, a, bb, 0.5, p, seed)
    dx, da, db = K.lora_backward(dy, x, S, w, a, bb, 0.5, p, seed)
    keep = dropout_mask((M, K_), p, seed, device) if p > 0 else None
    ref, gold = reference_and_gold(x, w, b, a, bb, 0.5, keep, p, dy)
    rows = []
    for what, out, r_, g_ in zip(("y", "dx", "dA", "dB"), (y, dx, da.to(adapter_dtype), db.to(adapter_dtype)),
                                 ref, gold):
        rule = dtype if what in ("y", "dx") else adapter_dtype  # dA, dB: adapter-dtype arithmetic
        rows.append({"output": what, **error_report(out, r_, g_, rule)})
    return rows


def _run_small_op(kernel, dtype, shape, opts, device):
    """The IA3 and LoRA-embedding ops (Triton backend) through gpu-check's checker at a small shape."""
    from ptune_rt.gpu_check import cases as C
    from ptune_rt.gpu_check import numerics

    dt = str(dtype).replace("torch.", "")
    if kernel == "ia3":
        case = C.IA3Case(*shape, dt, feedforward=opts["scale"] == "input")
    else:
        case = C.LoraEmbeddingCase(*shape, dt)
    return numerics.CHECKS[case.kind](case, device)["rows"]


def _run(kernel, dtype, case, opts, device):
    if kernel == "lora":
        return _run_lora(dtype, case, opts, device)
    if kernel == "prefix":
        return _run_prefix(dtype, case, device)
    return _run_small_op(kernel, dtype, case, opts, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptune-rt check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the report as JSON to this path")
    parser.add_argument("--kernel", choices=("lora", "prefix", "ia3", "lora_embedding"),
                        help="check only this kernel family")
    parser.add_argument("--quick", action="store_true", help="only the first two cases per kernel and dtype")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels must be decorated under the interpreter: re-run in a fresh process.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "ptune_rt.check", *(argv or [])], env=env)

    from ptune_rt.testing.tolerances import TOLERANCES

    mode = "compiled on " + torch.cuda.get_device_name() if device == "cuda" else "Triton interpreter on CPU"
    print(f"ptune-rt check: fused kernels vs eager reference vs float64 ({mode})")
    print("rule: max|kernel - fp64| <= factor * max|eager - fp64| + floor * max(1, max|fp64|); "
          + ", ".join(f"{str(d).replace('torch.', '')}: factor {t.factor}, floor {t.floor:g}"
                      for d, t in TOLERANCES.items()))
    header = f"{'kernel':<16}{'dtype':<10}{'M x K x N x r':<18}{'variant':<34}{'out':<5}{'kernel err':>12}" \
             f"{'eager err':>12}{'bound':>12}  ok"
    print(header)
    print("-" * len(header))
    report, failures = [], 0
    seen: dict = {}
    for kernel, dtype, shape, opts in _cases():
        case = shape
        if args.kernel and kernel != args.kernel:
            continue
        seen[(kernel, dtype)] = seen.get((kernel, dtype), 0) + 1
        if args.quick and seen[(kernel, dtype)] > 2:
            continue
        variant = ",".join(f"{k}={str(v).replace('torch.', '')}" for k, v in opts.items()) or "-"
        if kernel == "prefix":
            from ptune_rt.testing.attention_cases import case_id
            variant, shape = case_id(shape), ()
        try:
            rows = _run(kernel, dtype, case, opts, device)
        except Exception as exc:  # report and continue: one broken case must not hide the others
            rows = [{"output": "all", "err": float("nan"), "ref_err": float("nan"), "bound": float("nan"),
                     "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
        for row in rows:
            failures += not row["ok"]
            print(f"{kernel:<16}{str(dtype).replace('torch.', ''):<10}{'x'.join(map(str, shape)):<18}"
                  f"{variant:<34}{row['output']:<5}{row['err']:>12.3e}{row['ref_err']:>12.3e}"
                  f"{row['bound']:>12.3e}  {'yes' if row['ok'] else 'NO ' + row.get('error', '')}")
            report.append({"kernel": kernel, "dtype": str(dtype), "shape": list(shape), "variant": variant, **row})
    print(f"\n{len(report) - failures} passed, {failures} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "mode": mode, "rows": report}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
