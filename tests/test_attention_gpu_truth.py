"""What the interpreter hides about the prefix-attention and prompt-input kernels on a GPU, checked
without one: 64-bit offsets past 2**31 elements, CUDA's grid limits, and config tuning keyed on
bucketed sizes (DESIGN.md section 5)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ptune_rt.kernels import _triton_utils as TU
from ptune_rt.kernels import prefix_attention as K
from ptune_rt.kernels import prompt_inputs as PI
from ptune_rt.ops.prefix_attention import prefix_attention
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.attention_cases import reference_and_gold

# ----------------------------------------------------------------------------------------
# 64-bit offsets: views whose last row / task / hidden column lies past element 2**31
# ----------------------------------------------------------------------------------------

#: Element stride between rows (and tasks) of the views: index 2 lands at 2**31 + 8192, so a
#: 32-bit ``index * stride`` wraps negative. The buffer is reserved, not touched: only the few
#: elements the views use become resident.
_STRIDE = 2**30 + 4096

_PRELUDE = f"""
import resource, torch
from ptune_rt.testing import assert_close_to_reference
STRIDE = {_STRIDE}
g = torch.Generator().manual_seed(0)

def view(buf, shape, offset, lead_stride=STRIDE):
    '''A [n, *shape] view of buf: element (i, ...) at offset + i * lead_stride, the rest contiguous.'''
    strides, inner = [], 1
    for n in reversed(shape):
        strides.insert(0, inner)
        inner *= n
    v = buf.as_strided((3, *shape), (lead_stride, *strides), offset)
    for i in range(3):  # writes only the elements the view holds
        v[i].copy_(torch.randn(shape, generator=g).to(buf.dtype))
    return v

def report():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rss < 2048, f"touched {{rss:.0f}} MB: the test must only touch the elements it uses"
    print("OK", round(rss))
"""

_ATTENTION = """
from ptune_rt.kernels import prefix_attention as K
from ptune_rt.testing.attention_cases import reference_and_gold
Hq, Hkv, L, S, P, D = 2, 1, 5, 7, 3, 32
buf = torch.empty(2 * STRIDE + 4096, dtype=torch.float16)
sizes = [(Hq, L, D), (Hkv, S, D), (Hkv, S, D), (Hq, L, D), (Hkv, P, D), (Hkv, P, D)]
offsets = [0]
for s in sizes:  # one row's (or task's) q, k, v, dO and prefix next to each other
    offsets.append(offsets[-1] + s[0] * s[1] * s[2])
q, k, v, do, pk, pv = (view(buf, s, o) for s, o in zip(sizes, offsets))  # rows and tasks STRIDE apart
mask_buf = torch.empty(2 * STRIDE + 64, dtype=torch.bool)
kv_mask = mask_buf.as_strided((3, S), (STRIDE, 1))
kv_mask.fill_(True)
kv_mask[2, :2] = False  # the last row is left-padded
task_ids = torch.tensor([2, 0, 2], dtype=torch.int32)  # the last task's prefix lies past 2**31 too
assert q.storage_offset() + 2 * q.stride(0) > 2**31 and pk.storage_offset() + 2 * pk.stride(0) > 2**31
out, lse = K.prefix_attention_forward(q, k, v, pk, pv, kv_mask, task_ids, True)
grads = K.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, kv_mask, task_ids, True, num_tasks=3)
ref, gold = reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, True, do)
for name, o, r, gd in zip(("out", "lse", "dq", "dk", "dv", "dpk", "dpv"), (out, lse) + tuple(grads), ref, gold):
    assert_close_to_reference(o, r.float() if name == "lse" else r, gd, torch.float16, name)
report()
"""

_PROMPT_INPUTS = """
from ptune_rt.kernels.prompt_inputs import build_inputs_embeds
from ptune_rt.reference.prompt_inputs import build_inputs_embeds_reference
V, H, P = 11, 3, 4
buf = torch.empty(2 * STRIDE + 4096, dtype=torch.float16)
emb = buf.as_strided((V, H), (1, STRIDE))  # hidden column 2 of every token lies past 2**31
for h in range(H):
    emb[:, h].copy_(torch.randn(V, generator=g).half())
prompts = view(buf, (P, H), V + 64, lead_stride=STRIDE)  # tasks STRIDE apart, task 2 past 2**31
src = torch.cat([-(torch.arange(P) + 1).expand(3, -1), torch.randint(0, V, (3, 9), generator=g)], dim=1)
task_ids = torch.tensor([2, 1, 2], dtype=torch.int32)
out = build_inputs_embeds(src, emb, prompts, task_ids)
assert torch.equal(out, build_inputs_embeds_reference(src, emb, prompts, task_ids))
report()
"""


def _run_interpreted(body: str) -> None:
    """Run ``body`` under the interpreter in a subprocess: a wrapped 32-bit offset reads outside the
    buffer, which can kill the process; the test then fails instead of pytest."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_PRELUDE) + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, \
        f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_attention_rows_and_tasks_past_2_31_elements():
    """Forward, dQ and dK/dV on q/k/v/dO/prefix views whose last row and task start past element
    2**31 (and a padding mask whose last row does): a 32-bit row * stride wraps there."""
    _run_interpreted(_ATTENTION)


