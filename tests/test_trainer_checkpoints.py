"""A real ``transformers.Trainer`` on a model passed through ``ptune_rt.apply`` (tiny Llama, CPU):
its checkpoints hold the adapter in PEFT's layout and the trainable parameters, nothing of the
frozen base (ptune_rt/trainer_checkpoints.py); ``ptune_rt.load_adapter`` and
``PeftModel.from_pretrained`` load them with the trained logits; ``resume_from_checkpoint`` ends on
the uninterrupted run's weights; ``load_best_model_at_end`` loads the best checkpoint;
``from_pretrained(checkpoint)`` loads base + adapter or fails, never random weights."""
import copy
import logging
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import ptune_rt
from ptune_rt import trainer_checkpoints
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

from helpers_models import VOCAB, tiny_llama
from test_registry import tiny_llama_with_biases, train_steps

CONFIGS = {
    "lora": lambda: ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    # with the MLP: PEFT's file holds the projected prefix, the Trainer's reload file the MLP itself
    "prefix": lambda: ptune_rt.PrefixConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32),
    "prompt_tuning": lambda: ptune_rt.PromptTuningConfig(num_virtual_tokens=4),
}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved plain tiny Llama: bases loaded from it carry its path as their name, as a hub model
    would, so adapter_config.json names the base."""
    d = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(d)
    return d


def fresh_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()


def run(base_dir, method, out, resume=None, steps=4, **args):
    model = ptune_rt.apply(fresh_base(base_dir), CONFIGS[method]())
    trainer = Trainer(model=model, train_dataset=Tokens(8), eval_dataset=Tokens(8),
                      args=TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2,
                                             per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                                             use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, **args))
    records = Records()
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    finally:
        trainer_log.removeHandler(records)
    # the Trainer's reloads report no missing or unexpected keys (the frozen base is not missing)
    assert not [m for m in records.messages if "keys" in m], records.messages
    return trainer


def trained_in(ckpt):
    """The trainable parameters in a checkpoint's model.safetensors (without its zero-size guard)."""
    return {k: v for k, v in load_file(ckpt / "model.safetensors").items() if v.numel()}


