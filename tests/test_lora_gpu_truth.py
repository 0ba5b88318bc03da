"""What the interpreter would hide on a GPU, for the LoRA kernels: the TF32 setting HF Trainer makes,
64-bit offsets, bucketed tuning keys, strided bias, device-side dropout seeds, split-K."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ptune_rt.kernels import _triton_utils as U
from ptune_rt.kernels import lora as K
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.lora_cases import make_case, reference_and_gold

FUSED = K.FUSED_TUNERS[torch.float16]  # the tuning tests run fp16 layers


def _run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_triton_launches_under_the_new_tf32_api():
    """HF ``TrainingArguments(tf32=True)`` sets ``torch.backends.cuda.matmul.fp32_precision`` on torch >= 2.9;
    reading the legacy ``allow_tf32`` afterwards raises. Every launch reads the setting (a fresh process:
    the setting is global and cannot be unset to the legacy state)."""
    proc = _run_python("""
        import torch
        from ptune_rt.kernels import lora as K
        from ptune_rt.kernels import prefix_attention as PA
        from ptune_rt.kernels._triton_utils import fp32_input_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32"   # what TrainingArguments(tf32=True) does
        try:
            torch.backends.cuda.matmul.allow_tf32
        except RuntimeError:
            pass
        else:
            raise SystemExit("torch no longer raises on the legacy read: this test lost its point")
        assert fp32_input_precision() == "tf32"
        x, w, a, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
        y, S = K.lora_forward(x, w, None, a, b, 2.0)
        assert torch.allclose(y, x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-2)
        q = torch.randn(1, 2, 3, 16)
        o, lse = PA.prefix_attention_forward(q, q, q, torch.randn(2, 4, 16), torch.randn(2, 4, 16))
        torch.backends.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "none"   # inherits the global "ieee"
        assert fp32_input_precision() == "ieee"
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_legacy_tf32_flag_still_followed():
    proc = _run_python("""
        import torch
        from ptune_rt.kernels._triton_utils import fp32_input_precision
        assert fp32_input_precision() == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True   # the legacy API alone
        assert fp32_input_precision() == "tf32"
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_offsets_past_2_31_elements():
    """x is a strided view of 260 rows whose row 256 starts at element 2**31 (4 GiB of fp16, of which
    only the rows used are touched): a 32-bit ``tile row * stride`` wraps there and reads other
    memory. Run in a subprocess so that a wild read fails this test instead of the test session."""
    proc = _run_python("""
        import torch
        from ptune_rt.kernels import lora as K
        M, Kd, N, r = 260, 64, 48, 4
        stride = 2**23
        base = torch.empty((M - 1) * stride + Kd, dtype=torch.float16)
        x = base.as_strided((M, Kd), (stride, 1))
        x.copy_(torch.randn(M, Kd))
        assert (M - 1) * x.stride(0) >= 2**31
        w = torch.randn(N, Kd).half()
        a, b = torch.randn(r, Kd), torch.randn(N, r)
        y, S = K.lora_forward(x, w, None, a, b, 2.0)
        ref = x.float() @ w.float().T + 2.0 * (x.float() @ a.T) @ b.T
        err = (y.float() - ref).abs().max().item()
        assert err < 0.02 * ref.abs().max().item(), err
        dy = torch.randn(M, N).half()
        dx, da, db = K.lora_backward(dy, x, S, w, a, b, 2.0)
        ref_da = 2.0 * (dy.float() @ b).T @ x.float()
        assert (da - ref_da).abs().max().item() < 0.02 * ref_da.abs().max().item()
        try:   # a stride whose in-tile offsets would pass 2**31 is refused, not miscomputed
            K.lora_forward(base.as_strided((2, Kd), (2**30, 1)), w, None, a, b, 2.0)
        except ValueError as e:
            assert "stride" in str(e)
        else:
            raise AssertionError("a 2**30 row stride was accepted")
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_bias(dtype):
    M, Kd, N, r = 19, 40, 33, 4
    x, w, b, a, bb = make_case(M, Kd, N, r, dtype)
    wide = torch.zeros(N, 2, dtype=dtype)
    wide[:, 0] = b
    bias = wide[:, 0]
    assert bias.stride(0) == 2
    y, _ = K.lora_forward(x, w, bias, a, bb, 2.0)
    dy = torch.zeros(M, N, dtype=dtype)
    ref, gold = reference_and_gold(x, w, b, a, bb, 2.0, None, 0.0, dy)
    assert_close_to_reference(y, ref[0], gold[0], dtype, "y with a strided bias")


def test_dropout_seed_is_read_on_the_device():
    """The kernels read the seed from a tensor at launch time (what a CUDA graph replays with), never
    through the host: a new value in the same tensor gives a new mask, an equal value the same mask."""
    M, Kd, N, r = 20, 48, 24, 4
    x, w, b, a, bb = make_case(M, Kd, N, r, torch.float32)
    seed = torch.tensor([1234], dtype=torch.int64)
    item = torch.Tensor.item

    def no_host_read(t):
        if t is seed:
            raise AssertionError("the seed was read on the host")
        return item(t)

    torch.Tensor.item = no_host_read
    try:
        _, S1 = K.lora_forward(x, w, b, a, bb, 2.0, 0.5, seed)
        seed.fill_(99)  # a replay with a new draw in the same tensor
        _, S2 = K.lora_forward(x, w, b, a, bb, 2.0, 0.5, seed)
    finally:
        torch.Tensor.item = item
    _, S3 = K.lora_forward(x, w, b, a, bb, 2.0, 0.5, 1234)
    assert torch.equal(S1, S3) and not torch.equal(S1, S2)


def test_op_draws_the_triton_seed_on_the_activations_device(monkeypatch):
    """For the Triton kernels on CUDA the op draws the seed with a device-side randint (captured into a
    CUDA graph, it draws anew at every replay); the torch path keeps its CPU seed."""
    import importlib
    op = importlib.import_module("ptune_rt.ops.lora_linear")
    draws = []
    real = torch.randint

    def recording_randint(*args, device=None, **kw):
        draws.append(torch.device(device) if device is not None else torch.device("cpu"))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "randint", recording_randint)
    op._seed_tensor(0.1, None, torch.device("cuda"))
    op._seed_tensor(0.1, None)
    assert [d.type for d in draws] == ["cuda", "cpu"]


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_k_skinny_matches_reference_and_is_deterministic(split_k, dtype):
    M, Kd, R = 23, 300, 16
    x = torch.randn(M, Kd).to(dtype)
    wt = torch.randn(R, Kd)
    out = K.skinny_matmul(x, wt, scale=0.5, split_k=split_k)
    again = K.skinny_matmul(x, wt, scale=0.5, split_k=split_k)
    assert torch.equal(out, again)
    ref = 0.5 * (x.float() @ wt.T)
    gold = 0.5 * (x.double() @ wt.double().T)
    assert_close_to_reference(out, ref, gold, torch.float32, f"skinny split_k={split_k}")


