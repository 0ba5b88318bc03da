"""Property-based fuzzing of the three fused ops, on the Triton kernels (interpreter) and the torch
path, against the eager reference and float64 by the project's tolerance rule
(``ptune_rt.testing.assert_close_to_reference``; never loosened here: a failure is a bug).

Hypothesis draws shapes (odd sizes, rank 1, P = 1, L = 1, GQA groups), dtypes, strides
(transposed and sliced views), padding, tasks of every integer dtype, dropout and scales. The
example budget per test comes from the hypothesis profile (``tests/conftest.py``): ``ci`` by
default, ``--hypothesis-profile=long`` for a longer run; each test takes ``EXAMPLES[name]`` of the
profile's ``max_examples`` per 100. The ci budget (100 LoRA, 100 prefix, 400 prompt examples) runs
in under 3 minutes on the 2-core CI machine; long draws ten times as many (a long prefix run took 18 min).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptune_rt.ops.lora_linear import _torch_keep, lora_linear
from ptune_rt.ops.prefix_attention import prefix_attention
from ptune_rt.ops.prompt_inputs import build_inputs_embeds
from ptune_rt.reference.prefix_attention import prefix_attention_reference
from ptune_rt.reference.prompt_inputs import build_inputs_embeds_reference
from ptune_rt.testing import assert_close_to_reference
from ptune_rt.testing.lora_cases import reference_and_gold as lora_reference_and_gold

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
BACKENDS = ["torch", "triton"]
#: Examples per test for every 100 of the profile's max_examples (the interpreter's cost differs by op).
EXAMPLES = {"lora": 100, "prefix": 100, "prompt": 400}


def budget(name: str):
    return settings(max_examples=max(1, EXAMPLES[name] * settings.default.max_examples // 100))


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (2D or more) in another memory layout: "contiguous", "transposed"
    (the transpose of a contiguous transpose: column-major in the last two dims) or "sliced" (every
    other element of a twice-as-wide last dimension)."""
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


LAYOUTS = ["contiguous", "transposed", "sliced"]


# ----------------------------------------------------------------------------------------------
# LoRA linear
# ----------------------------------------------------------------------------------------------

def sizes(small: int, large: int):
    """Mostly sizes within one or two tiles, sometimes several tiles (and their ragged edges)."""
    return st.one_of(st.integers(1, small), st.integers(small + 1, large))


@st.composite
def lora_cases(draw):
    K = draw(sizes(80, 200))
    N = draw(sizes(80, 200))
    return {
        "lead": draw(st.sampled_from([(), (1,), (2,), (3,)])),
        "M": draw(sizes(40, 150)), "K": K, "N": N, "r": draw(st.integers(1, min(K, N, 72))),
        "dtype": draw(st.sampled_from(DTYPES)), "adapter_fp32": draw(st.booleans()),
        "bias": draw(st.booleans()), "x_layout": draw(st.sampled_from(LAYOUTS)),
        "w_layout": draw(st.sampled_from(LAYOUTS)),
        "scale": draw(st.sampled_from([1.0, 2.0, 0.25, -1.5, 16.0])),
        "p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])), "seed": draw(st.integers(0, 2**31 - 1)),
        "backend": draw(st.sampled_from(BACKENDS)),
    }


def lora_mask(c, rows: int):
    """The keep-mask the op drew for its [rows, K] input (each backend regenerates its own)."""
    if c["p"] == 0:
        return None
    if c["backend"] == "torch":
        return _torch_keep((rows, c["K"]), c["p"], c["seed"], "cpu").bool()
    from ptune_rt.kernels._triton_utils import dropout_mask
    return dropout_mask((rows, c["K"]), c["p"], c["seed"], "cpu")


@budget("lora")
@given(lora_cases())
def test_fuzz_lora_linear(c):
    g = torch.Generator().manual_seed(c["seed"])
    dtype, K, N, r = c["dtype"], c["K"], c["N"], c["r"]
    adtype = torch.float32 if c["adapter_fp32"] else dtype
    shape = (*c["lead"], c["M"], K)
    x = layout(randn(g, *shape).to(dtype), c["x_layout"])
    w = layout(randn(g, N, K, scale=K ** -0.5).to(dtype), c["w_layout"])
    b = randn(g, N).to(dtype) if c["bias"] else None
    a = randn(g, r, K, scale=K ** -0.5).to(adtype)
    bb = randn(g, N, r, scale=r ** -0.5).to(adtype)
    dy = randn(g, *shape[:-1], N).to(dtype)

    xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    bs = b.detach().clone().requires_grad_() if b is not None else None
    y = lora_linear(xs, w, bs, As, Bs, c["scale"], c["p"], backend=c["backend"], seed=c["seed"])
    y.backward(dy)

    rows = math.prod(shape[:-1])
    flat = (x.reshape(rows, K), w, b, a, bb)
    ref, gold = lora_reference_and_gold(*flat, c["scale"], lora_mask(c, rows), c["p"], dy.reshape(rows, N))
    got = (y.reshape(rows, N), xs.grad.reshape(rows, K), As.grad, Bs.grad)
    for what, o, r_, g_ in zip(("y", "dx", "dA", "dB"), got, ref, gold):
        assert_close_to_reference(o, r_, g_, dtype if what in ("y", "dx") else adtype, f"lora {what}")
    if b is not None:
        dy2 = dy.reshape(rows, N)
        assert_close_to_reference(bs.grad, dy2.sum(0), dy2.double().sum(0), dtype, "lora dbias")


