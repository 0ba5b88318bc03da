"""The README's "Distributed training", "With the HF Trainer" and "Merged export" snippets run as
written: the script in two gloo processes (torchrun FSDP2 and DDP, accelerate launch), the others on a tiny model
and dataset standing in for the user's ``model``, ``base`` and ``ds``."""
import os
import pathlib
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import ptune_rt
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(title: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(title), re.S)


def tiny_llama():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_distributed_snippet_runs_under_torchrun(tmp_path):
    script = blocks("Distributed training", "python")[0]
    commands = blocks("Distributed training", "bash")[0]
    assert "torchrun --nproc-per-node 2 train.py" in commands  # run below as torch.distributed.run --standalone
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    saved = {}
    for flags in ([], ["--ddp"]):
        out = tmp_path / ("ddp" if flags else "fsdp2")
        out.mkdir()
        (out / "train.py").write_text(script)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", *flags]
        proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        saved[out.name] = load_file(out / "my-adapter" / "adapter_model.safetensors")
    assert "accelerate launch --multi_gpu --num_processes 2 train.py" in commands
    out = tmp_path / "accelerate"
    out.mkdir()
    (out / "train.py").write_text(script)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "train.py"]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved[out.name] = load_file(out / "my-adapter" / "adapter_model.safetensors")
    assert saved["fsdp2"].keys() == saved["ddp"].keys() == saved["accelerate"].keys() and saved["fsdp2"]
    for k in saved["ddp"]:  # one step from the same model on the same data: the same adapter every way
        assert_fp32_end_to_end_close(saved["fsdp2"][k], saved["ddp"][k], k)
        assert_fp32_end_to_end_close(saved["accelerate"][k], saved["fsdp2"][k], k)


class TokenDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_trainer_snippet_runs(tmp_path, monkeypatch):
    code = blocks("With the HF Trainer", "python")[0]
    # the user's 500 steps made short: two steps, a checkpoint after each
    code = code.replace("save_steps=500)", "save_steps=1, max_steps=2, report_to=[], use_cpu=True)")
    code = code.replace("checkpoint-500", "checkpoint-2")
    monkeypatch.chdir(tmp_path)
    scope = {"ptune_rt": ptune_rt, "Trainer": Trainer, "TrainingArguments": TrainingArguments,
             "model": tiny_llama(), "base": tiny_llama(), "ds": TokenDataset()}
    exec(compile(code, "README: With the HF Trainer", "exec"), scope)
    trained, loaded = scope["model"].eval(), scope["base"]
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_fp32_end_to_end_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits,
                                     "the checkpoint loaded as the README says")
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_config.json").exists()


def test_merged_export_snippet_runs(tmp_path, monkeypatch):
    code = blocks("Merged export", "python")[0]
    model = ptune_rt.apply(tiny_llama(), ptune_rt.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    monkeypatch.chdir(tmp_path)
    load = 'LlamaForCausalLM.from_pretrained("merged")'
    code = code.replace(load, f"reloaded = {load}")
    scope = {"ptune_rt": ptune_rt, "LlamaForCausalLM": LlamaForCausalLM, "model": model}
    exec(compile(code, "README: Merged export", "exec"), scope)
    with torch.no_grad():
        got = scope["reloaded"].eval()(input_ids=ids).logits
    assert_fp32_end_to_end_close(got, want, "from_pretrained of the merged export vs the adapted model")
