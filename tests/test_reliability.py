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

from helpers_models import input_ids, randomize_lora_b, tiny_llama


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
