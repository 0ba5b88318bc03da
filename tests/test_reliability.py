"""Failures that used to be silent or unclear: each test here failed before its fix.

Gradient checkpointing over the Triton SwiGLU path, merging a tied output layer, non-finite LoRA
values, float64 models, bad regexes in checkpoints, merging on the meta device, a prompt on top
of a prefix, task ids of every integer dtype, training a merged model, unreadable weights.
"""
import copy

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig

from helpers_models import assert_unchanged, input_ids, randomize_lora_b, snapshot, tiny_llama


def _train_grads(model, ids):
    model.train()
    torch.manual_seed(7)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# ----------------------------------------------------------------------------------------------
# item 3: the Triton SwiGLU backward under non-reentrant gradient checkpointing
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_triton_swiglu_recompute_under_gradient_checkpointing():
    """The default config (recompute_mlp=True, down_proj targeted) on the Triton backend with HF's
    non-reentrant checkpointing: backward unpacks each saved tensor once, and the gradients equal
    those of the same model without checkpointing bit for bit."""
    base = tiny_llama(layers=1)
    cfg = LoRAConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], backend="triton")
    plain = ptune_rt.apply(copy.deepcopy(base), cfg)
    randomize_lora_b(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(r["recompute_input"] for r in ptune_rt.report(ckpt))
    ids = input_ids(batch=2, seq=5)
    loss_p, grads_p = _train_grads(plain, ids)
    loss_c, grads_c = _train_grads(ckpt, ids)
    assert torch.equal(loss_p, loss_c)
    assert grads_p.keys() == grads_c.keys()
    for n in grads_p:
        assert torch.equal(grads_p[n], grads_c[n]), n


# ----------------------------------------------------------------------------------------------
# item 4: merging a LoRA lm_head of a tied model
# ----------------------------------------------------------------------------------------------

def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ptune_rt.apply(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    randomize_lora_b(model)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_refuses_a_tied_lm_head_and_changes_nothing():
    model = tied_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head' is tied to \['model.embed_tokens.weight'\].*untie=True"):
        ptune_rt.merge(model)
    assert_unchanged(model, snap)
    assert not any(r["merged"] for r in ptune_rt.report(model))


def test_merge_untie_gives_the_lm_head_its_own_weight():
    model = tied_llama()
    ids = input_ids(batch=2, seq=6)
    before = _logits(model, ids)
    embed = model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'lm_head' is tied to \['model.embed_tokens.weight'\]"):
        ptune_rt.merge(model, untie=True)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the embedding did not get s B A
    assert model.lm_head.base_layer.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)
    ptune_rt.unmerge(model)
    assert torch.equal(model.lm_head.base_layer.weight, embed)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_merge_untie_is_undone_when_the_merge_fails():
    model = tied_llama()
    with torch.no_grad():
        # merging gives a non-finite weight
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(float("inf"))
    snap = snapshot(model)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="non-finite"):
        ptune_rt.merge(model, untie=True)
    assert_unchanged(model, snap)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True



# ----------------------------------------------------------------------------------------------
# item 5: non-finite LoRA values
# ----------------------------------------------------------------------------------------------

