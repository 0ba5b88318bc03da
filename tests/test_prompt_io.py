"""Soft-prompt checkpoints (prompt tuning, P-tuning v1): PEFT's layout both ways (checked against
PEFT 0.21.2 itself on tiny Llama and GPT-2), the own format's round trip (encoders, task stacks,
templates), and refusal of checkpoints that do not fit (the model is left exactly as it was)."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ptune_rt
from ptune_rt import LoRAConfig, PromptTuningConfig, PTuningConfig, load_adapter, save_adapter
from ptune_rt.io import AdapterError
from ptune_rt.methods.prompt.checkpoint import SavedTokens
from ptune_rt.methods.prompt.inject import prompt_state
from ptune_rt.methods.prompt import is_prompt_model, prompt_report
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import HIDDEN, VOCAB, assert_unchanged, input_ids, snapshot, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import PeftModel, PromptEncoderConfig, get_peft_model  # noqa: E402
from peft import PromptTuningConfig as PeftPromptTuningConfig  # noqa: E402

P = 4
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
KINDS = ["prompt", "mlp", "lstm"]


# ---------------------------------------------------------------------------------------------- helpers

def word_tokenizer():
    """Whitespace word-level tokenizer over "w1" .. "w127" (ids 1..127)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1, 128)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _llama(hidden: int = HIDDEN) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def peft_config(kind, **kw):
    if kind == "prompt":
        return PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32,
                               encoder_reparameterization_type=kind.upper(), **kw)


def our_config(kind, **kw):
    if kind == "prompt":
        return PromptTuningConfig(P, **kw)
    return PTuningConfig(P, encoder=kind, encoder_hidden_size=32, **kw)