def logits(model):
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_checkpoints_are_adapters_that_load_both_ways_and_resume(method, base_dir, tmp_path, monkeypatch):
    import peft

    trainer = run(base_dir, method, tmp_path / "run")
    model = trainer.model
    trained = logits(model)
    assert (trained[:, -10:] - logits(fresh_base(base_dir))).abs().max() > 1e-3, "training changed nothing"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = set(trainer_checkpoints.trainable_state(model))
    for step in (2, 4):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert ADAPTER_FILES <= files and "config.json" not in files, files
        reload = load_file(ckpt / "model.safetensors")  # the trainable parameters and a zero-size guard
        assert set(reload) - trainable == {"model.embed_tokens.weight"}
        assert not reload["model.embed_tokens.weight"].numel()
        adapter_keys = load_file(ckpt / "adapter_model.safetensors")
        assert not {k.removeprefix("base_model.model.") for k in adapter_keys} & frozen
        assert not any("base_layer" in k for k in adapter_keys)
    ckpt = tmp_path / "run" / "checkpoint-4"
    weights = sum(os.path.getsize(ckpt / f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    base_weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert weights < base_weights / 10, (weights, base_weights)

    assert_fp32_end_to_end_close(logits(ptune_rt.load_adapter(fresh_base(base_dir), ckpt)), trained,
                                 f"{method}: ptune_rt.load_adapter of the checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(fresh_base(base_dir), ckpt)
    assert_fp32_end_to_end_close(logits(pm), trained, f"{method}: PeftModel.from_pretrained of the checkpoint")
    # transformers reads adapter_config.json: the base named there plus the adapter, or (prompt
    # learning, which transformers' PEFT integration does not load) an error, as for PEFT's own
    # checkpoints; never the base's random initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "lora":
            loaded = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
            assert_fp32_end_to_end_close(logits(loaded), trained, f"{method}: from_pretrained(checkpoint)")
        else:
            with pytest.raises(ValueError):
                LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
        # without PEFT, given the config (transformers 5.x takes the class's default one for a folder
        # without config.json: a 7B Llama, too big to build here), model.safetensors is read as a
        # model: its guard, a zero-size tensor under the embedding's name, stops the load
        with monkeypatch.context() as m:
            m.setattr(transformers.integrations.peft, "is_peft_available", lambda: False)
            with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                LlamaForCausalLM.from_pretrained(ckpt, config=LlamaConfig.from_pretrained(base_dir))

    resumed = run(base_dir, method, tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-2")
    assert resumed.state.global_step == 4
    want, got = trainer_checkpoints.trainable_state(model), trainer_checkpoints.trainable_state(resumed.model)
    assert list(got) == list(want)
    for k in want:
        assert_fp32_end_to_end_close(got[k], want[k], f"{method}: {k} resumed from step 2 vs uninterrupted")
    at_2 = trained_in(tmp_path / "run" / "checkpoint-2")
    assert not all(torch.equal(want[k], at_2[k]) for k in want), "steps 3-4 must change the adapter"


def test_load_best_model_at_end(base_dir, tmp_path):
    # the highest eval loss (on the training data) is the best: the first checkpoint, before training
    # brought it down
    trainer = run(base_dir, "lora", tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=True)
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best, last = (trained_in(tmp_path / f"checkpoint-{s}") for s in (2, 4))
    now = trainer_checkpoints.trainable_state(trainer.model)
    assert list(now) == list(best) and all(torch.equal(now[k], best[k]) for k in best)
    assert not all(torch.equal(now[k], last[k]) for k in last)


def test_load_state_dict_of_the_trainable_parameters_is_complete(tmp_path):
    model = ptune_rt.apply(tiny_llama(), CONFIGS["lora"]())
    state = trainer_checkpoints.trainable_state(model)
    result = model.load_state_dict(state)  # strict: the frozen base is not reported missing
    assert not result.missing_keys and not result.unexpected_keys
    partial = dict(list(state.items())[1:])
    assert model.load_state_dict(partial, strict=False).missing_keys  # anything else reports as torch does
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial)
    model.save_pretrained(tmp_path)
    result = model.load_state_dict(load_file(tmp_path / "model.safetensors"))  # the guard is dropped
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="size mismatch for model.embed_tokens.weight"):  # a plain model
        tiny_llama().load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)


def test_several_methods_one_folder_each(tmp_path):
    model = tiny_llama_with_biases()
    ptune_rt.apply(model, ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ptune_rt.apply(model, ptune_rt.BitFitConfig())
    train_steps(model)
    model.save_pretrained(tmp_path)
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "lora")) and (tmp_path / "bitfit" / "ptune_config.json").exists()
    fresh = tiny_llama_with_biases()
    ptune_rt.load_adapter(fresh, tmp_path / "lora")
    ptune_rt.load_adapter(fresh, tmp_path / "bitfit")
    assert_fp32_end_to_end_close(logits(fresh), logits(model), "LoRA + BitFit from their folders")
    again = ptune_rt.apply(ptune_rt.apply(tiny_llama_with_biases(), ptune_rt.LoRAConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"])), ptune_rt.BitFitConfig())
    again.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: the frozen base is not missing
    assert_fp32_end_to_end_close(logits(again), logits(model), "LoRA + BitFit from model.safetensors")


def test_restore_gives_back_the_class_save_pretrained(tmp_path):
    model = tiny_llama()
    before = dict(vars(model))
    hooks = dict(model._load_state_dict_post_hooks)
    ptune_rt.apply(model, CONFIGS["lora"]())
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.args[1] is clone  # a copy saves itself
    ptune_rt.restore(model)
    assert vars(model).keys() == before.keys()
    assert all(vars(model)[k] is v or vars(model)[k] == v for k, v in before.items())
    assert dict(model._load_state_dict_post_hooks) == hooks
    model.save_pretrained(tmp_path)  # the whole plain model again
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))


def test_load_adapter_names_a_folder_without_adapter(tmp_path):
    torch.save({"state": {}}, tmp_path / "optimizer.pt")
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no adapter") as e:
        ptune_rt.load_adapter(tiny_llama(), tmp_path)
    assert "pickle" not in str(e.value) and "optimizer.pt" in str(e.value)
