"""pytest-benchmark suite for the fused LoRA linear: HF PEFT vs ptune-rt (vs the frozen base model).

Uses the same setup factory as ``ptune-rt bench`` (``ptune_rt.bench.workload.build``): same model,
same adapter weights, same inputs. Tiny shapes by default; the issue's workload with
``PTUNE_RT_BENCH_FULL=1``:

    pytest bench/test_bench_lora.py --benchmark-group-by=group
    PTUNE_RT_BENCH_FULL=1 pytest bench/test_bench_lora.py --benchmark-group-by=group

Each speed case also records the bytes autograd saves for backward (``extra_info``), so speed and
memory come from one setup.
"""
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("pytest_benchmark")

from ptune_rt.bench import workload as W  # noqa: E402
from ptune_rt.bench.memory import saved_for_backward  # noqa: E402

FULL = os.environ.get("PTUNE_RT_BENCH_FULL", "0") == "1"
WORKLOAD = W.Workload.default() if FULL else W.Workload.quick()
ROUNDS = 5 if FULL else 10


@pytest.fixture(scope="module")
def setups():
    base = W.build_base(WORKLOAD, W.default_device())
    return {p: W.build(WORKLOAD, p, base=base) for p in (0.0, 0.1)}


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=lambda p: f"dropout{p:g}")
@pytest.mark.parametrize("variant", ["peft", "ptune-rt"])
def test_train_step(benchmark, setups, variant, dropout):
    s = setups[dropout]
    model = s.models[variant]
    model.train()
    benchmark.group = f"train step, dropout {dropout:g}"
    saved = saved_for_backward(model, lambda: W.train_step(model, s.input_ids))
    benchmark.extra_info.update({k: v for k, v in saved.items() if isinstance(v, int)})
    W.zero_grads(model)
    benchmark.pedantic(W.train_step, args=(model, s.input_ids), setup=lambda: W.zero_grads(model),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
    W.zero_grads(model)
    model.eval()


@pytest.mark.parametrize("variant", ["base", "peft", "ptune-rt"])
def test_forward_nograd(benchmark, setups, variant):
    s = setups[0.0]
    model = s.models[variant].eval()
    benchmark.group = "no-grad forward"
    benchmark.pedantic(W.forward_logits, args=(model, s.input_ids), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["base", "peft", "ptune-rt"])
def test_generate(benchmark, setups, variant):
    s = setups[0.0]
    model = s.models[variant].eval()
    benchmark.group = f"greedy generate, {WORKLOAD.gen_new_tokens} new tokens"
    out = benchmark.pedantic(W.generate, args=(model, s.prompt_ids, WORKLOAD.gen_new_tokens), rounds=ROUNDS,
                             iterations=1, warmup_rounds=1)
    assert out.shape[1] == s.prompt_ids.shape[1] + WORKLOAD.gen_new_tokens
