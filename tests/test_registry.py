"""Every registered method end to end (apply -> train -> save -> load into a fresh model -> restore),
driven by the registry so that a new method is covered by adding it there; BitFit and LayerNorm
tuning's own behaviour; PEFT parity of LayerNorm tuning."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptune_rt
from ptune_rt import registry
from ptune_rt.io import AdapterError

VOCAB = 128


def tiny_llama_with_biases(seed: int = 0):
    """Llama with attention and MLP biases, so every method (BitFit included) has something to train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def ids(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def train_steps(model, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the method left nothing trainable"
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    x = ids()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids(seed=5)).logits


@pytest.mark.parametrize("method", registry.methods(), ids=lambda m: m.name)
def test_every_method_end_to_end(method, tmp_path):
    model = tiny_llama_with_biases()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptune_rt.apply(model, method.example())
    assert method.is_applied(model) and [m.name for m in registry.applied_methods(model)] == [method.name]
    assert any(r["method"] == method.name for r in ptune_rt.report(model))
    assert method.name in ptune_rt.format_report(ptune_rt.report(model))
    train_steps(model)
    trained = logits(model)

    formats = ["ptune"] + (["peft"] if method.peft_types else [])
    for fmt in formats:
        ptune_rt.save_adapter(model, tmp_path / fmt, format=fmt)
        fresh = tiny_llama_with_biases()
        ptune_rt.load_adapter(fresh, tmp_path / fmt)
        torch.testing.assert_close(logits(fresh), trained, rtol=0, atol=1e-5, msg=f"{fmt} round trip")
        ptune_rt.restore(fresh)

    ptune_rt.restore(model)
    assert not method.is_applied(model) and not registry.applied_methods(model)
    state = model.state_dict()
    assert list(state) == list(original)
    for k, v in state.items():
        assert torch.equal(v, original[k]), f"{k} differs after restore"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_every_registered_method_is_complete():
    names = [m.name for m in registry.methods()]
    assert len(names) == len(set(names))
    for m in registry.methods():
        assert isinstance(m.example(), m.config_class)
        config = m.example()
        assert type(config).from_dict(config.to_dict()) == config  # one config base: dict round trip


def test_methods_combine_and_restore_newest_first():
    """LoRA then BitFit: both train, and restore gives back the original flags and values."""
    model = tiny_llama_with_biases()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ptune_rt.apply(model, ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("bias") for n in trainable)
    assert not any(n.endswith("weight") and "lora" not in n for n in trainable)
    train_steps(model)
    ptune_rt.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# BitFit
# ----------------------------------------------------------------------------------------------

def test_bitfit_trains_chosen_biases_only():
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=VOCAB))
    ptune_rt.apply(bert, ptune_rt.BitFitConfig(bias_modules=["query", "value", "intermediate.dense"]))
    assert sorted(n for n, p in bert.named_parameters() if p.requires_grad) == sorted([
        "bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.0.attention.self.value.bias",
        "bert.encoder.layer.0.intermediate.dense.bias", "classifier.weight", "classifier.bias"])  # + the task head