def test_prompt_inputs_hidden_columns_past_2_31_elements():
    """The input builder on an embedding view whose hidden columns are 2**30 elements apart and a
    prompt stack whose last task lies past 2**31: a 32-bit column * stride wraps there."""
    _run_interpreted(_PROMPT_INPUTS)


# ----------------------------------------------------------------------------------------
# Launch grids within CUDA's limits (axes y and z stop at 65,535)
# ----------------------------------------------------------------------------------------


@pytest.fixture
def recorded_grids(monkeypatch):
    """Grids of every launch the wrappers make, without running a kernel (the wrappers run on meta tensors)."""
    grids = []

    def record(kernel, grid, config, *args, **constexprs):
        grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, tuple(grid)))

    for module in (K, PI):
        monkeypatch.setattr(module, "launch", record)
        monkeypatch.setattr(module, "_check_device", lambda *a: None)
    return grids


def test_launch_grids_fit_cuda_limits_beyond_65535_rows_times_heads(recorded_grids):
    """2,048 decode rows x 32 query heads (65,536 (row, head) programs), with and without tasks,
    forward and backward, and 70,000 rows of prompt inputs: every grid must be launchable."""
    meta = dict(device="meta", dtype=torch.float16)
    B, Hq, Hkv, S, P, D, T = 2048, 32, 8, 64, 16, 128, 3
    q = torch.empty(B, Hq, 1, D, **meta)
    cache = torch.empty(B, Hkv, S, D, **meta)
    pk, pks = torch.empty(Hkv, P, D, **meta), torch.empty(T, Hkv, P, D, **meta)
    mask = torch.empty(B, S, device="meta", dtype=torch.bool)
    tasks = torch.empty(B, device="meta", dtype=torch.int32)
    K.prefix_attention_decode(q, cache, cache, pk, pk, mask)
    o, lse = K.prefix_attention_forward(q, cache, cache, pks, pks, mask, tasks, True)
    K.prefix_attention_backward(o, q, cache, cache, pks, pks, o, lse, mask, tasks, True, num_tasks=T)
    PI.build_inputs_embeds(torch.empty(70_000, 24, device="meta", dtype=torch.int64),
                           torch.empty(32000, 4096, **meta), torch.empty(T, 20, 4096, **meta),
                           torch.empty(70_000, device="meta", dtype=torch.int32))
    kernels = {name for name, _ in recorded_grids}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_build_inputs_kernel"}
    assert max(g[0] for _, g in recorded_grids) > TU.MAX_GRID_YZ  # the test does reach the limit
    for name, grid in recorded_grids:
        TU.check_grid(grid)  # raises on an axis y or z above 65,535


# ----------------------------------------------------------------------------------------
# Config tuning on CUDA: bucketed keys, decode never tunes
# ----------------------------------------------------------------------------------------


class CudaTuning:
    """Config choice as on CUDA: fresh tuners over the shipped GPU configs, ``benchmark`` a stub that
    gives every config a fake time (nothing is timed). ``lookups`` holds the key of every tuner
    look-up. Launches only check their grid unless ``run`` is set; then the chosen GPU config runs
    in the interpreter."""

    def __init__(self, monkeypatch):
        self.lookups, self.run = [], False
        monkeypatch.setattr(K, "tunes_configs", lambda x: True)
        monkeypatch.setattr(K, "_TUNERS", {})
        fake_times = iter(range(10**9))
        monkeypatch.setattr(TU, "benchmark", lambda run: float(next(fake_times) % 7))
        pick, launch = TU.ConfigTuner.pick, K.launch

        def recording_pick(tuner, key, run):
            self.lookups.append(key)
            return pick(tuner, key, run)

        def maybe_launch(kernel, grid, config, *args, **constexprs):
            TU.check_grid(grid)
            if self.run:
                launch(kernel, grid, config, *args, **constexprs)

        monkeypatch.setattr(TU.ConfigTuner, "pick", recording_pick)
        monkeypatch.setattr(K, "launch", maybe_launch)


@pytest.fixture
def cuda_tuning(monkeypatch):
    return CudaTuning(monkeypatch)


def _tunings() -> dict:
    return {name: t.tunings for name, t in K._TUNERS.items()}


