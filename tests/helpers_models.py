"""Tiny randomly initialised Hugging Face models and PEFT LoRA wrappers for tests (CPU, no hub).

Every factory builds a fresh model from a config with seeded random weights, eager attention and
all dropout probabilities at 0 (so train-mode runs are deterministic), in eval mode. Two calls with
the same seed give bit-identical weights. ``layers`` sets the number of blocks (default 2).

    base = tiny_llama()
    peft_model = peft_lora_model(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)
    mine = ptune_rt.apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    copy_peft_lora_weights(peft_model, mine)
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

VOCAB = 128
HIDDEN = 64


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype).eval()


def _build(cls, config, seed: int, dtype: torch.dtype):
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return _finish(model, dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Module:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(LlamaForCausalLM, cfg, seed, dtype)


def tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Module:
    """Qwen2ForCausalLM (q/k/v projections with bias): hidden 64, 2 layers, 4 heads, 2 KV heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(Qwen2ForCausalLM, cfg, seed, dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Module:
    """GPT2LMHeadModel (Conv1D projections, weight [in, out]): n_embd 64, 2 layers, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)
    return _build(GPT2LMHeadModel, cfg, seed, dtype)


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Module:
    """BertForMaskedLM (bidirectional encoder): hidden 64, 2 layers, 4 heads."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return _build(BertForMaskedLM, cfg, seed, dtype)


#: name -> (factory, LoRA targets covering every projection kind of that model)
MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": (tiny_qwen2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "bert": (tiny_bert, ["query", "key", "value", "dense"]),
}


def is_gpt2(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"


def input_ids(batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    """Random token ids in [3, vocab) (avoids the pad/bos/eos ids 0..2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def padded_batch(batch: int = 2, seq: int = 8, side: Optional[str] = "right", seed: int = 1):
    """(input_ids, attention_mask): row 0 has 3 pad tokens (id 0) on ``side`` (None: no padding)."""
    ids = input_ids(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    if side is not None:
        sl = slice(seq - 3, None) if side == "right" else slice(0, 3)
        mask[0, sl] = 0
        ids[0, sl] = 0
    return ids, mask


def main_output(o) -> torch.Tensor:
    """The logits of a model output, or the last hidden state of a bare encoder."""
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def peft_lora_model(base: nn.Module, targets: Sequence[str] | str, r: int = 4, alpha: float = 8.0,
                    dropout: float = 0.0, use_rslora: bool = False, fan_in_fan_out: Optional[bool] = None,
                    random_b: bool = True, seed: int = 0, bias: str = "none", **lora_kwargs):
    """Wrap ``base`` (modified in place: pass a copy to keep the original) with PEFT LoRA.

    ``fan_in_fan_out`` defaults to True for GPT-2 (Conv1D) and False elsewhere. With ``random_b``
    the lora_B weights get seeded random values, so the adapter changes the output.
    """
    from peft import LoraConfig, get_peft_model

    if fan_in_fan_out is None:
        fan_in_fan_out = is_gpt2(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)
                     if not isinstance(targets, str) else targets, use_rslora=use_rslora,
                     fan_in_fan_out=fan_in_fan_out, bias=bias, **lora_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, cfg)
        if random_b:
            randomize_lora_b(model, seed=seed + 1)
    return model


def randomize_lora_b(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Fill every ``lora_B.<adapter>.weight`` with seeded N(0, std^2) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def strip_peft_prefix(name: str) -> str:
    """PEFT module name -> the base model's name (drops ``base_model.model.``)."""
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def copy_peft_lora_weights(peft_model: nn.Module, model: nn.Module, adapter: str = "default") -> int:
    """Copy PEFT's lora_A / lora_B tensors into the LoRA modules of ``model`` with the same
    (prefix-stripped) module names; returns the number of modules copied. Every LoRA module of
    either side must have a counterpart."""
    src = {strip_peft_prefix(n): m for n, m in peft_model.named_modules()
           if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict) and adapter in m.lora_A}
    dst = {n: m for n, m in model.named_modules()
           if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)}
    if set(src) != set(dst):
        raise AssertionError(f"LoRA modules differ: only in PEFT {sorted(set(src) - set(dst))}, "
                             f"only in target {sorted(set(dst) - set(src))}")
    with torch.no_grad():
        for n, m in dst.items():
            name = getattr(m, "active_adapter", adapter)
            if not isinstance(name, str):
                name = adapter
            m.lora_A[name].weight.copy_(src[n].lora_A[adapter].weight)
            m.lora_B[name].weight.copy_(src[n].lora_B[adapter].weight)
    return len(dst)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: the module objects, every state_dict value, the
    trainable flags, the model's own attributes (ptune-rt's among them), each module's attribute
    names, forward pre-hooks, the attention implementation and each LoRA module's active adapter."""
    from ptune_rt import LoRALinear

    cfg = getattr(model, "config", None)
    return {"modules": dict(model.named_modules()),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "dict": {k: v for k, v in vars(model).items() if k not in ("_modules", "_parameters", "_buffers")},
            "attn": getattr(cfg, "_attn_implementation", None),
            "hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
            "mod_dicts": [set(m.__dict__) for m in model.modules()],
            "active": {n: m.active_adapter for n, m in model.named_modules() if isinstance(m, LoRALinear)}}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert list(now["modules"]) == list(snap["modules"])
    assert all(now["modules"][k] is snap["modules"][k] for k in now["modules"]), "a module object was replaced"
    assert list(now["state"]) == list(snap["state"])
    for k, v in now["state"].items():
        assert torch.equal(v, snap["state"][k]), f"{k} changed"
    assert now["dict"].keys() == snap["dict"].keys(), "model attributes added or removed"
    assert all(now["dict"][k] is snap["dict"][k] or now["dict"][k] == snap["dict"][k] for k in now["dict"])
    for key in ("grad", "attn", "hooks", "mod_dicts", "active"):
        assert now[key] == snap[key], key