def test_split_k_fills_the_gpu_where_m_x_r_cannot():
    # decode shrink: 1 row x r 16 against K = 4096 -> several splits
    splits, chunk = K.skinny_split_k(1, 16, 4096, 16, 16, 64)
    assert splits > 1 and splits * chunk >= 4096 and (splits - 1) * chunk < 4096
    # dB of a 4096-wide layer over 16384 tokens: M = N = 4096 rows, the reduction over tokens
    splits, _ = K.skinny_split_k(4096, 16, 16384, 64, 16, 16)
    assert splits * (4096 // 64) >= K.SPLIT_K_TARGET_PROGRAMS
    # already enough programs, or too little K: no split
    assert K.skinny_split_k(65536, 16, 4096, 64, 16, 16)[0] == 1
    assert K.skinny_split_k(1, 16, 200, 16, 16, 64)[0] == 1
    assert K.skinny_split_k(5, 16, 0, 16, 16, 64) == (1, 64)


class _Recorder:
    def __init__(self):
        self.configs = []

    def __call__(self, kernel, grid, config, *args, **flags):
        U.check_grid(grid)
        self.configs.append((kernel, config))


@pytest.fixture
def tuned_launches(monkeypatch):
    """Launches choose their config as on CUDA (the tuner, decode configs) with the benchmark stubbed
    and the kernels not run: the key logic alone."""
    for tuner in (*K.FUSED_TUNERS.values(), K.SKINNY_TUNER):
        monkeypatch.setattr(tuner, "chosen", {})
        monkeypatch.setattr(tuner, "tunings", 0)
    timed = []

    def fake_benchmark(run):
        timed.append(run)
        return float(len(timed) % 3)

    monkeypatch.setattr(U, "benchmark", fake_benchmark)
    monkeypatch.setattr(K, "tune_on_device", lambda device: True)
    rec = _Recorder()
    monkeypatch.setattr(K, "launch", rec)
    return rec


def _train_step(M, Kd=64, N=48, r=8, p=0.0, dtype=torch.float16):
    x, w, b, a, bb = make_case(M, Kd, N, r, dtype)
    y, S = K.lora_forward(x, w, b, a, bb, 2.0, p, 7)
    K.lora_backward(torch.randn(M, N).to(dtype), x, S, w, a, bb, 2.0, p, 7)


def test_decode_loop_never_tunes(tuned_launches):
    for _ in range(64):  # 64 decode steps of 4 rows: the fixed decode configs
        x, w, b, a, bb = make_case(4, 64, 48, 8, torch.float16)
        K.lora_forward(x, w, b, a, bb, 2.0)
    assert FUSED.tunings == K.SKINNY_TUNER.tunings == 0
    assert {str(c) for _, c in tuned_launches.configs} == {str(K.FUSED_DECODE_CONFIG), str(K.SKINNY_DECODE_CONFIG)}


def test_dynamic_padding_epoch_tunes_once_per_bucket(tuned_launches):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(30, 2000, (20,), generator=g).tolist()
    for M in lengths:
        _train_step(M)
    buckets = {U.pow2_bucket(m) for m in lengths}
    # fused: forward y and dX (different layouts and shapes) per bucket; skinny: S, G, dB, dA shapes
    assert 0 < FUSED.tunings <= 2 * len(buckets)
    assert K.SKINNY_TUNER.tunings <= 4 * len(buckets) + 4
    tunings = FUSED.tunings, K.SKINNY_TUNER.tunings
    for M in lengths:  # a second epoch: everything cached
        _train_step(M)
    assert (FUSED.tunings, K.SKINNY_TUNER.tunings) == tunings


def test_forward_and_dx_do_not_share_a_tuned_config(tuned_launches):
    """Square layers give forward and dX the same M, N, K: the weight layout and the dropout flag
    keep their keys apart."""
    _train_step(256, Kd=64, N=64, p=0.1)
    keys = list(FUSED.chosen)
    assert len(keys) == 2 and keys[0] != keys[1]