# ----------------------------------------------------------------------------------------------
# prefix attention
# ----------------------------------------------------------------------------------------------

@st.composite
def attention_cases(draw):
    B = draw(st.integers(1, 3))
    L = draw(sizes(20, 70))
    S = L + draw(st.sampled_from([0, 0, 1, 7]))  # keys: a cache of S - L tokens, then the L new ones
    tasks = draw(st.sampled_from([0, 0, 1, 3]))
    pad = draw(st.sampled_from([None, "left", "right"]))
    return {
        "B": B, "Hkv": draw(st.integers(1, 2)), "group": draw(st.sampled_from([1, 2, 4])), "L": L, "S": S,
        "P": draw(st.sampled_from([1, 2, 5, 16, 47])), "D": draw(st.sampled_from([8, 16, 24, 32, 64, 80, 128])),
        "dtype": draw(st.sampled_from(DTYPES)), "causal": draw(st.booleans()),
        "pads": [draw(st.integers(0, S - 1)) if pad else 0 for _ in range(B)], "pad": pad,
        "tasks": tasks, "task_ids": [draw(st.integers(0, tasks - 1)) for _ in range(B)] if tasks else None,
        "task_dtype": draw(st.sampled_from(INT_DTYPES)), "hf_layout": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, 0.05])), "seed": draw(st.integers(0, 2**31 - 1)),
        "backend": draw(st.sampled_from(BACKENDS)),
    }


def attention_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, Hkv, L, S, P, D, dtype = c["B"], c["Hkv"], c["L"], c["S"], c["P"], c["D"], c["dtype"]
    Hq = Hkv * c["group"]

    def heads(n, length):  # [B, n, length, D]; HF's layout is [B, length, n, D] seen through a transpose
        t = randn(g, B, length, n, D).to(dtype)
        return t.transpose(1, 2) if c["hf_layout"] else t.transpose(1, 2).contiguous()

    q, k, v = heads(Hq, L), heads(Hkv, S), heads(Hkv, S)
    lead = (c["tasks"],) if c["tasks"] else ()
    pk, pv = randn(g, *lead, Hkv, P, D), randn(g, *lead, Hkv, P, D)
    kv_mask = None
    if c["pad"]:  # n padding keys on the row's left or right (every row keeps at least one)
        kv_mask = torch.ones(B, S, dtype=torch.bool)
        for row, n in enumerate(c["pads"]):
            kv_mask[row, :n] = False if c["pad"] == "left" else kv_mask[row, :n]
            kv_mask[row, S - n:] = False if c["pad"] == "right" and n else kv_mask[row, S - n:]
    task_ids = torch.tensor(c["task_ids"]).to(c["task_dtype"]) if c["tasks"] else None
    return q, k, v, pk, pv, kv_mask, task_ids, randn(g, B, Hq, L, D).to(dtype)


def attention_reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, causal, scale, do):
    """(out, lse, dq, dk, dv, dprefix_k, dprefix_v) of the eager reference in q's dtype and in float64
    (the prefix enters in q's dtype, as the op casts its fp32 parameters)."""
    res = {}
    for tag, cast in (("ref", lambda t: t), ("gold", lambda t: t.double())):
        ins = [cast(t.detach().to(q.dtype)).requires_grad_() for t in (q, k, v, pk, pv)]
        o, lse = prefix_attention_reference(*ins, kv_mask, task_ids, causal, scale)
        o.backward(cast(do))
        res[tag] = (o.detach(), lse.detach()) + tuple(t.grad for t in ins)
    return res["ref"], res["gold"]


