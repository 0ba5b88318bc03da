"""SwiGLU MLPs with a LoRA down projection recompute silu(gate) * up in backward
(``LoRAConfig.recompute_mlp``, on by default): same loss and gradients bit for bit as the plain
chain, two fewer [tokens, intermediate] tensors saved per layer, and only where it is safe."""
import copy

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig
from ptune_rt.methods.lora.swiglu import RecomputeSwiGLUMixin, swiglu_mlps
from ptune_rt.ops.lora_linear import lora_linear_swiglu

from helpers_models import input_ids, peft_lora_model, randomize_lora_b, tiny_gpt2, tiny_llama, tiny_qwen2

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _functions(lora_functions):
    """What these tests check runs in the op's autograd.Functions, which batches above
    SMALL_BATCH_ROWS rows take (the tiny test batches would take the small-batch path)."""


def lora(recompute: bool, **kw) -> LoRAConfig:
    kw.setdefault("target_modules", ALL)
    return LoRAConfig(r=4, alpha=8.0, recompute_mlp=recompute, **kw)


def pair(factory, **kw):
    base = factory()
    plain = ptune_rt.apply(copy.deepcopy(base), lora(False, **kw))
    fused = ptune_rt.apply(copy.deepcopy(base), lora(True, **kw))
    randomize_lora_b(plain)
    fused.load_state_dict(plain.state_dict())  # the same A (drawn at apply) and B
    return plain, fused


def train_step(model, ids, seed=7):
    model.train()
    torch.manual_seed(seed)  # the dropout seeds are drawn from torch's generator, call by call
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_step(plain, fused, ids) -> dict:
    """One training step of each, same seed: the loss and every gradient bit for bit; returns the
    gradients."""
    loss_p, grads_p = train_step(plain, ids)
    loss_f, grads_f = train_step(fused, ids)
    assert torch.equal(loss_p, loss_f)
    assert set(grads_p) == set(grads_f)
    for n in grads_p:
        assert torch.equal(grads_p[n], grads_f[n]), n
    return grads_p