def saved_lora(tmp_path, fmt="peft"):
    model = ptune_rt.apply(tiny_llama(layers=1), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    ptune_rt.save_adapter(model, tmp_path, format=fmt)
    return tmp_path


@pytest.mark.parametrize("fmt", ["peft", "ptune"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_lora_checkpoint_with_non_finite_values_is_refused(tmp_path, fmt, value):
    from safetensors.torch import load_file, save_file

    d = saved_lora(tmp_path, fmt)
    weights = d / ("adapter_model.safetensors" if fmt == "peft" else "adapter.safetensors")
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for model in (tiny_llama(layers=1), ptune_rt.apply(tiny_llama(layers=1), LoRAConfig(r=4, target_modules=[
            "q_proj", "v_proj"]))):
        snap = snapshot(model)
        with pytest.raises(ptune_rt.io.AdapterError, match=rf"{key}.*non-finite"):
            ptune_rt.load_adapter(model, d)
        assert_unchanged(model, snap)


@pytest.mark.parametrize("field,value", [("alpha", float("nan")), ("alpha", float("inf")), ("alpha", -float("inf")),
                                         ("alpha", True), ("dropout", "0.1"), ("dropout", float("nan")),
                                         ("r", 4.0), ("use_rslora", "false")])
def test_lora_config_refuses_non_finite_and_wrong_types(field, value):
    with pytest.raises(ValueError, match=rf"LoRAConfig\.{field} must be"):
        LoRAConfig(**{field: value})


@pytest.mark.parametrize("field,text", [("lora_alpha", "NaN"), ("lora_alpha", "Infinity"), ("lora_dropout", '"0.1"'),
                                        ("use_rslora", '"false"'), ("r", "4.5")])
def test_peft_config_with_non_finite_or_wrong_type_is_refused(tmp_path, field, text):
    import json
    import re

    d = saved_lora(tmp_path)
    raw = (d / "adapter_config.json").read_text()
    raw = re.sub(rf'"{field}": [^,\n]+', f'"{field}": {text}', raw)
    assert json.loads(raw)[field] is not None
    (d / "adapter_config.json").write_text(raw)
    model = tiny_llama(layers=1)
    snap = snapshot(model)
    with pytest.raises(ptune_rt.io.AdapterError, match=rf"adapter_config.json: {field} must be"):
        ptune_rt.load_adapter(model, d)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# item 6: float64 models
# ----------------------------------------------------------------------------------------------

def test_float64_lora_runs_on_the_torch_path():
    """A float64 model is a reference run: its LoRA layers compute with plain torch ops (the fused op
    takes float32 / float16 / bfloat16), forward and backward, and report says so."""
    model = ptune_rt.apply(tiny_llama(layers=1, dtype=torch.float64),
                           LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], dropout=0.1))
    randomize_lora_b(model)
    rows = ptune_rt.report(model)
    assert {r["backend"] for r in rows} == {"torch"} and all("float64" in r["why"] for r in rows)
    ids = input_ids(batch=2, seq=40)  # above the small-batch threshold too
    loss, grads = _train_grads(model, ids)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    before = _logits(model, ids)
    ptune_rt.merge(model)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["lora-triton", "prefix"])
def test_float64_is_refused_at_apply_where_it_cannot_run(method):
    model = tiny_llama(layers=1, dtype=torch.float64)
    snap = snapshot(model)
    config = (LoRAConfig(r=4, target_modules=["q_proj"], backend="triton") if method == "lora-triton"
              else ptune_rt.PrefixConfig(3))
    with pytest.raises(ValueError, match="float64"):
        ptune_rt.apply(model, config)
    assert_unchanged(model, snap)


def test_float64_prefix_checkpoint_is_refused_before_loading(tmp_path):
    source = ptune_rt.apply(tiny_llama(layers=1), ptune_rt.PrefixConfig(3))
    ptune_rt.save_adapter(source, tmp_path)
    model = tiny_llama(layers=1, dtype=torch.float64)
    snap = snapshot(model)
    with pytest.raises(ptune_rt.io.AdapterError, match="float64"):
        ptune_rt.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# item 7: a bad regex in a checkpoint
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,field", [("peft", "target_modules"), ("peft", "exclude_modules"),
                                       ("ptune", "target_modules")])
def test_bad_regex_in_a_checkpoint_is_an_adapter_error(tmp_path, fmt, field):
    import json

    d = saved_lora(tmp_path, fmt)
    cfg_file = d / ("adapter_config.json" if fmt == "peft" else "ptune_config.json")
    cfg = json.loads(cfg_file.read_text())
    (cfg if fmt == "peft" else cfg["config"])[field] = "model.(q_proj"
    cfg_file.write_text(json.dumps(cfg))
    model = tiny_llama(layers=1)
    snap = snapshot(model)
    with pytest.raises(ptune_rt.io.AdapterError, match=rf"{field}='model.\(q_proj' is not a valid regular expression"):
        ptune_rt.load_adapter(model, d)
    assert_unchanged(model, snap)


def test_bad_regex_in_a_config_names_the_field():
    with pytest.raises(ValueError, match=r"LoRAConfig.target_modules='\(' is not a valid regular expression"):
        LoRAConfig(target_modules="(")


# ----------------------------------------------------------------------------------------------
# minor items
# ----------------------------------------------------------------------------------------------

def test_merge_on_the_meta_device_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ptune_rt.apply(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    weights = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="meta device"):
        ptune_rt.merge(model)
    assert dict(model.named_parameters()) == weights and not any(r["merged"] for r in ptune_rt.report(model))
    with pytest.raises(ValueError, match="meta device"):
        model.model.layers[0].self_attn.q_proj.merge()


