"""torch.compile traces each method's forward and training step as one graph.

On a tiny Llama and a left-padded batch (prefix tuning also without a mask), for LoRA, prefix tuning, prompt tuning
and P-tuning (also with anchor text in the template, fed ``inputs_embeds``): ``torch._dynamo.explain``
counts no graph break for the forward (eval, no grad, with labels) nor for a training step (train
mode, forward and ``loss.backward()`` in the compiled function; Dynamo traces the backward with
``trace_autograd_ops``), and what the traced run computed equals eager by ``FP32_END_TO_END``.
That run executes Dynamo's graph with the backward left to autograd; for the soft prompts a
training step is also compiled with the ``aot_eager`` backend, where AOTAutograd traces the
prompt-input op's backward formula (its fixed-shape path), as ``torch.compile(model)`` does.
"""
import pytest
import torch
import torch._dynamo as dynamo

import ptune_rt
from ptune_rt.ops import prompt_inputs
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close
from helpers_models import padded_batch, tiny_llama
from test_prompt_io import word_tokenizer

P = 4


def make_config(method):
    if method == "lora":
        return ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    if method == "prefix":
        return ptune_rt.PrefixConfig(num_virtual_tokens=P)
    if method == "prompt_tuning":
        return ptune_rt.PromptTuningConfig(num_virtual_tokens=P)
    if method == "p_tuning":
        return ptune_rt.PTuningConfig(num_virtual_tokens=P)
    assert method == "p_tuning_text"
    return ptune_rt.PTuningConfig(num_virtual_tokens=P, template="[P*3] {input} [P] w9 w10 {a}", anchors={"a": "w11"},
                                  tokenizer=word_tokenizer())


def make_case(method, masked):
    """The model with its adapter (every trainable tensor moved off its init, so a dropped adapter or
    gradient shows) and the keyword arguments of one call."""
    model = ptune_rt.apply(tiny_llama(layers=1), make_config(method))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids, mask = padded_batch(2, 7, side="left" if masked else None)
    kw = dict(labels=ids.masked_fill(mask == 0, -100))
    if masked:
        kw["attention_mask"] = mask
    if method == "p_tuning_text":  # inputs_embeds: the anchor text's rows are gathered beside the caller's
        kw["inputs_embeds"] = model.get_input_embeddings()(ids)
    else:
        kw["input_ids"] = ids
    return model, kw


def forward_fn(model):
    def forward(**kw):
        out = model(**kw)
        return out.logits, out.loss
    return forward


def train_step_fn(model):
    def step(**kw):
        out = model(**kw)
        out.loss.backward()
        return out.loss.detach()
    return step


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


CASES = [pytest.param("lora", True, id="lora"),
         pytest.param("prefix", True, id="prefix"),
         pytest.param("prefix", False, id="prefix-no-mask"),
         pytest.param("prompt_tuning", True, id="prompt_tuning"),
         pytest.param("p_tuning", True, id="p_tuning"),
         pytest.param("p_tuning_text", True, id="p_tuning_text")]


def explain(fn, kw):
    """``torch._dynamo.explain`` of ``fn(**kw)`` (asserting no graph break) and what that run returned."""
    got = {}

    def run(**kw):
        got["out"] = fn(**kw)

    dynamo.reset()
    explained = dynamo.explain(run)(**kw)
    breaks, reasons = explained.graph_break_count, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert breaks == 0, f"{breaks} graph breaks: {reasons}"
    return got["out"]


@pytest.mark.parametrize("method,masked", CASES)
def test_forward_has_no_graph_break(method, masked):
    model, kw = make_case(method, masked)
    model.eval()
    fn = forward_fn(model)
    with torch.no_grad():  # inference (where P-tuning caches its encoder's output eagerly)
        logits, loss = explain(fn, kw)
        ref_logits, ref_loss = fn(**kw)
    assert_fp32_end_to_end_close(logits, ref_logits, f"{method} logits")
    assert_fp32_end_to_end_close(loss, ref_loss, f"{method} loss")


def check_training_step(model, kw, method, run):
    """``run(step, kw)`` (a traced or compiled training step) gives eager's loss and gradients."""
    model.train()
    step = train_step_fn(model)
    params = trainable(model)
    zero_grads(model)
    with dynamo.config.patch(trace_autograd_ops=True):
        loss = run(step, kw)
    grads = {n: p.grad for n, p in params.items()}
    zero_grads(model)
    ref_loss = step(**kw)
    assert_fp32_end_to_end_close(loss, ref_loss, f"{method} loss")
    for n, p in params.items():
        assert p.grad is not None and grads[n] is not None, n
        assert_fp32_end_to_end_close(grads[n], p.grad, f"{method} grad of {n}")


@pytest.mark.parametrize("method,masked", CASES)
def test_training_step_has_no_graph_break(method, masked):
    model, kw = make_case(method, masked)
    check_training_step(model, kw, method, explain)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_text"])
def test_compiled_training_step_equals_eager(method):
    model, kw = make_case(method, True)
    dynamo.reset()
    check_training_step(model, kw, method,
                        lambda step, kw: torch.compile(step, backend="aot_eager", fullgraph=True)(**kw))


@pytest.mark.parametrize("tasks", [False, True])
def test_traced_backward_of_prompt_inputs_equals_eager(monkeypatch, tasks):
    """The prompt-input op's backward as it is traced (fixed shapes, no nonzero) gives bit-identical
    gradients to the eager one, for the prompts of each task and for the embedding table."""
    torch.manual_seed(0)
    B, L, V, H, T = 3, 9, 11, 8, 2
    src = torch.randint(0, V, (B, L))
    src[:, 1:4] = -torch.arange(1, 4)
    src[1, 7] = -2
    emb = torch.randn(V, H, requires_grad=True)
    prompts = torch.randn(*((T,) if tasks else ()), 3, H, requires_grad=True)
    task_ids = torch.tensor([1, 0, 1]) if tasks else None
    dout = torch.randn(B, L, H)

    def grads():
        emb.grad = prompts.grad = None
        prompt_inputs.build_inputs_embeds(src, emb, prompts, task_ids, backend="torch").backward(dout)
        return emb.grad.clone(), prompts.grad.clone()

    eager = grads()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = grads()
    assert torch.equal(traced[0], eager[0]) and torch.equal(traced[1], eager[1])