def _perturb(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def peft_save(base, kind, path, seed=7, **kw):
    """A PEFT soft-prompt model on a copy of ``base`` with trained-looking weights, saved by PEFT."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pm = get_peft_model(copy.deepcopy(base), peft_config(kind, **kw))
        _perturb([p for p in pm.parameters() if p.requires_grad], seed)
        pm.save_pretrained(str(path))
    return pm.eval()


def ours(base, kind, seed=3, **kw):
    """A copy of ``base`` with a ptune-rt soft prompt holding seeded random values."""
    model = ptune_rt.apply(copy.deepcopy(base), our_config(kind, **kw))
    _perturb(model.prompt_encoder.parameters(), seed)
    return model


def logits(model, ids=None, **kw):
    ids = input_ids(3, 7) if ids is None else ids
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids, **kw).logits


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def expect_refusal(model, path, match, **kw):
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(model, path, **kw)
    assert_unchanged(model, snap)
    return str(info.value)


def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst)
    peft_layout = (src / "adapter_config.json").exists()
    weights, config = (("adapter_model.safetensors", "adapter_config.json") if peft_layout
                       else ("adapter.safetensors", "ptune_config.json"))
    tensors = load_file(str(src / weights))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / weights), metadata={"format": "pt"})
    cfg = json.loads((src / config).read_text())
    if edit_config:
        edit_config(cfg)
    (dst / config).write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------------------- PEFT -> here

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_checkpoint_loads_with_same_logits(name, kind, tmp_path):
    base = FACTORIES[name]()
    pm = peft_save(base, kind, tmp_path)
    rng = torch.get_rng_state()
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)  # the fresh table's initialisation leaves the caller's RNG alone
    # PEFT saves the virtual tokens themselves (for P-tuning the encoder's output): a plain table, as PEFT runs it
    assert is_prompt_model(model) and prompt_report(model)["method"] == "prompt_tuning"
    table = model.prompt_encoder.default.embedding.weight
    assert torch.equal(table, load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    got = logits(model)
    assert torch.equal(got, logits(peft_load(base, tmp_path)))  # what PEFT itself makes of the file
    assert_fp32_end_to_end_close(got, logits(pm), f"{name} {kind}: the PEFT model that saved it")
    assert (got[:, P:] - logits(base)).abs().max() > 1e-3
    # into a model that already carries a matching table: replaced in place
    mine = ours(base, "prompt")
    before = mine.prompt_encoder.default.embedding.weight
    assert load_adapter(mine, tmp_path) is mine and mine.prompt_encoder.default.embedding.weight is before
    assert torch.equal(logits(mine), got)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_sequence_classification_head_loads(name, tmp_path):
    """modules_to_save (the score head PEFT trains for SEQ_CLS) goes both ways."""
    import transformers

    cls = {"llama": transformers.LlamaForSequenceClassification, "gpt2": transformers.GPT2ForSequenceClassification}
    cfg = FACTORIES[name]().config
    cfg.num_labels = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = cls[name](cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), PeftPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
        _perturb([p for p in pm.parameters() if p.requires_grad], 5)
        pm.save_pretrained(str(tmp_path / "peft"))
    ids = input_ids(2, 6)
    model = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(logits(model, ids), logits(peft_load(base, tmp_path / "peft"), ids))
    assert not torch.equal(model.score.weight, base.score.weight)
    save_adapter(model, tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == {"prompt_embeddings",
                                                                                    "base_model.score.weight"}
    assert torch.equal(logits(peft_load(base, tmp_path / "ours"), ids), logits(model, ids))


# ---------------------------------------------------------------------------------------------- here -> PEFT

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_saved_checkpoint_loads_in_peft(name, kind, tmp_path):
    base = FACTORIES[name]()
    model = ours(base, kind, encoder_dropout=0.5) if kind == "lstm" else ours(base, kind)
    expected = logits(model)
    model.train()  # saved as inference computes it: no encoder dropout, modes left as they were
    save_adapter(model, tmp_path)
    assert all(m.training for m in model.modules())
    model.eval()
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("PROMPT_TUNING" if kind == "prompt" else "P_TUNING")
    pm = peft_load(base, tmp_path)
    assert pm.peft_config["default"].inference_mode
    torch.testing.assert_close(logits(pm), expected, rtol=0, atol=1e-6)
    assert torch.equal(logits(pm), logits(load_adapter(copy.deepcopy(base), tmp_path)))


@pytest.mark.parametrize("name,kind", [("llama", "prompt"), ("gpt2", "mlp"), ("llama", "lstm"), ("gpt2", "text")])
def test_layout_matches_peft_save_pretrained(name, kind, tmp_path):
    """File names, keys, shapes, dtypes, metadata and every config field as PEFT writes them."""
    base = FACTORIES[name]()
    theirs_kw, ours_kw = {}, {}
    if kind == "text":  # text init with a tokenizer known by its path: PEFT's TEXT fields
        word_tokenizer().save_pretrained(tmp_path / "tok")
        from transformers import AutoTokenizer
        theirs_kw = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="w5 w6 w7",
                         tokenizer_name_or_path=str(tmp_path / "tok"))
        ours_kw = dict(init="text", init_text="w5 w6 w7", tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    kind_ = "prompt" if kind == "text" else kind
    peft_save(base, kind_, tmp_path / "peft", **theirs_kw)
    save_adapter(ours(base, kind_, **ours_kw), tmp_path / "ours", format="peft")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]

    def layout(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}, f.metadata()

    assert layout(tmp_path / "ours") == layout(tmp_path / "peft") == ({"prompt_embeddings": ([P, 64], "F32")},
                                                                      {"format": "pt"})
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    my_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(my_cfg) == set(peft_cfg) - {"peft_version"}, set(my_cfg) ^ set(peft_cfg)
    for k, v in my_cfg.items():
        assert v == peft_cfg[k], f"{k}: ours {v!r}, PEFT {peft_cfg[k]!r}"
    config_cls = PeftPromptTuningConfig if kind_ == "prompt" else PromptEncoderConfig
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning from PEFT's config loader
        loaded = config_cls.from_pretrained(str(tmp_path / "ours"))
    assert loaded.num_virtual_tokens == P and loaded.inference_mode


def test_what_peft_format_cannot_hold_is_refused(tmp_path):
    base = tiny_llama()
    for model, match in [(ours(base, "prompt", num_tasks=2), "num_tasks=2 task prompts.*format='ptune'"),
                         (ours(base, "mlp", num_tasks=3), "num_tasks=3 task prompts.*format='ptune'"),
                         (ours(base, "mlp", template="[P*2] {input} [P*2]"),
                          r"template '\[P\*2\] \{input\} \[P\*2\]'.*format='ptune'"),
                         (ours(base, "lstm", template="[P*4] w3 {input}", tokenizer=word_tokenizer()),
                          "PEFT always puts the prompt first.*format='ptune'")]:
        with pytest.raises(AdapterError, match=match):
            save_adapter(model, tmp_path / "x", format="peft")
        assert not (tmp_path / "x").exists()
        save_adapter(model, tmp_path / "own", format="ptune")  # the own format holds them all
    # a template that only looks different still is PEFT's placement
    save_adapter(ours(base, "mlp", template="[P*1] [P*3] {input}"), tmp_path / "front", format="peft")
    with pytest.raises(AdapterError, match="a soft prompt has one adapter"):
        save_adapter(ours(base, "prompt"), tmp_path / "y", adapter_name="other")


# ---------------------------------------------------------------------------------------------- own format

def test_ptune_format_round_trip_keeps_everything_to_resume_training(tmp_path):
    base = tiny_llama()
    tok = word_tokenizer()  # an object without a name: the checkpoint keeps the anchor text's token ids
    template = dict(template="[P*3] {input} [P] w9 w10 {a}", anchors={"a": "w11"}, tokenizer=tok)
    cases = {"lstm": ours(base, "lstm", num_tasks=3, encoder_num_layers=2, encoder_dropout=0.1, backend="torch",
                          **template),
             "mlp": ours(base, "mlp", **template),
             "prompt": ours(base, "prompt", num_tasks=2, init="text", init_text="w5 w6", tokenizer=tok)}
    ids, mask = input_ids(2, 6), torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for kind, model in cases.items():
        d = tmp_path / kind
        save_adapter(model, d, format="ptune")
        assert sorted(os.listdir(d)) == ["adapter.safetensors", "ptune_config.json"]
        cfg = json.loads((d / "ptune_config.json").read_text())
        method = "prompt_tuning" if kind == "prompt" else "p_tuning"
        assert cfg["method"] == method and cfg["format_version"] == 1
        assert cfg["model"] == {"model_type": "llama", "class": "LlamaForCausalLM"}
        fp = cfg["prompt"]
        assert (fp["num_virtual_tokens"], fp["hidden_size"], fp["vocab_size"]) == (P, 64, VOCAB)
        if kind != "prompt":
            assert cfg["config"]["template"] == template["template"] and cfg["config"]["anchors"] == {"a": "w11"}
            assert fp["template"] == [-1, -2, -3, -4, 9, 10, 11] and fp["before_input"] == 3
            assert {(e["text"], e["ids"][0]) for e in fp["tokens"]} == {("w9 w10", 9), ("w11", 11)}
            assert (fp["encoder"], fp["encoder_hidden_size"]) == (kind, 32)
        else:
            assert fp["tokens"] == [{"text": "w5 w6", "special": True, "ids": [5, 6]}]
        saved = load_file(str(d / "adapter.safetensors"))
        enc = model.prompt_encoder.default
        assert set(saved) == {f"prompt_encoder.{n}" for n, _ in enc.named_parameters()}
        assert all(torch.equal(saved[f"prompt_encoder.{n}"], p) for n, p in enc.named_parameters())

        loaded = load_adapter(copy.deepcopy(base), d)  # no tokenizer needed
        got = loaded.prompt_encoder.default
        assert [(n, p.shape) for n, p in got.named_parameters()] == [(n, p.shape) for n, p in enc.named_parameters()]
        assert all(p.requires_grad for p in got.parameters())
        config = prompt_state(loaded).config
        assert isinstance(config.tokenizer, SavedTokens) and config.to_dict() == prompt_state(model).config.to_dict()
        tasks = {"task_ids": torch.tensor([2, 0])} if kind == "lstm" else \
            {"task_ids": torch.tensor([1, 0])} if kind == "prompt" else {}
        assert torch.equal(logits(loaded, ids, attention_mask=mask, **tasks),
                           logits(model, ids, attention_mask=mask, **tasks))
        # training resumes: every encoder parameter gets a gradient, as in the saved model
        loaded(ids, labels=ids, **tasks).loss.backward()
        assert all(p.grad is not None for p in got.parameters())
        save_adapter(loaded, tmp_path / f"{kind}-again", format="ptune")
        again = load_file(str(tmp_path / f"{kind}-again" / "adapter.safetensors"))
        assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
        assert json.loads((tmp_path / f"{kind}-again" / "ptune_config.json").read_text())["prompt"] == fp
    # the saved config re-applies elsewhere with the recorded token ids; the backend can be chosen at load time
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "lstm", backend="auto")
    assert prompt_report(loaded)["backend"] == "torch" and "cpu tensors" in prompt_report(loaded)["why"]
    again = ptune_rt.apply(copy.deepcopy(base), prompt_state(loaded).config)
    assert again.prompt_encoder.default.template_src.tolist() == [-1, -2, -3, -4, 9, 10, 11]
    # into a model that already carries the same soft prompt: weights replaced in place
    target = ours(base, "lstm", num_tasks=3, encoder_num_layers=2, encoder_dropout=0.1, seed=11, **template)
    params = list(target.parameters())
    load_adapter(target, tmp_path / "lstm")
    assert all(a is b for a, b in zip(target.parameters(), params))
    assert torch.equal(logits(target, ids, task_ids=torch.tensor([1, 2])),
                       logits(cases["lstm"], ids, task_ids=torch.tensor([1, 2])))


def test_several_methods_on_one_model_are_saved_one_by_one(tmp_path):
    model = ours(tiny_llama(), "mlp")
    ptune_rt.apply(model, LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="several methods"):
        save_adapter(model, tmp_path)
    save_adapter(model, tmp_path / "prompt", method="p_tuning")
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    with pytest.raises(AdapterError, match="carries no prompt_tuning adapter"):
        save_adapter(model, tmp_path / "x", method="prompt_tuning")


def test_task_stacked_prefix_round_trips_in_the_own_format_only(tmp_path):
    """Prefix tuning with num_tasks > 1 (the prefix sibling of the task stacks above): the own format
    keeps the [T, ...] parameters, PEFT's layout cannot hold them."""
    from ptune_rt import PrefixConfig
    from ptune_rt.methods.prefix.inject import prefix_encoder

    base = tiny_llama()
    ids, tasks = input_ids(3, 5), torch.tensor([2, 0, 1])
    for projection in (False, True):
        model = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(P, num_tasks=3, prefix_projection=projection,
                                                                 encoder_hidden_size=16 if projection else None))
        _perturb(prefix_encoder(model).parameters(), 5)
        with pytest.raises(AdapterError, match="num_tasks=3 task prefixes.*format='ptune'"):
            save_adapter(model, tmp_path / "peft", format="peft")
        d = tmp_path / f"own-{projection}"
        save_adapter(model, d, format="ptune")
        assert load_file(str(d / "adapter.safetensors"))["prompt_encoder.embedding.weight"].shape[0] == 3
        loaded = load_adapter(copy.deepcopy(base), d)
        assert torch.equal(logits(loaded, ids, task_ids=tasks), logits(model, ids, task_ids=tasks))
        one_task = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(P, prefix_projection=projection,
                                                                    encoder_hidden_size=16 if projection else None))
        expect_refusal(one_task, d, "num_tasks=3, the model's prefix has 1")
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A PEFT prompt-tuning checkpoint and own-format P-tuning (MLP) and prompt-tuning ones of the tiny Llama."""
    root = tmp_path_factory.mktemp("prompt_ckpt")
    base = tiny_llama()
    peft_save(base, "prompt", root / "peft")
    save_adapter(ours(base, "mlp"), root / "mlp", format="ptune")
    save_adapter(ours(base, "prompt"), root / "table", format="ptune")
    return root


def test_checkpoints_that_do_not_fit_are_refused(dirs):
    base = tiny_llama()
    peft_dir, mlp_dir, table_dir = dirs / "peft", dirs / "mlp", dirs / "table"
    # P mismatch
    for d in (peft_dir, table_dir):
        msg = expect_refusal(ptune_rt.apply(copy.deepcopy(base), PromptTuningConfig(6)), d,
                             "num_virtual_tokens=4, the model's soft prompt has 6")
        assert "ptune_rt.restore(model)" in msg
    # hidden size mismatch, fresh or not
    for d in (peft_dir, mlp_dir, table_dir):
        msg = expect_refusal(_llama(hidden=32), d, "hidden size mismatch")
        assert "64 wide" in msg and "32 wide" in msg and "another base model" in msg
    expect_refusal(ptune_rt.apply(_llama(hidden=32), PromptTuningConfig(P)), peft_dir, "hidden size mismatch")
    # wrong model type (same hidden size)
    expect_refusal(tiny_gpt2(), mlp_dir, r"saved for model_type 'llama' \(LlamaForCausalLM\), this model is 'gpt2'")
    # a PEFT table into a model whose virtual tokens come from an encoder
    expect_refusal(ours(base, "mlp"), peft_dir, r"holds the virtual tokens themselves.*P-tuning encoder")
    # method, tasks, encoder, template differ from the model's soft prompt
    expect_refusal(ours(base, "prompt"), mlp_dir, "p_tuning soft prompt, the model carries a prompt_tuning one")
    expect_refusal(ours(base, "mlp", num_tasks=2), mlp_dir, "num_tasks=1, the model's soft prompt has 2")
    expect_refusal(ours(base, "lstm"), mlp_dir, "encoder is 'mlp', the model's 'lstm'")
    expect_refusal(ptune_rt.apply(copy.deepcopy(base), PTuningConfig(P, encoder_hidden_size=16)), mlp_dir,
                   "encoder_hidden_size=32, the model's 16")
    expect_refusal(ours(base, "mlp", template="[P*2] {input} [P*2]"), mlp_dir, r"template is \[-1, -2, -3, -4\]")
    expect_refusal(ours(base, "prompt"), table_dir, "a soft prompt has one adapter", adapter_name="other")
    # a prefix model already owns prompt_encoder
    expect_refusal(ptune_rt.apply(copy.deepcopy(base), ptune_rt.PrefixConfig(P)), peft_dir,
                   "already has a 'prompt_encoder'")


def test_bad_files_are_named(dirs, tmp_path):
    peft_dir, mlp_dir = dirs / "peft", dirs / "mlp"
    model = tiny_llama()
    d = edited_copy(peft_dir, tmp_path / "missing", lambda t: t.pop("prompt_embeddings"))
    expect_refusal(model, d, r"missing key 'prompt_embeddings' \(expected shape \[4, 64\]\)")
    d = edited_copy(peft_dir, tmp_path / "shape", lambda t: t.update(prompt_embeddings=torch.zeros(5, 64)))
    expect_refusal(model, d, r"shape mismatch for 'prompt_embeddings': expected \[4, 64\] \[P, hidden\] = \[4, 64\], "
                             r"found \[5, 64\]")
    d = edited_copy(peft_dir, tmp_path / "int", lambda t: t.update(prompt_embeddings=torch.zeros(4, 64,
                                                                                                 dtype=torch.int32)))
    expect_refusal(model, d, "expected a floating-point tensor")
    d = edited_copy(peft_dir, tmp_path / "nan", lambda t: t["prompt_embeddings"].__setitem__((0, 0), float("inf")))
    expect_refusal(model, d, "non-finite")
    d = edited_copy(peft_dir, tmp_path / "head", lambda t: t.update({"base_model.score.weight": torch.zeros(3, 64)}))
    expect_refusal(model, d, r"unexpected key 'base_model\.score\.weight' \(there is no module 'score'")
    d = edited_copy(peft_dir, tmp_path / "key", lambda t: t.update({"prompt_encoder.weight": torch.zeros(1)}))
    expect_refusal(model, d, r"key 'prompt_encoder\.weight' is neither 'prompt_embeddings' nor a head key.*"
                             "PEFT prompt-tuning checkpoint")
    for field, value, match in [("num_transformer_submodules", 2, "num_transformer_submodules=2"),
                                ("num_virtual_tokens", 0, "'num_virtual_tokens' must be an integer >= 1"),
                                ("token_dim", "64", "'token_dim' must be an integer"),
                                ("task_type", "CHAT", "task_type 'CHAT' is not one of")]:
        d = edited_copy(peft_dir, tmp_path / field, edit_config=lambda c: c.update({field: value}))
        expect_refusal(model, d, match)
    d = edited_copy(peft_dir, tmp_path / "ptype", edit_config=lambda c: c.update(
        peft_type="P_TUNING", encoder_reparameterization_type="GRU"))
    expect_refusal(model, d, "encoder_reparameterization_type 'GRU' is not one of")
    # own format: tensors and fingerprint
    d = edited_copy(mlp_dir, tmp_path / "own-missing", lambda t: t.pop("prompt_encoder.mlp_head.4.bias"))
    expect_refusal(model, d, r"missing key 'prompt_encoder\.mlp_head\.4\.bias' \(expected shape \[64\]\)")
    d = edited_copy(mlp_dir, tmp_path / "own-shape",
                    lambda t: t.update({"prompt_encoder.mlp_head.0.weight": torch.zeros(16, 64)}))
    expect_refusal(model, d, r"shape mismatch for 'prompt_encoder\.mlp_head\.0\.weight': expected \[32, 64\] "
                             r"\(P=4, num_tasks=1, hidden size 64, mlp encoder_hidden_size=32\)")
    d = edited_copy(mlp_dir, tmp_path / "own-extra",
                    lambda t: t.update({"prompt_encoder.lstm_head.x": torch.zeros(2)}))
    expect_refusal(model, d, r"unexpected key 'prompt_encoder\.lstm_head\.x'")
    d = edited_copy(mlp_dir, tmp_path / "own-template",
                    edit_config=lambda c: c["prompt"].update(template=[-1, -2, -4, -3]))
    expect_refusal(model, d, r"prompt\.template=\[-1, -2, -4, -3\].*does not match")
    d = edited_copy(mlp_dir, tmp_path / "own-P", edit_config=lambda c: c["prompt"].update(num_virtual_tokens=5))
    expect_refusal(model, d, r"prompt\.num_virtual_tokens=5 but config\.num_virtual_tokens=4")
    d = edited_copy(mlp_dir, tmp_path / "own-config", edit_config=lambda c: c["config"].update(encoder="gru"))
    expect_refusal(model, d, r"invalid p_tuning config: PTuningConfig\.encoder must be one of")
    d = edited_copy(mlp_dir, tmp_path / "own-tokens", edit_config=lambda c: c["config"].update(
        template="[P*4] {input} w7", tokenizer="some/tokenizer"))
    expect_refusal(model, d, r"cannot rebuild the template from the saved token ids.*only knows the texts")


def test_corrupt_truncated_and_pickle_files_are_refused(dirs, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load must never be called")

    peft_dir, mlp_dir = dirs / "peft", dirs / "mlp"
    pickled = tmp_path / "pickle"
    os.makedirs(pickled)
    (pickled / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    torch.save({"prompt_embeddings": torch.zeros(4, 64)}, str(pickled / "adapter_model.bin"))
    monkeypatch.setattr(torch, "load", refuse)
    model = tiny_llama()
    for src, weights, config in ((peft_dir, "adapter_model.safetensors", "adapter_config.json"),
                                 (mlp_dir, "adapter.safetensors", "ptune_config.json")):
        data = (src / weights).read_bytes()
        blobs = [("truncated", data[:-9]), ("header", data[:6]), ("garbage", b"\x00\x01 not safetensors" * 5)]
        for name, blob in blobs:
            d = tmp_path / f"{src.name}-{name}"
            os.makedirs(d)
            (d / weights).write_bytes(blob)
            (d / config).write_text((src / config).read_text())
            msg = expect_refusal(model, d, "not a readable safetensors file")
            assert str(d / weights) in msg
    msg = expect_refusal(model, pickled, "pickle checkpoints")
    assert "adapter_model.bin" in msg
    expect_refusal(model, pickled / "adapter_model.bin", "pickle checkpoints")


def test_failure_while_loading_rolls_back(dirs, monkeypatch):
    """A copy failing after the others (the encoder's last tensor) leaves the model as it was."""
    original = torch.Tensor.copy_
    fired = []

    def failing_copy(self, src, *a, **k):
        if not fired and tuple(src.shape) in ((P, 64), (64,)):  # prompt_embeddings / mlp_head.4.bias
            fired.append(1)
            raise RuntimeError("injected copy failure")
        return original(self, src, *a, **k)

    base = tiny_llama()
    for d, kind in ((dirs / "peft", "prompt"), (dirs / "mlp", "mlp")):
        for model in (copy.deepcopy(base), ours(base, kind)):
            fired.clear()
            snap = snapshot(model)
            monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
            with pytest.raises(RuntimeError, match="injected"):
                load_adapter(model, d)
            monkeypatch.undo()
            assert fired
            assert_unchanged(model, snap)


def test_plain_peft_prompt_model_is_refused(dirs, tmp_path):
    pm = peft_save(tiny_llama(), "mlp", tmp_path / "peft")
    for call in (lambda: save_adapter(pm, tmp_path / "x"), lambda: load_adapter(pm, dirs / "peft")):
        with pytest.raises(AdapterError, match=r"PEFT P_TUNING model that PEFT runs itself.*load_adapter\(base_model"):
            call()
    assert not (tmp_path / "x").exists()