def test_prompt_on_a_prefix_names_the_prefix_not_peft():
    model = ptune_rt.apply(tiny_llama(layers=1), ptune_rt.PrefixConfig(3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already carries a ptune-rt prefix.*restore") as e:
        ptune_rt.apply(model, ptune_rt.PromptTuningConfig(3))
    assert "PEFT" not in str(e.value)
    assert_unchanged(model, snap)


INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("method", ["prefix", "prompt_tuning", "p_tuning"])
def test_task_ids_of_every_integer_dtype_are_accepted_alike(method):
    configs = {"prefix": ptune_rt.PrefixConfig(3, num_tasks=2), "prompt_tuning": ptune_rt.PromptTuningConfig(
        3, num_tasks=2), "p_tuning": ptune_rt.PTuningConfig(3, num_tasks=2)}
    model = ptune_rt.apply(tiny_llama(layers=1), configs[method])
    ids = input_ids(batch=2, seq=5)
    with torch.no_grad():
        want = model(input_ids=ids, task_ids=torch.tensor([1, 0])).logits
        for dt in INT_DTYPES:
            got = model(input_ids=ids, task_ids=torch.tensor([1, 0]).to(dt)).logits
            assert torch.equal(got, want), dt
        for bad in (torch.tensor([1.0, 0.0]), torch.tensor([True, False])):
            with pytest.raises(ValueError, match="task_ids must be an integer tensor"):
                model(input_ids=ids, task_ids=bad)
        with pytest.raises(ValueError, match=r"task_ids must be in \[0, num_tasks=2\)"):
            model(input_ids=ids, task_ids=torch.tensor([-1, 0]).to(torch.uint64))  # 2**64 - 1


def test_training_a_merged_model_names_merge_and_unmerge():
    model = ptune_rt.apply(tiny_llama(layers=1), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ptune_rt.merge(model)
    model.train()
    ids = input_ids(batch=2, seq=5)
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match=r"merged into the base weight.*ptune_rt.unmerge\(model\)"):
        loss.backward()
    with torch.no_grad():  # inference on the merged model is unaffected
        model(input_ids=ids)
    ptune_rt.unmerge(model)
    _train_grads(model, ids)  # trains once unmerged


def test_unreadable_weights_file_says_permission_denied(request):
    """A weights file the loading user may not read is reported as such (safetensors said "No such
    file or directory"). As root, the load runs in a forked child that drops to user nobody."""
    import multiprocessing
    import os
    import shutil
    import tempfile

    top = tempfile.mkdtemp()  # under /tmp, so that user nobody can reach it (pytest's tmp_path is 0700)
    request.addfinalizer(lambda: shutil.rmtree(top))
    d = os.path.join(top, "ckpt")
    os.chmod(top, 0o755)
    saved_lora(d)
    os.chmod(os.path.join(d, "adapter_model.safetensors"), 0)
    model = tiny_llama(layers=1)

    def load() -> str:
        try:
            ptune_rt.load_adapter(model, d)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "loaded"

    if os.geteuid() != 0:
        message = load()
    else:
        reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)

        def child():
            os.setgid(65534)
            os.setuid(65534)
            writer.send(load())
            os._exit(0)

        p = multiprocessing.get_context("fork").Process(target=child)
        p.start()
        p.join(60)
        message = reader.recv()
    assert message.startswith("PermissionError") and "adapter_model.safetensors" in message, message
    assert "No such file" not in message


def test_merge_untie_must_be_a_bool():
    model = tied_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="untie must be True or False"):
        ptune_rt.merge(model, untie="yes")
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# The ops validate like the configs do
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "2", True])
def test_lora_op_refuses_a_non_finite_or_non_number_scale(scale):
    from ptune_rt.ops.lora_linear import lora_linear
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        lora_linear(x, w, None, a, b, scale)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.uint8, torch.int16])
def test_prefix_attention_op_takes_task_ids_of_every_integer_dtype(dtype):
    from ptune_rt.ops.prefix_attention import prefix_attention
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    pk, pv = torch.randn(3, 2, 4, 16, generator=g), torch.randn(3, 2, 4, 16, generator=g)
    want = prefix_attention(q, k, k, pk, pv, task_ids=torch.tensor([2, 0]), backend="torch")
    got = prefix_attention(q, k, k, pk, pv, task_ids=torch.tensor([2, 0]).to(dtype), backend="torch")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        prefix_attention(q, k, k, pk, pv, task_ids=torch.tensor([3, 0]).to(dtype), backend="torch")