def test_bitfit_refuses_a_model_without_biases():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias parameter in any module"):
        ptune_rt.apply(model, ptune_rt.BitFitConfig())
    with pytest.raises(ValueError, match=r"modules matching \['query'\]"):
        ptune_rt.apply(model, ptune_rt.BitFitConfig(bias_modules=["query"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not registry.applied_methods(model)


class _MatmulShapes(TorchDispatchMode):
    MATMULS = {"mm", "addmm", "bmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.MATMULS:
            self.shapes.append(tuple(out.shape))
        return out


def _backward_matmuls(model):
    x = ids(batch=3, seq=5)  # 15 tokens: no activation matrix has a weight's shape
    loss = model(input_ids=x, labels=x).loss
    with _MatmulShapes() as mode:
        loss.backward()
    return mode.shapes


def test_bitfit_backward_runs_no_weight_gradient_gemm():
    model = tiny_llama_with_biases()
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    full = _backward_matmuls(model)
    assert weights & set(full), "full fine-tuning computes weight gradients (the check must see them)"
    model.zero_grad()
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    bitfit = _backward_matmuls(model)
    assert not weights & set(bitfit), f"a weight-gradient GEMM ran under BitFit: {sorted(weights & set(bitfit))}"
    assert len(bitfit) < len(full)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_bitfit_and_ln_tuning_on_other_families(family):
    import helpers_models as H
    model = H.tiny_gpt2() if family == "gpt2" else H.tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    assert all(n.endswith("bias") for n, p in model.named_parameters() if p.requires_grad)
    ptune_rt.restore(model)
    ptune_rt.apply(model, ptune_rt.LNTuningConfig())
    norms = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    expected = ("ln_1", "ln_2", "ln_f") if family == "gpt2" else ("LayerNorm",)
    assert norms and all(n.endswith(expected) for n in norms)
    train_steps(model) if family == "gpt2" else None
    ptune_rt.restore(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# LayerNorm tuning: parity with PEFT's LN_TUNING
# ----------------------------------------------------------------------------------------------

def _bert_cls(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(  # no dropout: the 20 training steps compare exactly
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)).eval()


def _peft_pair(family):
    import peft
    if family == "llama":
        ours, theirs = tiny_llama_with_biases(), tiny_llama_with_biases()
        cfg = dict(task_type="CAUSAL_LM")
        ours_cfg = ptune_rt.LNTuningConfig()
    else:
        ours, theirs = _bert_cls(), _bert_cls()
        cfg = dict(task_type="SEQ_CLS", target_modules=["LayerNorm"])
        ours_cfg = ptune_rt.LNTuningConfig(target_modules=["LayerNorm"])
    theirs = peft.get_peft_model(theirs, peft.LNTuningConfig(**cfg))
    return ptune_rt.apply(ours, ours_cfg), theirs


def _loss(model, family, x):
    if family == "llama":
        return model(input_ids=x, labels=x).loss
    return model(input_ids=x, labels=torch.tensor([0, 1])).loss


def _trained_grads(model):
    return {n.replace("base_model.model.", "").replace(".ln_tuning_layers.default", "")
             .replace(".modules_to_save.default", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_ln_tuning_matches_peft(family, tmp_path):
    ours, theirs = _peft_pair(family)
    x = ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)
    _loss(ours, family, x).backward()
    _loss(theirs, family, x).backward()
    g_ours, g_theirs = _trained_grads(ours), _trained_grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=0, atol=1e-6, msg=n)
    losses = []
    for model in (ours, theirs):
        model.zero_grad()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        run = []
        for step in range(20):
            opt.zero_grad()
            loss = _loss(model, family, ids(seed=step))
            loss.backward()
            opt.step()
            run.append(loss.item())
        model.eval()
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)

    # checkpoints both ways: ours -> PEFT, PEFT -> ours
    import peft
    ptune_rt.save_adapter(ours, tmp_path / "ours", format="peft")
    base = tiny_llama_with_biases() if family == "llama" else _bert_cls()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(input_ids=x).logits, rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = tiny_llama_with_biases() if family == "llama" else _bert_cls()
    ptune_rt.load_adapter(fresh, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, theirs(input_ids=x).logits, rtol=0, atol=1e-6)


def test_ln_tuning_refusals_leave_the_model_unchanged(tmp_path):
    model = tiny_llama_with_biases()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no modules matching"):
        ptune_rt.apply(model, ptune_rt.LNTuningConfig(target_modules=["no_such_norm"]))
    with pytest.raises(ValueError, match="LNTuningConfig.target_modules"):
        ptune_rt.LNTuningConfig(target_modules=[""])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not registry.applied_methods(model)
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    with pytest.raises(AdapterError, match="format='ptune'"):
        ptune_rt.save_adapter(model, tmp_path / "x", format="peft")  # PEFT has no BitFit
