"""IA3: the fused op against float64 and eager per dtype (both backends, the Triton one under the
interpreter), the module (apply / restore bit-exact, merge / unmerge exact, mixed-task rows, errors)
and parity with PEFT's IA3 on tiny Llama, GPT-2 (Conv1D, fused c_attn) and BERT: logits, vector
gradients, 20-step losses, checkpoints both ways, accelerate + restore. Run with ``-s`` to print the
largest differences to PEFT."""
import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.ia3 import IA3Config, IA3Linear, merge, mixed_adapters, set_adapter, unmerge
from ptune_rt.methods.ia3.inject import ia3_modules
from ptune_rt.ops.ia3_linear import ia3_linear
from ptune_rt.testing.tolerances import assert_close_to_reference, assert_fp32_end_to_end_close

from helpers_models import input_ids, strip_peft_prefix, tiny_bert, tiny_gpt2, tiny_llama

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIFFS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _print_diffs():
    yield
    if DIFFS:
        print("\nmax |ptune-rt - PEFT| per model (fp32):")
        for key, d in DIFFS.items():
            print(f"  {key:<14} " + "  ".join(f"{k}={v:.2e}" for k, v in sorted(d.items())))


def record(key, what, out, ref):
    d = (torch.as_tensor(out).double() - torch.as_tensor(ref).double()).abs().max().item()
    DIFFS.setdefault(key, {})[what] = max(d, DIFFS.get(key, {}).get(what, 0.0))


# ----------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------


def peft_formula(x, w, b, scale, feedforward):
    """PEFT's IA3 forward as eager torch ops (w [N, K]; the vector in its own dtype)."""
    if feedforward:
        return nn.functional.linear((x.to(scale.dtype) * scale).to(x.dtype), w, b)
    y = nn.functional.linear(x, w, b)
    return (y.to(scale.dtype) * scale).to(y.dtype)


def op_case(dtype, feedforward, conv1d=False, bias=True, M=45, K=40, N=36, zero=False):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(K, N, generator=g).t() if conv1d else torch.randn(N, K, generator=g)) / K ** 0.5
    w = w.to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    scale = 0.5 + torch.rand(K if feedforward else N, generator=g)
    if zero:
        scale[::5] = 0.0
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, w, b, scale, dy


def run_grads(fn, x, w, b, scale, dy):
    x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = fn(x, w, b, scale)
    y.backward(dy)
    return y.detach(), x.grad, scale.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_float64_within_eager_error(dtype, feedforward, backend):
    for conv1d, bias, zero in ((False, True, False), (True, False, True)):
        x, w, b, scale, dy = op_case(dtype, feedforward, conv1d, bias, zero=zero)
        got = run_grads(lambda *a: ia3_linear(*a, feedforward=feedforward, backend=backend), x, w, b, scale, dy)
        ref = run_grads(lambda *a: peft_formula(*a, feedforward), x, w, b, scale, dy)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        gold = run_grads(lambda *a: peft_formula(*a, feedforward), d(x), d(w), d(b), d(scale), d(dy))
        for what, o, r, g in zip(("y", "dx", "dl"), got, ref, gold):
            assert o.dtype == (torch.float32 if what == "dl" else dtype)
            assert_close_to_reference(o, r, g, dtype, f"{backend} {what} conv1d={conv1d}")


