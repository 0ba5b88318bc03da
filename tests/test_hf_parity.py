"""End-to-end parity with Hugging Face PEFT on tiny random Llama, Qwen2, GPT-2 (Conv1D) and BERT.

The PEFT model and the ptune-rt model hold identical base weights and identical (non-zero)
adapter weights. Judged by ptune_rt/testing/tolerances.py: the PEFT model run in float64 is the
gold, the same PEFT model in fp32 the reference, and ptune-rt's fp32 error to the gold may be no
worse than the rule allows relative to PEFT's own fp32 error (logits, every LoRA gradient,
the losses of a 20-step AdamW run). Run with ``-s`` to print the largest differences to PEFT.
"""
import copy
import functools

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.methods.lora.inject import lora_modules
from ptune_rt.testing.tolerances import assert_close_to_reference

from helpers_models import MODELS, copy_peft_lora_weights, input_ids, peft_lora_model, strip_peft_prefix

KEYS = list(MODELS)
CAUSAL = ["llama", "qwen2", "gpt2"]
# LR: the 20-step loss comparison is only meaningful on a well-conditioned trajectory. At 1e-2
# Adam makes the llama run chaotic: PEFT itself, started from weights moved by one ulp, ends up to
# 4.7e-4 away from its float64 run (its unperturbed run: 6.2e-5), so any other fp32 rounding
# order lands anywhere in that band. At 3e-3 the same perturbations move the losses by <= 1e-6
# and the loss still falls by 0.86; test_training_trajectory_is_well_conditioned checks it.
STEPS, ACCELERATE_AT, LR = 20, 5, 3e-3

DIFFS: dict = {}  # model -> what -> max |ptune-rt - PEFT fp32|, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP wake-ups that dominate (and vary with machine
    load) at these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def record(key, what, out, ref):
    d = (torch.as_tensor(out).double() - torch.as_tensor(ref).double()).abs().max().item()
    DIFFS.setdefault(key, {})[what] = max(d, DIFFS.get(key, {}).get(what, 0.0))


@pytest.fixture(scope="module", autouse=True)
def _print_diffs():
    yield
    if DIFFS:
        print("\nmax |ptune-rt - PEFT| per model (PEFT in the same dtype):")
        for key, d in DIFFS.items():
            print(f"  {key:<18} " + "  ".join(f"{k}={v:.2e}" for k, v in sorted(d.items())))


def build(key, backend="torch", r=4, alpha=8.0, use_rslora=False, seed=0, bias="none", dtype=torch.float32):
    """(base, PEFT model, ptune-rt model) with identical base and adapter weights (fp32 adapters)."""
    factory, targets = MODELS[key]
    base = factory(seed=seed, dtype=dtype)
    pm = peft_lora_model(copy.deepcopy(base), targets, r=r, alpha=alpha, use_rslora=use_rslora, seed=seed,
                         bias=bias)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=r, alpha=alpha, target_modules=targets,
                                                          use_rslora=use_rslora, backend=backend, bias=bias))
    copy_peft_lora_weights(pm, mine)
    return base, pm, mine