@budget("prefix")
@given(attention_cases())
def test_fuzz_prefix_attention(c):
    q, k, v, pk, pv, kv_mask, task_ids, do = attention_inputs(c)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    scale = c["scale"]
    out = prefix_attention(*ins, kv_mask=kv_mask, task_ids=task_ids, causal=c["causal"], sm_scale=scale,
                           backend=c["backend"])
    out.backward(do)
    assert ins[3].grad.dtype == torch.float32  # through the cast into the fp32 prefix
    ref, gold = attention_reference_and_gold(q, k, v, pk, pv, kv_mask, task_ids, c["causal"], scale, do)
    got = (out, None) + tuple(t.grad for t in ins)
    for name, o, r_, g_ in zip(("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, ref, gold):
        if o is not None:
            assert_close_to_reference(o, r_, g_, c["dtype"], f"prefix {name}")


# ----------------------------------------------------------------------------------------------
# soft-prompt input gather
# ----------------------------------------------------------------------------------------------

@st.composite
def prompt_cases(draw):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    P, T = draw(st.integers(1, 8)), draw(st.sampled_from([0, 1, 3]))
    virtual = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))  # share of virtual-token positions
    return {
        "B": B, "L": L, "V": draw(st.integers(1, 50)), "H": draw(st.integers(1, 72)), "P": P, "T": T,
        "virtual": virtual, "src_dtype": draw(st.sampled_from([torch.int64, torch.int32])),
        "dtype": draw(st.sampled_from(DTYPES)), "emb_layout": draw(st.sampled_from(LAYOUTS)),
        "prompt_layout": draw(st.sampled_from(LAYOUTS)), "task_dtype": draw(st.sampled_from(INT_DTYPES)),
        "emb_grad": draw(st.booleans()), "seed": draw(st.integers(0, 2**31 - 1)),
        "backend": draw(st.sampled_from(BACKENDS)),
    }


@budget("prompt")
@given(prompt_cases())
def test_fuzz_prompt_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, L, V, H, P, T, dtype = c["B"], c["L"], c["V"], c["H"], c["P"], c["T"], c["dtype"]
    ids = torch.randint(0, V, (B, L), generator=g)
    virt = -torch.randint(1, P + 1, (B, L), generator=g)
    src = torch.where(torch.rand(B, L, generator=g) < c["virtual"], virt, ids).to(c["src_dtype"])
    emb = layout(randn(g, V, H).to(dtype), c["emb_layout"])
    prompts = layout(randn(g, *((T,) if T else ()), P, H), c["prompt_layout"])  # fp32, as the parameters are
    task_ids = torch.randint(0, T, (B,), generator=g).to(c["task_dtype"]) if T else None
    dout = randn(g, B, L, H).to(dtype)

    es = emb.detach().clone().requires_grad_(c["emb_grad"])
    ps = prompts.detach().clone().requires_grad_()
    out = build_inputs_embeds(src, es, ps, task_ids, backend=c["backend"])
    assert torch.equal(out, build_inputs_embeds_reference(src, emb, prompts.to(dtype), task_ids))  # a gather
    out.backward(dout)

    res = {}
    for tag, cast, d_out in (("ref", lambda t: t, dout), ("gold", lambda t: t.double(), dout.double())):
        e2 = cast(emb.detach()).requires_grad_()
        p2 = cast(prompts.detach()).requires_grad_()
        build_inputs_embeds_reference(src, e2, p2.to(e2.dtype), task_ids).backward(d_out)
        res[tag] = tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (p2, e2))  # unused: 0
    assert_close_to_reference(ps.grad, res["ref"][0], res["gold"][0], dtype, "prompt dprompts")
    if c["emb_grad"]:
        assert_close_to_reference(es.grad, res["ref"][1], res["gold"][1], dtype, "prompt dembedding")
    else:
        assert es.grad is None


# ----------------------------------------------------------------------------------------------
# cases the fuzzing found
# ----------------------------------------------------------------------------------------------

#: Found by test_fuzz_prefix_attention (random seed): two keys in all (P = 1, S = 1), fp16. The
#: torch path's backward got dq 5x further from float64 than eager (3.3e-3 vs 6.3e-4 at |dq| ~ 1.4)
#: and dprefix_k just over the bound, because the CPU flash backward formed rowsum(dO * O) from the
#: fp16-rounded output and ran in fp16; it now runs half precision in fp32 from an fp32 forward.
FP16_TWO_KEYS = {"B": 2, "Hkv": 2, "group": 1, "L": 1, "S": 1, "P": 1, "D": 24, "dtype": torch.float16,
                 "causal": False, "pads": [0, 0], "pad": "left", "tasks": 0, "task_ids": None,
                 "task_dtype": torch.int64, "hf_layout": False, "scale": None, "seed": 283}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_fp16_backward_with_two_keys(backend):
    test_fuzz_prefix_attention.hypothesis.inner_test({**FP16_TWO_KEYS, "backend": backend})