def test_op_takes_strided_views_and_batched_inputs():
    x, w, b, scale, _ = op_case(torch.float32, False)
    x3 = torch.randn(3, 15, 80)[..., ::2]  # strided last dim
    y = ia3_linear(x3, w, b, scale, backend="triton")
    torch.testing.assert_close(y, peft_formula(x3, w, b, scale, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_op_compiles_in_one_graph_with_the_same_gradients(feedforward):
    x, w, b, scale, dy = op_case(torch.float32, feedforward)
    fn = torch.compile(lambda x, w, b, s: ia3_linear(x, w, b, s, feedforward, "torch"), fullgraph=True)
    got = run_grads(fn, x, w, b, scale, dy)
    want = run_grads(lambda *a: ia3_linear(*a, feedforward=feedforward, backend="torch"), x, w, b, scale, dy)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_op_rejects_bad_input_naming_the_argument():
    x, w, b, scale, _ = op_case(torch.float32, False)
    with pytest.raises(ValueError, match=r"scale must be a vector \[out_features=36\]"):
        ia3_linear(x, w, b, scale[:-1])
    with pytest.raises(ValueError, match=r"scale must be a vector \[in_features=40\] \(input scale\)"):
        ia3_linear(x, w, b, scale, feedforward=True)
    with pytest.raises(ValueError, match="x must have last dimension in_features=40"):
        ia3_linear(x[:, :-1], w, b, scale)
    with pytest.raises(TypeError, match="x has dtype torch.float16 but the frozen weight has torch.float32"):
        ia3_linear(x.half(), w, b, scale)
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ia3_linear(x, w, b, [1.0] * 36)
    with pytest.raises(ValueError, match=r"bias must be None or a vector \[out_features=36\]"):
        ia3_linear(x, w, b[:-1], scale)
    with pytest.raises(TypeError, match="feedforward must be True or False"):
        ia3_linear(x, w, b, scale, feedforward=1)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 on the triton path"):
        ia3_linear(x.double(), w.double(), b.double(), scale, backend="triton")


# ----------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------


def randomize(model, seed=3, spread=0.3):
    """Seeded non-trivial vectors (1 + spread * N(0, 1)) in every IA3 layer, PEFT's or ptune-rt's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".ia3_l." in n:
                p.copy_(1 + spread * torch.randn(p.shape, generator=g))


def test_apply_and_restore_are_bit_exact():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptune_rt.apply(model, IA3Config())
    mods = ia3_modules(model)
    assert sorted({n.rsplit(".", 1)[1] for n in mods}) == ["down_proj", "k_proj", "v_proj"]
    assert all(m.is_feedforward == n.endswith("down_proj") for n, m in mods.items())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"{n}.ia3_l.default" for n in mods)
    rows = ptune_rt.report(model)
    assert {r["scaled"] for r in rows if r["method"] == "ia3"} == {"input", "output"}
    assert "IA3 modules (2 input-scaled, 4 output-scaled)" in ptune_rt.format_report(rows)
    ids = input_ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        randomize(model)  # trained-looking vectors: restore must still give the model back
        assert not torch.allclose(model(input_ids=ids).logits, base)
    ptune_rt.restore(model)
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values()))
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_merge_unmerge_is_exact_and_merged_matches(factory, dtype):
    model = factory(dtype=dtype)  # GPT-2: c_attn an output scale with a bias, mlp.c_proj an input scale
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ptune_rt.apply(model, IA3Config(backend="torch"))
    randomize(model, spread=0.5)
    with torch.no_grad():
        for m in ia3_modules(model).values():
            m.ia3_l["default"].view(-1)[::7] = 0.0  # a zero entry: dividing it out is impossible
    ids = input_ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
        merge(model)
        merged = model(input_ids=ids).logits.float()
    assert all(m.merged for m in ia3_modules(model).values())
    scale = max(1.0, adapted.abs().max().item())
    assert (merged - adapted).abs().max().item() <= {torch.float32: 1e-5, torch.float16: 2e-2,
                                                     torch.bfloat16: 1.5e-1}[dtype] * scale
    assert sum(m.merge_extra_bytes() for m in ia3_modules(model).values()) > 0
    unmerge(model)
    ptune_rt.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.uint8), original[k].view(torch.uint8)), f"{k} not restored bit for bit"


def test_merged_vector_refuses_training_with_a_clear_error():
    model = ptune_rt.apply(tiny_llama(), IA3Config())
    merge(model)
    model.train()
    ids = input_ids()
    with pytest.raises(RuntimeError, match="merged into the base weight"):
        model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_task_rows_equal_each_task_alone(backend, tmp_path):
    base = tiny_llama()
    model = ptune_rt.apply(copy.deepcopy(base), IA3Config(backend=backend))
    randomize(model, seed=1)
    ptune_rt.save_adapter(model, tmp_path / "b")
    randomize(model, seed=2)
    ptune_rt.load_adapter(model, tmp_path / "b", adapter_name="b")
    ids = input_ids(batch=4, seq=5)
    names = ["default", "b", None, "b"]

    def alone(name):
        with torch.no_grad():
            if name is None:
                with ptune_rt.disable_adapter(model):
                    return model(input_ids=ids).logits
            set_adapter(model, name)
            return model(input_ids=ids).logits

    want = {n: alone(n) for n in ("default", "b", None)}
    set_adapter(model, "default")
    with torch.no_grad(), mixed_adapters(model, names):
        got = model(input_ids=ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], want[n][i], rtol=0, atol=1e-6 if backend == "torch" else 1e-5)
    assert not torch.allclose(want["default"], want["b"])
    with pytest.raises(ValueError, match="adapter_names: 'nope' is not an adapter of IA3 modules"):
        mixed_adapters(model, ["nope"])
    with pytest.raises(RuntimeError, match="runs inference only"), mixed_adapters(model, names):
        model(input_ids=ids)


def test_config_and_apply_refuse_bad_input_before_any_change():
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules must be a subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="IA3Config.init_ia3_weights must be True or False"):
        IA3Config(init_ia3_weights=1)
    with pytest.raises(ValueError, match="IA3Config.backend must be one of"):
        IA3Config(backend="cuda")
    with pytest.raises(ValueError, match="IA3Config.target_modules must be None, a regex"):
        IA3Config(target_modules=[])
    assert IA3Config.from_dict(IA3Config(feedforward_modules=[]).to_dict()).feedforward_modules == []
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target_modules entries \['nope'\] match no module"):
        ptune_rt.apply(model, IA3Config(target_modules=["nope"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="a LlamaRMSNorm; IA3 targets must be nn.Linear"):
        ptune_rt.apply(model, IA3Config(target_modules=["norm"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="no default for model type 'bloomz'"):
        model.config.model_type = "bloomz"
        try:
            ptune_rt.apply(model, IA3Config())
        finally:
            model.config.model_type = "llama"
    assert not ia3_modules(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------
# parity with PEFT
# ----------------------------------------------------------------------------------------

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def build(key, backend="torch"):
    """(base, PEFT IA3 model, ptune-rt model) with the family's default targets and identical,
    non-trivial vectors."""
    from peft import IA3Config as PeftIA3Config, get_peft_model

    base = FACTORIES[key]()
    pm = get_peft_model(copy.deepcopy(base), PeftIA3Config(fan_in_fan_out=key == "gpt2"))
    randomize(pm)
    mine = ptune_rt.apply(copy.deepcopy(base), IA3Config(backend=backend))
    randomize(mine)
    return base, pm, mine


def batch(key):
    ids = input_ids(batch=2, seq=8)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def forward_backward(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {strip_peft_prefix(n).replace(".ia3_l.default", ".ia3_l"): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("key", list(FACTORIES))
def test_logits_and_vector_grads_match_peft(key, backend):
    if backend == "triton" and key != "llama":
        pytest.skip("the interpreter runs one model (the kernels' layouts are covered by the op tests)")
    _, pm, mine = build(key, backend)
    data = batch(key)
    g_logits, g_loss, g_grads = forward_backward(copy.deepcopy(pm).double(), *data)
    r_logits, r_loss, r_grads = forward_backward(pm, *data)
    o_logits, o_loss, o_grads = forward_backward(mine, *data)
    assert_close_to_reference(o_logits, r_logits, g_logits, torch.float32, f"{key} logits")
    assert_close_to_reference(o_loss, r_loss, g_loss, torch.float32, f"{key} loss")
    assert set(o_grads) == set(r_grads) and len(o_grads) == len(ia3_modules(mine))
    for n in r_grads:
        assert_close_to_reference(o_grads[n], r_grads[n], g_grads[n], torch.float32, f"{key} grad {n}")
        record(f"{key}/{backend}", "grads", o_grads[n], r_grads[n])
    record(f"{key}/{backend}", "logits", o_logits, r_logits)


def train(model, data, steps=20, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=data[0], attention_mask=data[1], labels=data[2]).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("key", list(FACTORIES))
def test_twenty_step_losses_match_peft(key):
    _, pm, mine = build(key)
    data = batch(key)
    gold = train(copy.deepcopy(pm).double(), data)
    ref = train(pm, data)
    got = train(mine, data)
    assert_close_to_reference(got, ref, gold, torch.float32, f"{key} 20-step losses")
    assert got[-1] < got[0]
    record(key, "losses", got, ref)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("key", list(FACTORIES))
def test_checkpoints_load_both_ways(key, tmp_path):
    from peft import PeftModel

    base, pm, mine = build(key)
    ids = input_ids()
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    loaded_by_peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mine")).eval()
    want = logits_of(mine, ids)
    record(key, "ckpt->peft", logits_of(loaded_by_peft, ids), want)
    assert_fp32_end_to_end_close(logits_of(loaded_by_peft, ids), want, f"{key}: ptune-rt checkpoint in PEFT")

    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    record(key, "peft->ckpt", logits_of(loaded, ids), logits_of(pm, ids))
    assert_fp32_end_to_end_close(logits_of(loaded, ids), logits_of(pm, ids), f"{key}: PEFT checkpoint in ptune-rt")
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [strip_peft_prefix(n) for n, p in pm.named_parameters() if p.requires_grad]


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, mine = build("llama")
    ptune_rt.save_adapter(mine, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("down_proj.ia3_l"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    fresh = tiny_llama()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ptune_rt.io.AdapterError, match=r"shape mismatch for .*down_proj\.ia3_l.*expected \[1, 128\]"):
        ptune_rt.load_adapter(fresh, tmp_path)
    assert not ia3_modules(fresh) and list(fresh.state_dict()) == list(state)


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_accelerate_runs_peft_ia3_on_the_fused_path_and_restore_gives_it_back(key, tmp_path):
    from peft.tuners.ia3.layer import Linear as PeftIA3Layer

    _, pm, _ = build(key)
    data = batch(key)
    want_logits, want_loss, want_grads = forward_backward(pm, *data)
    params = dict(pm.named_parameters())
    peft_layers = {n: m for n, m in pm.named_modules() if isinstance(m, PeftIA3Layer)}
    rows = ptune_rt.accelerate(pm)
    assert len(rows) == len(peft_layers) and all(r["method"] == "ia3" and r["source"] == "peft" for r in rows)
    assert all(isinstance(m, IA3Linear) for n, m in pm.named_modules() if n in peft_layers)
    assert all(p is params[n] for n, p in pm.named_parameters())  # the same Parameter objects, same names
    logits, loss, grads = forward_backward(pm, *data)
    assert_fp32_end_to_end_close(logits, want_logits, f"{key} accelerated logits")
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-6)
    pm.save_pretrained(str(tmp_path))  # PEFT's own save sees its tuner layers
    assert ptune_rt.load_adapter(copy.deepcopy(FACTORIES[key]()), tmp_path) is not None
    ptune_rt.restore(pm)
    assert {n: m for n, m in pm.named_modules() if isinstance(m, PeftIA3Layer)}.keys() == peft_layers.keys()
    assert all(m is peft_layers[n] for n, m in pm.named_modules() if n in peft_layers)
    assert_fp32_end_to_end_close(forward_backward(pm, *data)[0], want_logits, f"{key} restored")


def test_classifier_head_trains_and_saves_with_the_vectors_both_ways(tmp_path):
    """A sequence classifier: the head trains whole next to the vectors (PEFT's modules_to_save) and
    travels with them in either direction."""
    from peft import IA3Config as PeftIA3Config, PeftModel, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).eval()
    ids = input_ids()
    mine = ptune_rt.apply(copy.deepcopy(base), IA3Config())
    assert {n for n, p in mine.named_parameters() if p.requires_grad} >= {"classifier.weight", "classifier.bias"}
    randomize(mine)
    with torch.no_grad():
        mine.classifier.weight.mul_(2)
    ptune_rt.save_adapter(mine, tmp_path / "mine")
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mine")).eval()
    assert_fp32_end_to_end_close(logits_of(peft_loaded, ids), logits_of(mine, ids), "head: ptune-rt -> PEFT")

    pm = get_peft_model(copy.deepcopy(base), PeftIA3Config(task_type="SEQ_CLS"))
    randomize(pm, seed=5)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = ptune_rt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_fp32_end_to_end_close(logits_of(loaded, ids), logits_of(pm.eval(), ids), "head: PEFT -> ptune-rt")


def test_peft_adapter_management_after_accelerate_is_guarded():
    """After accelerate, PEFT's add_adapter / set_adapter(other) raise (PEFT would wrap the swapped layers
    and run two adapters at once); the held adapter passes; the model still pickles; restore gives PEFT
    its own methods back."""
    import pickle

    from peft import IA3Config as PeftIA3Config

    _, pm, _ = build("llama")
    ptune_rt.accelerate(pm)
    with pytest.raises(ValueError, match="PeftModel.add_adapter after ptune_rt.accelerate"):
        pm.add_adapter("other", PeftIA3Config())
    with pytest.raises(ValueError, match=r"set_adapter\('other'\) after ptune_rt.accelerate"):
        pm.set_adapter("other")
    pm.set_adapter("default")
    pickle.loads(pickle.dumps(pm))
    ptune_rt.restore(pm)
    pm.add_adapter("other", PeftIA3Config())
    assert "other" in pm.peft_config