def batch(pad=True):
    """Token ids, attention mask (row 1 right-padded by 2 when ``pad``) and labels."""
    ids = input_ids(batch=2, seq=8)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def forward_backward(model, ids, mask, labels):
    """(logits, loss, {stripped name: grad of every trainable parameter})."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {strip_peft_prefix(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def check_against_peft(key, pm, mine, tag="", dtype=torch.float32):
    ids, mask, labels = batch()
    gold_model = copy.deepcopy(pm).double()
    g_logits, g_loss, g_grads = forward_backward(gold_model, ids, mask, labels)
    r_logits, r_loss, r_grads = forward_backward(pm, ids, mask, labels)
    o_logits, o_loss, o_grads = forward_backward(mine, ids, mask, labels)
    assert_close_to_reference(o_logits, r_logits, g_logits, dtype, f"{key}{tag} logits")
    assert_close_to_reference(o_loss, r_loss, g_loss, dtype, f"{key}{tag} loss")
    record(key + tag, "logits", o_logits, r_logits)
    assert set(o_grads) == set(r_grads) and len(o_grads) >= 2 * len(lora_modules(mine))
    for n in r_grads:
        assert_close_to_reference(o_grads[n], r_grads[n], g_grads[n], dtype, f"{key}{tag} grad {n}")
        record(key + tag, "grads", o_grads[n], r_grads[n])


# ----------------------------------------------------------------------------------------
# logits and gradients, both backends
# ----------------------------------------------------------------------------------------


@pytest.fixture(params=["small-batch", "functions"])
def training_path(request):
    """Both LoRA training paths: these 16-token batches take the small-batch path (plain ops under
    autograd) by default; "functions" runs them through the op's autograd.Functions (projection
    groups, SwiGLU recompute), the path of batches above SMALL_BATCH_ROWS rows."""
    if request.param == "functions":
        request.getfixturevalue("lora_functions")
    return request.param


@pytest.mark.parametrize("key", KEYS)
def test_logits_and_grads_torch_backend(key, training_path):
    _, pm, mine = build(key)
    assert {r["backend"] for r in ptune_rt.report(mine)} == {"torch"}
    check_against_peft(key, pm, mine)


def test_logits_and_grads_rslora():
    _, pm, mine = build("llama", r=8, alpha=16.0, use_rslora=True)
    assert all(m.scaling["default"] == 16.0 / 8**0.5 for m in lora_modules(mine).values())
    check_against_peft("llama", pm, mine, "+rslora")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_logits_and_grads_half_precision_base(dtype, backend):
    """A half-precision base with fp32 adapters (PEFT's default autocast_adapter_dtype)."""
    _, pm, mine = build("llama", backend=backend, dtype=dtype)
    for m in lora_modules(mine).values():
        assert m.base_layer.weight.dtype == dtype and m.lora_A["default"].weight.dtype == torch.float32
    check_against_peft("llama", pm, mine, f"+{str(dtype)[6:]}+{backend}", dtype)


@pytest.mark.parametrize("key,bias,n_bias", [("qwen2", "lora_only", 6), ("gpt2", "all", 13)])
def test_trainable_biases(key, bias, n_bias):
    """Base biases trained beside the adapter (their gradient comes out of the fused op)."""
    _, pm, mine = build(key, bias=bias)
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert trainable == {strip_peft_prefix(n) for n, p in pm.named_parameters()
                         if p.requires_grad and n.endswith(".bias")}
    assert len(trainable) == n_bias
    check_against_peft(key, pm, mine, f"+bias={bias}")


@pytest.mark.parametrize("key", KEYS)
def test_logits_and_grads_triton_backend(key):
    """The Triton kernels through the interpreter (TRITON_INTERPRET=1, CPU tensors; batch 2, seq 8)."""
    _, pm, mine = build(key, backend="triton")
    assert {r["backend"] for r in ptune_rt.report(mine)} == {"triton"}
    check_against_peft(key, pm, mine, "+triton")


# ----------------------------------------------------------------------------------------
# training, generation, merge / restore
# ----------------------------------------------------------------------------------------


def train(model, ids, mask, labels, steps=STEPS, accelerate_at=None):
    """AdamW on the trainable parameters; returns the loss of every step (float64 tensor).
    With ``accelerate_at``, ``ptune_rt.accelerate(model)`` runs before that step and the
    optimizer's parameters, the parameter names and their order are checked to survive it."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    losses = []
    for step in range(steps):
        if step == accelerate_at:
            names = [n for n, _ in model.named_parameters()]
            params = list(model.parameters())
            group = list(opt.param_groups[0]["params"])
            state_keys = set(opt.state)
            rows = ptune_rt.accelerate(model)
            assert rows and all(r["source"] == "peft" for r in rows)
            assert [n for n, _ in model.named_parameters()] == names
            assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
            assert all(a is b for a, b in zip(opt.param_groups[0]["params"], group, strict=True))
            assert set(opt.state) == state_keys and state_keys <= set(params)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def peft_losses(key, dtype):
    """Losses of PEFT's own STEPS-step run in ``dtype`` (fp32: the reference; fp64: the gold)."""
    _, pm, _ = build(key)
    return train(pm.to(dtype), *batch())


@pytest.mark.parametrize("key", KEYS)
def test_training_losses_match_peft(key, training_path):
    _, _, mine = build(key)
    losses = train(mine, *batch())
    ref, gold = peft_losses(key, torch.float32), peft_losses(key, torch.float64)
    assert losses[-1] < losses[0] - 0.5  # it does train
    assert_close_to_reference(losses, ref, gold, torch.float32, f"{key} training losses")
    record(key, "losses", losses, ref)


@pytest.mark.parametrize("key", KEYS)
def test_training_trajectory_is_well_conditioned(key):
    """The premise of the loss comparisons: PEFT's own fp32 run, started from trainable weights
    moved by one ulp, stays within the tolerance rule of its unperturbed run (otherwise the
    comparison measures the optimizer's sensitivity, not the kernels' rounding)."""
    _, pm, _ = build(key)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.mul_(1 + torch.randint(-1, 2, p.shape, generator=g).to(p.dtype) * 2.0 ** -23)
    losses = train(pm, *batch())
    ref, gold = peft_losses(key, torch.float32), peft_losses(key, torch.float64)
    assert_close_to_reference(losses, ref, gold, torch.float32, f"{key} PEFT losses from one-ulp-moved weights")


@pytest.mark.parametrize("key", KEYS)
def test_accelerate_mid_training_matches_peft(key):
    from peft.utils import get_peft_model_state_dict

    _, pm, _ = build(key)
    losses = train(pm, *batch(), accelerate_at=ACCELERATE_AT)
    ref, gold = peft_losses(key, torch.float32), peft_losses(key, torch.float64)
    assert torch.equal(losses[:ACCELERATE_AT], ref[:ACCELERATE_AT])  # the same PEFT code until then
    assert_close_to_reference(losses, ref, gold, torch.float32, f"{key} accelerated training losses")
    record(key, "losses(accelerate)", losses, ref)
    # PEFT's adapter state dict (what save_pretrained writes) keeps its keys and tensors.
    sd = get_peft_model_state_dict(pm)
    _, fresh, _ = build(key)
    assert list(sd) == list(get_peft_model_state_dict(fresh))
    params = dict(pm.named_parameters())
    assert sd and len(sd) == 2 * len(lora_modules(pm))
    for k, v in sd.items():
        assert v.data_ptr() == params[k.replace(".weight", ".default.weight")].data_ptr()


@pytest.mark.parametrize("key", CAUSAL)
def test_generate_greedy_matches_peft(key):
    _, pm, mine = build(key)
    ids, mask, _ = batch(pad=False)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = pm.generate(ids, **kw)
    got = mine.generate(ids, **kw)
    assert want.shape == (2, 16) and torch.equal(got, want)
    ptune_rt.merge(mine)  # zero-overhead inference gives the same tokens
    assert torch.equal(mine.generate(ids, **kw), want)


@pytest.mark.parametrize("key", KEYS)
def test_merge_unmerge_restore_roundtrip(key):
    base, pm, mine = build(key)
    ids, mask, _ = batch()
    originals = {n: m for n, m in mine.named_modules() if isinstance(m, ptune_rt.LoRALinear)}
    originals = {n: m.base_layer for n, m in originals.items()}
    with torch.no_grad():
        gold = copy.deepcopy(pm).double()(input_ids=ids, attention_mask=mask).logits
        ref = pm(input_ids=ids, attention_mask=mask).logits
        unmerged = mine(input_ids=ids, attention_mask=mask).logits
        ptune_rt.merge(mine)
        merged = mine(input_ids=ids, attention_mask=mask).logits
        assert_close_to_reference(merged, ref, gold, torch.float32, f"{key} merged logits")
        record(key, "logits(merged)", merged, ref)
        ptune_rt.unmerge(mine)
        assert torch.equal(mine(input_ids=ids, attention_mask=mask).logits, unmerged)
        ptune_rt.merge(mine)
    ptune_rt.restore(mine)  # unmerges first
    for n, layer in originals.items():
        assert mine.get_submodule(n) is layer
    base_state, state = base.state_dict(), mine.state_dict()
    assert list(state) == list(base_state)
    for k in state:
        assert torch.equal(state[k], base_state[k]), k
    assert all(p.requires_grad for p in mine.parameters())  # the flags from before apply
    assert torch.equal(mine(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