def saved_bytes(model, ids) -> int:
    """Unique storages autograd saves during one training step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_same_loss_and_gradients_bit_for_bit(factory, dropout):
    plain, fused = pair(factory, dropout=dropout)
    assert not any(isinstance(m, RecomputeSwiGLUMixin) for m in plain.modules())
    assert sum(isinstance(m, RecomputeSwiGLUMixin) for m in fused.modules()) == 2
    ids = input_ids(batch=2, seq=9)
    assert len(assert_same_step(plain, fused, ids)) == 2 * 7 * 2


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_half_base_and_checkpointing_bit_for_bit(checkpointing):
    """A bfloat16 base with fp32 adapters (PEFT's default) and dropout, with and without HF's
    (non-reentrant) gradient checkpointing, which reruns the forward in backward."""
    plain, fused = pair(lambda: tiny_llama(dtype=torch.bfloat16), dropout=0.1)
    assert fused.model.layers[0].mlp.down_proj.lora_A["default"].weight.dtype == torch.float32
    if checkpointing:
        for m in (plain, fused):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = input_ids(batch=2, seq=9)
    assert_same_step(plain, fused, ids)


def test_triton_backend_bit_for_bit_under_the_interpreter():
    plain, fused = pair(lambda: tiny_llama(layers=1), dropout=0.1, backend="triton",
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    ids = input_ids(batch=2, seq=5)
    assert_same_step(plain, fused, ids)


def test_saves_two_intermediate_tensors_fewer_per_layer():
    plain, fused = pair(tiny_llama)
    batch, seq = 2, 9
    ids = input_ids(batch=batch, seq=seq)
    inter = plain.config.intermediate_size
    one = batch * seq * inter * 4  # one fp32 [tokens, intermediate] tensor
    layers = plain.config.num_hidden_layers
    assert saved_bytes(plain, ids) - saved_bytes(fused, ids) == 2 * layers * one


def test_only_where_it_applies():
    # GPT-2's MLP is not gated
    assert swiglu_mlps(ptune_rt.apply(tiny_gpt2(), LoRAConfig(r=4, target_modules=["c_fc", "c_proj"]))) == {}
    # the down projection is not a target: nothing to recompute into
    m = ptune_rt.apply(tiny_llama(), lora(True, target_modules=["gate_proj", "up_proj"]))
    assert not any(isinstance(x, RecomputeSwiGLUMixin) for x in m.modules())
    # a subclass with its own forward is left alone (the syntax check of forward fails)
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ScaledMLP(LlamaMLP):
        def forward(self, x):
            return 2.0 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    ScaledMLP.__module__ = LlamaMLP.__module__  # looks like a transformers class to the module check
    base = tiny_llama()
    for layer in base.model.layers:
        layer.mlp.__class__ = ScaledMLP
    m = ptune_rt.apply(base, lora(True))
    assert not any(isinstance(x, RecomputeSwiGLUMixin) for x in m.modules())
    # another activation
    base = tiny_llama()
    for layer in base.model.layers:
        layer.mlp.act_fn = nn.GELU()
    assert swiglu_mlps(ptune_rt.apply(base, lora(True))) == {}


def test_hooks_on_the_down_projection_still_fire():
    plain, fused = pair(tiny_llama)
    seen = []
    fused.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    ids = input_ids(batch=2, seq=9)
    assert_same_step(plain, fused, ids)
    assert seen == [torch.Size([2, 9, plain.config.intermediate_size])]
    loss_p = train_step(plain, ids)[0]
    # a forward wrapped on the instance (as accelerate's device-placement hooks do) is called too
    down = fused.model.layers[1].mlp.down_proj
    inner, calls = down.forward, []
    down.forward = lambda x: calls.append(x.shape) or inner(x)
    assert torch.equal(train_step(fused, ids)[0], loss_p)
    assert calls == [torch.Size([2, 9, plain.config.intermediate_size])]


def test_report_restore_and_eval():
    base = tiny_llama()
    m = ptune_rt.apply(copy.deepcopy(base), lora(True))
    flagged = sorted(r["module"] for r in ptune_rt.report(m) if r["recompute_input"])
    assert flagged == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = m.model.layers[0].mlp
    assert isinstance(mlp, LlamaMLP) and type(mlp).__name__ == "LlamaMLP"
    twin = ptune_rt.apply(copy.deepcopy(base), lora(False))
    assert list(m.state_dict()) == list(twin.state_dict())
    randomize_lora_b(m)
    ids = input_ids()
    with torch.no_grad():  # no autograd: the plain path (and the cached inference path)
        ref = ptune_rt.restore(copy.deepcopy(m))  # restore() gives LlamaMLP back ...
    assert type(ref.model.layers[0].mlp) is LlamaMLP
    assert not any(isinstance(x, RecomputeSwiGLUMixin) for x in ref.modules())
    torch.testing.assert_close(ref(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=0, atol=0)


def test_accelerate_turns_it_on_and_restore_off():
    base = tiny_llama()
    peft_model = peft_lora_model(copy.deepcopy(base), ALL)  # non-zero lora_B
    ids = input_ids(batch=2, seq=9)
    loss_peft, grads_peft = train_step(peft_model, ids)
    ptune_rt.accelerate(peft_model)
    assert sum(isinstance(x, RecomputeSwiGLUMixin) for x in peft_model.modules()) == 2
    loss_acc, grads_acc = train_step(peft_model, ids)
    torch.testing.assert_close(loss_acc, loss_peft, rtol=0, atol=0)
    assert set(grads_acc) == set(grads_peft) and len(grads_acc) == 2 * 7 * 2
    for n in grads_peft:
        torch.testing.assert_close(grads_acc[n], grads_peft[n], rtol=1e-5, atol=1e-7)
    ptune_rt.restore(peft_model)
    assert not any(isinstance(x, RecomputeSwiGLUMixin) for x in peft_model.modules())


def test_config_round_trip_and_validation():
    cfg = LoRAConfig(r=4, recompute_mlp=False)
    assert LoRAConfig.from_json(cfg.to_json()) == cfg
    old = cfg.to_dict()
    old.pop("recompute_mlp")  # a config written before the field existed
    assert LoRAConfig.from_dict(old).recompute_mlp is True
    with pytest.raises(ValueError, match="recompute_mlp must be True or False"):
        LoRAConfig(r=4, recompute_mlp="yes")


def test_op_rejects_mismatched_gate_and_up():
    w, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    g = torch.randn(3, 8)
    with pytest.raises(ValueError, match="g and u must have one shape"):
        lora_linear_swiglu(g, torch.randn(3, 7), w, None, a, b, 1.0)
    with pytest.raises(ValueError, match="g and u must have one shape, dtype"):
        lora_linear_swiglu(g, g.double(), w, None, a, b, 1.0)
    with pytest.raises(ValueError, match="in_features=8"):
        lora_linear_swiglu(g[:, :5], g[:, :5], w, None, a, b, 1.0)


@pytest.mark.parametrize("recompute", [True, False])
def test_checkpoint_carries_the_setting(tmp_path, recompute):
    m = ptune_rt.apply(tiny_llama(), lora(recompute))
    ptune_rt.save_adapter(m, tmp_path / "a", format="ptune")
    fresh = ptune_rt.load_adapter(tiny_llama(), tmp_path / "a")
    assert any(isinstance(x, RecomputeSwiGLUMixin) for x in fresh.modules()) is recompute