def test_decode_loop_takes_a_fixed_config_and_never_tunes(cuda_tuning):
    """64 decode steps with a cache growing by one key per step: one query per row, so the fixed
    decode config runs and nothing is tuned (an exact-size key would tune at every step)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, P = 2, 4, 2, 32, 5
    pk, pv = torch.randn(Hkv, P, D, generator=g).half(), torch.randn(Hkv, P, D, generator=g).half()
    k = torch.randn(B, Hkv, 64, D, generator=g).half()
    v = torch.randn(B, Hkv, 64, D, generator=g).half()
    with torch.no_grad():
        for S in range(1, 65):
            cuda_tuning.run = S == 64  # the last step runs its kernels (the others only pick configs)
            q = torch.randn(B, Hq, 1, D, generator=g).half()
            out = prefix_attention(q, k[:, :, :S], v[:, :, :S], pk, pv, backend="triton")
    assert sum(_tunings().values()) == 0 and not cuda_tuning.lookups
    ref, gold = reference_and_gold(q, k[:, :, :64], v[:, :, :64], pk, pv, None, None, True, torch.zeros_like(q))
    assert_close_to_reference(out, ref[0], gold[0], torch.float16, "last decode step")


def test_dynamic_padding_epoch_tunes_once_per_bucket(cuda_tuning):
    """An epoch of 20 batches padded to their own length (30..500 tokens), forward and backward:
    each kernel and launch kind tunes at most once per power-of-two bucket of the length, and the
    forward, dQ and dK/dV launches never share a key."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, P = 1, 2, 1, 32, 4
    lengths = torch.randint(30, 501, (20,), generator=g).tolist()
    pk = torch.randn(Hkv, P, D, generator=g, requires_grad=True)
    pv = torch.randn(Hkv, P, D, generator=g, requires_grad=True)
    for i, L in enumerate(lengths):
        cuda_tuning.run = i == len(lengths) - 1  # the last batch runs its kernels
        q, k, v = (torch.randn(B, h, L, D, generator=g).half().requires_grad_() for h in (Hq, Hkv, Hkv))
        out = prefix_attention(q, k, v, pk, pv, backend="triton")
        do = torch.randn(out.shape, generator=g).half()
        out.backward(do)
    buckets = {TU.pow2_bucket(L) for L in lengths}
    assert any(t.tunings for t in K._TUNERS.values())  # launches above decode size are tuned
    kinds = {}  # (kernel, IS_PREFIX) -> keys looked up
    for key in cuda_tuning.lookups:
        kinds.setdefault((key[0], "IS_PREFIX=True" in key), set()).add(key)
    assert set(kinds) == {("fwd", False), ("dq", False), ("dkdv", False), ("dkdv", True)}
    for kind, keys in kinds.items():
        assert len(keys) <= len(buckets), (kind, len(keys), len(buckets))
    for (name, dtype, block), tuner in K._TUNERS.items():
        launch_kinds = 2 if name == "dkdv" else 1
        assert tuner.tunings <= launch_kinds * len(buckets), (name, tuner.tunings)
        assert tuner.tunings == (0 if len(tuner.configs) == 1 else len(tuner.chosen))
    fwd, dq, dkdv = ({k for k in cuda_tuning.lookups if k[0] == n} for n in ("fwd", "dq", "dkdv"))
    assert not (fwd & dq) and not (fwd & dkdv) and not (dq & dkdv)
    # the last batch ran the tuned GPU configs in the interpreter: still right
    ref, gold = reference_and_gold(q, k, v, pk.detach(), pv.detach(), None, None, True, do)
    for name, got, r, gd in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                (ref[0],) + ref[2:5], (gold[0],) + gold[2:5]):
        assert_close_to_reference(got, r, gd, torch.float16, f"tuned configs: {name}")


def test_tuning_keys_hold_every_flag():
    """Launches that differ only in a flag (causal, padding mask, tasks, prefix pass, input
    precision) or in dtype get different keys; sizes within one bucket share one."""
    base = dict(HEAD_DIM=64, IS_CAUSAL=True, HAS_KVMASK=False, HAS_TASKS=False, INPUT_PRECISION="ieee", BLOCK_D=64)
    key = K.tuning_key("fwd", torch.float16, 300, 300, 20, base)
    assert K.tuning_key("fwd", torch.float16, 257, 511, 17, base) == key
    for flag, value in (("IS_CAUSAL", False), ("HAS_KVMASK", True), ("HAS_TASKS", True),
                        ("INPUT_PRECISION", "tf32"), ("HEAD_DIM", 48)):
        assert K.tuning_key("fwd", torch.float16, 300, 300, 20, {**base, flag: value}) != key, flag
    assert K.tuning_key("dkdv", torch.float16, 300, 300, 20, {**base, "IS_PREFIX": True}) != \
        K.tuning_key("dkdv", torch.float16, 300, 300, 20, {**base, "IS_PREFIX": False})
    assert K.tuning_key("fwd", torch.bfloat16, 300, 300, 20, base) != key
    assert K.tuning_key("fwd", torch.float16, 600, 300, 20, base) != key
