"""Soft prompts at the input (prompt tuning, P-tuning v1) on tiny HF models.

PEFT 0.21.2 is the reference where it is right (unpadded batches): logits, gradients, a short
AdamW run and greedy generate match on the same weights. Where it is not (left padding, decode
loops over past_key_values), the reference is the same row run alone / generate itself.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.prompt import (PromptTuningConfig, PTuningConfig, PTuningEncoder, TaskLSTM, is_prompt_model,
                                     prompt_report, remove_prompt)
from helpers_models import input_ids, tiny_gpt2, tiny_llama

P = 4
NEW = 6  # generated tokens


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def word_tokenizer(drop="#"):
    """A whitespace word-level tokenizer over "w1" .. "w127" (ids 1..127, unknown -> 0) that
    deletes ``drop`` characters first (so a text of them tokenizes to nothing)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1, 128)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace(drop, "")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def lively_gpt2():
    """Tiny GPT-2 with larger random weights: its default init (std 0.02) mostly repeats the last token."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


FACTORIES = {"llama": tiny_llama, "gpt2": lively_gpt2}


def base_model(name):
    model = FACTORIES[name]()
    model.generation_config.eos_token_id = None  # always NEW tokens: comparisons see every step
    return model


def our_config(kind, **kw):
    if kind == "prompt":
        return PromptTuningConfig(P, **kw)
    return PTuningConfig(P, encoder=kind, encoder_hidden_size=32, **kw)


def peft_pair(base, kind, **config):
    """(PEFT model, ours) on copies of ``base`` with the same prompt parameters."""
    from peft import PromptEncoderConfig, get_peft_model
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    if kind == "prompt":
        pcfg = PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:
        pcfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32,
                                   encoder_reparameterization_type=kind.upper())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), pcfg)
    ours = ptune_rt.apply(copy.deepcopy(base), our_config(kind, **config))
    ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
    return peft_model, ours


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adamw_losses(model, batch, steps: int, lr: float) -> list[float]:
    """AdamW on the model's trainable parameters (gradients cleared first); ``batch(step)`` gives
    the forward's keyword arguments. The loss of every step."""
    params = list(trainable(model).values())
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=lr)
    run = []
    for step in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(**batch(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.append(loss.item())
    return run


def llama_task_model(cls, **config):
    """A tiny Llama task model (``cls``, e.g. LlamaForSequenceClassification) with a seeded random head."""
    cfg = tiny_llama().config
    for k, v in config.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(cfg)


def greedy(model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def decode_loop(model, ids, mask=None, **kw):
    """Greedy decoding by hand: one prefill, then one token at a time through past_key_values."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, **kw)
        toks = []
        for step in range(NEW):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            if step == NEW - 1:
                break
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True, **kw)
    return torch.cat(toks, dim=1)


def padded(rows, side):
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


ROWS = [input_ids(1, 5, seed=3)[0], input_ids(1, 3, seed=4)[0], input_ids(1, 7, seed=5)[0]]
TEMPLATE = dict(template="[P*3] {input} [P] w9 w10 {a}", anchors={"a": "w11"})


def template_model(name, **kw):
    return ptune_rt.apply(base_model(name), PTuningConfig(P, encoder="mlp", encoder_hidden_size=32,
                                                          tokenizer=word_tokenizer(), **TEMPLATE, **kw))


# ----------------------------------------------------------------------------------------
# parity with PEFT (unpadded batches)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prompt", "mlp", "lstm"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_matches_peft(name, kind):
    base = base_model(name)
    peft_model, ours = peft_pair(base, kind)
    assert sorted(trainable(peft_model)) == sorted(trainable(ours))  # same names: prompt_encoder.default.*
    ids = input_ids(3, 7)

    a, b = peft_model(ids, labels=ids), ours(ids, labels=ids)
    assert b.logits.shape == a.logits.shape == (3, P + 7, 128)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    pa, pb = trainable(peft_model), trainable(ours)
    for n in pa:
        torch.testing.assert_close(pb[n].grad, pa[n].grad, rtol=1e-5, atol=1e-7, msg=n)

    def batch(step):  # two batches, alternating
        ids = input_ids(3, 7, seed=100 + step % 2)
        return {"input_ids": ids, "labels": ids}

    losses = {tag: adamw_losses(model, batch, 20, 3e-2) for tag, model in (("peft", peft_model), ("ours", ours))}
    assert losses["ours"][-2] < losses["ours"][0]
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["peft"]), rtol=1e-5, atol=1e-6)

    peft_model.eval()
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            expected = peft_model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)[:, 7:]
    assert torch.equal(greedy(ours, ids), expected)


@pytest.mark.parametrize("kind", ["prompt", "mlp"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_placement_matches_peft_on_left_padded_batches(name, kind):
    """placement="peft": the prompt before the left padding and the model's own positions, as PEFT
    does: logits, loss and gradients equal PEFT's on a left-padded batch, and so do generate and a
    hand-written cache loop; the default placement differs there (each row computes what it does alone)."""
    base = base_model(name)
    peft_model, ours = peft_pair(base, kind, placement="peft")
    _, own = peft_pair(base, kind)
    ids, mask = padded(ROWS, "left")
    labels = ids.masked_fill(mask == 0, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = peft_model(ids, attention_mask=mask, labels=labels)
    b = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    assert (own(ids, attention_mask=mask).logits - a.logits).abs().max() > 1e-3  # the two placements differ
    a.loss.backward()
    b.loss.backward()
    pa, pb = trainable(peft_model), trainable(ours)
    for n in pa:
        torch.testing.assert_close(pb[n].grad, pa[n].grad, rtol=1e-5, atol=1e-7, msg=n)
    peft_model.eval()
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            expected = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                           do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(greedy(ours, ids, mask), expected)
    assert torch.equal(decode_loop(ours, ids, mask), expected)


@pytest.mark.parametrize("kind", ["prompt", "mlp"])
def test_classification_head_trains_with_the_prompt_as_in_peft(kind):
    """A sequence classifier's head starts random: PEFT trains it next to the prompt (modules_to_save
    for SEQ_CLS), and so does ptune-rt by default; the same losses step by step, the same head after."""
    from peft import PromptEncoderConfig, get_peft_model
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from transformers import LlamaForSequenceClassification

    base = llama_task_model(LlamaForSequenceClassification, num_labels=3)
    if kind == "prompt":
        pcfg = PeftPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
    else:
        pcfg = PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P, encoder_hidden_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), pcfg)
    ours = ptune_rt.apply(copy.deepcopy(base), our_config(kind))
    ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
    peft_names = sorted(n.replace("base_model.", "").replace("modules_to_save.default.", "")
                        for n in trainable(peft_model))
    assert sorted(trainable(ours)) == peft_names and "score.weight" in peft_names

    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(1, 128, (3, 7), generator=g), "labels": torch.randint(0, 3, (3,), generator=g)}
               for _ in range(2)]
    losses = {tag: adamw_losses(model, lambda step: batches[step % 2], 10, 3e-3)
              for tag, model in (("peft", peft_model), ("ours", ours))}
    assert losses["ours"][-2] < losses["ours"][0]
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["peft"]), rtol=1e-5, atol=1e-6)
    trained = peft_model.base_model.score.modules_to_save["default"].weight
    assert not torch.equal(ours.score.weight, base.score.weight)
    torch.testing.assert_close(ours.score.weight, trained, rtol=1e-5, atol=1e-6)

    # modules_to_save=[]: the prompt alone trains, as before; a name that matches nothing is refused first
    alone = ptune_rt.apply(copy.deepcopy(base), our_config(kind, modules_to_save=[]))
    assert "score.weight" not in trainable(alone)
    plain = copy.deepcopy(base)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        ptune_rt.apply(plain, our_config(kind, modules_to_save=["head"]))
    assert not is_prompt_model(plain) and all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_classify_as_alone(side):
    """A decoder's sequence classifier reads each row's last real token; given inputs_embeds it takes
    the last column, so the prompt glue puts a row's padding first: a padded row gets the logits it
    gets alone (PEFT 0.21.2 classifies a right-padded row by a pad token)."""
    from transformers import LlamaForSequenceClassification

    base = llama_task_model(LlamaForSequenceClassification, num_labels=3).eval()
    ours = ptune_rt.apply(copy.deepcopy(base), our_config("prompt"))
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    pads = slice(4, None) if side == "right" else slice(0, 3)
    mask[0, pads] = 0
    ids[0, pads] = 0
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask).logits
        for b in range(2):
            alone = ours(input_ids=ids[b:b + 1, mask[b].bool()]).logits
            torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_question_answering_positions_follow_the_prompt():
    """start/end positions index the input's tokens; with the soft prompt in front they must index
    the same tokens of the longer sequence (PEFT 0.21.2 passes them on unshifted, so its loss reads
    the logits of other tokens: fed shifted positions by hand, it gives our loss)."""
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model
    from transformers import LlamaForQuestionAnswering

    base = llama_task_model(LlamaForQuestionAnswering)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), PeftPromptTuningConfig(task_type="QUESTION_ANS",
                                                                               num_virtual_tokens=P))
    ours = ptune_rt.apply(copy.deepcopy(base), our_config("prompt"))
    ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
    assert "qa_outputs.weight" in trainable(ours)  # the head trains with the prompt, as PEFT's QUESTION_ANS

    ids = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(4))
    start, end = torch.tensor([1, 4, 6]), torch.tensor([2, 5, 9])  # 9: past the input, ignored by the loss
    got = ours(input_ids=ids, start_positions=start, end_positions=end).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft_model(input_ids=ids, start_positions=start + P, end_positions=torch.tensor([2 + P, 5 + P, 99])).loss
        unshifted = peft_model(input_ids=ids, start_positions=start, end_positions=end).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert (got - unshifted).abs() > 1e-3

    # left padding: each row's positions still point at its own tokens. The target slot of every
    # row is found by value: the one whose logit equals that token's logit in the row run alone.
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pos = torch.tensor([3, 4, 6])
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask)
        loss = ours(input_ids=ids, attention_mask=mask, start_positions=pos, end_positions=pos).loss
        targets = []
        for b in range(3):
            real = mask[b].bool()
            alone = ours(input_ids=ids[b:b + 1, real]).start_logits[0]
            want = alone[P + int(pos[b]) - int((~real).sum())]
            gap = (out.start_logits[b] - want).abs()
            assert gap.min() < 1e-5
            targets.append(int(gap.argmin()))
    t = torch.tensor(targets)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, (ce(out.start_logits, t) + ce(out.end_logits, t)) / 2, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"start_positions must be an integer tensor with one token index per row"):
        ours(input_ids=ids, start_positions=torch.tensor([0.5, 1.0, 2.0]), end_positions=end)


def test_text_and_vocab_init_match_peft(tmp_path):
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path)
    base = tiny_llama()
    for text in ("w5 w6 w7", "w1 w2 w3 w4 w5 w6 w7"):  # repeated / cut to P tokens
        peft_model = get_peft_model(copy.deepcopy(base), PeftPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path)))
        ours = ptune_rt.apply(copy.deepcopy(base), PromptTuningConfig(P, init="text", init_text=text, tokenizer=tok))
        assert torch.equal(ours.prompt_encoder.default.embedding.weight,
                           peft_model.prompt_encoder.default.embedding.weight)
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(base), PeftPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB"))
    torch.manual_seed(7)
    ours = ptune_rt.apply(copy.deepcopy(base), PromptTuningConfig(P, init="vocab"))
    assert torch.equal(ours.prompt_encoder.default.embedding.weight, peft_model.prompt_encoder.default.embedding.weight)
    # three tasks from one text: every task starts from it
    ours = ptune_rt.apply(copy.deepcopy(base), PromptTuningConfig(P, init="text", init_text="w5 w6", tokenizer=tok,
                                                                   num_tasks=3))
    w = ours.prompt_encoder.default.embedding.weight
    assert w.shape == (3, P, 64) and torch.equal(w[0], w[2])
    assert torch.equal(w[0, 2], base.get_input_embeddings().weight[5])


# ----------------------------------------------------------------------------------------
# decoding: prefill once, never prepend the prompt again
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decode_loop_matches_generate(name):
    ids = input_ids(2, 5)
    model = ptune_rt.apply(base_model(name), PromptTuningConfig(P))
    expected = greedy(model, ids)
    assert torch.equal(decode_loop(model, ids), expected)
    # front placement: generating equals re-running the whole sequence without a cache
    seq = ids
    with torch.no_grad():
        for _ in range(NEW):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq[:, 5:], expected)
    # a template with anchor text and virtual tokens on both sides of the input
    model = template_model(name)
    assert torch.equal(decode_loop(model, ids), greedy(model, ids))


# ----------------------------------------------------------------------------------------
# padded batches: every row as if alone
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_padded_rows_match_rows_alone(name, side):
    ids, mask = padded(ROWS, side)
    L = ids.shape[1]
    for model in (ptune_rt.apply(base_model(name), PromptTuningConfig(P)), template_model(name)):
        E = model.forward.E
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        gen = greedy(model, ids, mask)
        loop = decode_loop(model, ids, mask)
        for i, row in enumerate(ROWS):
            n = len(row)
            with torch.no_grad():
                alone = model(row[None]).logits[0]
            start = L - n if side == "left" else 0  # the row's template + tokens, contiguous
            torch.testing.assert_close(logits[i, start:start + n + E], alone, rtol=0, atol=1e-5)
            expected = greedy(model, row[None])[0]
            assert torch.equal(gen[i], expected), (i, gen[i], expected)
            if side == "left":  # a hand loop reads the last column, which is padding on the right
                assert torch.equal(loop[i], expected)


def test_padded_training_loss_ignores_template_and_padding():
    model = template_model("llama")
    ids, mask = padded(ROWS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    total, count = 0.0, 0
    for row in ROWS:  # the mean over every row's predicted tokens
        n = len(row)
        logits = model(row[None]).logits[0]
        shifted = torch.full((n + model.forward.E,), -100)
        shifted[3:3 + n] = row  # three virtual tokens before the input
        total = total + nn.functional.cross_entropy(logits[:-1], shifted[1:], reduction="sum", ignore_index=-100)
        count += n  # the first token is predicted by the last virtual token
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# mixed-task batches
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prompt", "mlp", "lstm"])
def test_mixed_task_batch(kind):
    model = ptune_rt.apply(base_model("llama"), our_config(kind, num_tasks=3))
    params = trainable(model)
    tasks = torch.tensor([2, 0, 2])  # task 1 has no row
    ids = input_ids(3, 6)
    weights = torch.randn(3, P + 6, 128)

    out = model(ids, task_ids=tasks).logits
    (out * weights).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in params.items()}
    alone_grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):
        for p in params.values():
            p.grad = None
        alone = model(ids[i:i + 1], task_ids=tasks[i:i + 1]).logits
        torch.testing.assert_close(out[i], alone[0], rtol=0, atol=1e-5)
        (alone[0] * weights[i]).sum().backward()
        for n, p in params.items():
            alone_grads[n] += p.grad
    for n in params:
        torch.testing.assert_close(batch_grads[n], alone_grads[n], rtol=1e-5, atol=1e-6, msg=n)
        assert batch_grads[n].shape[0] == 3 and not batch_grads[n][1].any(), n  # no row, no gradient
    # each task is its own prompt: task 0 alone equals a one-task model holding task 0's weights
    single = ptune_rt.apply(base_model("llama"), our_config(kind))
    with torch.no_grad():
        for n, p in trainable(single).items():
            p.copy_(params[n][0])
        torch.testing.assert_close(single(ids[1:2]).logits, model(ids[1:2], task_ids=tasks[1:2]).logits,
                                   rtol=0, atol=1e-5)

    rows_tasks = [0, 2, 1]
    ids_p, mask = padded(ROWS, "left")
    gen = greedy(model, ids_p, mask, task_ids=torch.tensor(rows_tasks))
    for i, (row, t) in enumerate(zip(ROWS, rows_tasks)):
        assert torch.equal(gen[i], greedy(model, row[None], task_ids=torch.tensor([t]))[0])
    assert torch.equal(decode_loop(model, ids_p, mask, task_ids=torch.tensor(rows_tasks)), gen)


def test_task_stacked_encoder_matches_per_task_modules():
    for encoder in ("mlp", "lstm"):
        multi = PTuningEncoder(3, 5, 16, encoder, 8, num_layers=2)
        for t in range(3):
            one = PTuningEncoder(1, 5, 16, encoder, 8, num_layers=2)
            with torch.no_grad():
                one_params = dict(one.named_parameters())
                for n, p in multi.named_parameters():
                    one_params[n].copy_(p[t])
            torch.testing.assert_close(multi.encode()[t], one.encode(), rtol=1e-5, atol=1e-6)
    lstm = TaskLSTM(2, 6, 4, 3, 0.0)
    ref = nn.LSTM(6, 4, num_layers=3, bidirectional=True, batch_first=True)
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(getattr(lstm, n)[1])
    torch.testing.assert_close(lstm(x)[1], ref(x[1:2])[0][0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# encoder runs once per step; cached at inference
# ----------------------------------------------------------------------------------------

def test_encoder_runs_once_per_step_and_is_cached_at_inference():
    model = ptune_rt.apply(base_model("llama"), our_config("lstm", num_tasks=2))
    enc = model.prompt_encoder.default
    runs = []
    enc.mlp_head.register_forward_hook(lambda *a: runs.append(1))
    ids, tasks = input_ids(4, 5), torch.tensor([0, 1, 1, 0])
    model(ids, task_ids=tasks).logits.sum().backward()
    assert len(runs) == 1  # four rows, two tasks: one encoder run
    with torch.no_grad():
        first = model(ids, task_ids=tasks).logits
        model(ids, task_ids=tasks)
        greedy(model, ids, task_ids=tasks)
    assert len(runs) == 2  # computed once, then reused
    torch.optim.SGD(trainable(model).values(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.equal(model(ids, task_ids=tasks).logits, first)
    assert len(runs) == 3  # parameters changed: recomputed


# ----------------------------------------------------------------------------------------
# Triton input builder (interpreter), inputs_embeds, apply / remove, configs, errors
# ----------------------------------------------------------------------------------------

def test_triton_backend_matches_torch_backend():
    base = base_model("llama")
    ids, mask = padded(ROWS[:2], "left")
    tasks = torch.tensor([1, 0])
    results = []
    for backend in ("torch", "triton"):
        model = ptune_rt.apply(copy.deepcopy(base), PromptTuningConfig(P, num_tasks=2, backend=backend))
        model.prompt_encoder.default.embedding.weight.data.copy_(torch.randn(2, P, 64, generator=torch.Generator()
                                                                             .manual_seed(3)))
        logits = model(ids, attention_mask=mask, task_ids=tasks).logits
        logits.square().mean().backward()
        results.append((logits.detach(), model.prompt_encoder.default.embedding.weight.grad))
        assert prompt_report(model)["backend"] == backend
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-8)


def test_inputs_embeds_and_scaled_embeddings():
    model = template_model("llama")
    ids = input_ids(2, 5)
    with torch.no_grad():
        ref = model(ids).logits
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, ref, rtol=0, atol=1e-6)
        # an embedding module with its own forward is called, not bypassed
        emb = model.get_input_embeddings()

        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = emb
                self.weight = emb.weight

            def forward(self, x):
                return self.inner(x) * 1.0

        model.model.embed_tokens = Scaled()
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)


def test_apply_freezes_base_and_remove_restores():
    base = base_model("gpt2")
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    ids = input_ids(2, 5)
    with torch.no_grad():
        before = base(ids).logits
    model = ptune_rt.apply(base, PTuningConfig(P, encoder="lstm", encoder_hidden_size=16))
    assert model is base and is_prompt_model(model)
    assert all(n.startswith("prompt_encoder.default.") for n in trainable(model))
    assert "prompt_encoder.default.lstm_head.weight_ih_l0" in trainable(model)
    assert "task_ids" in __import__("inspect").signature(model.forward).parameters
    with pytest.raises(ValueError, match="already carries"):
        ptune_rt.apply(model, PromptTuningConfig(P))
    clone = copy.deepcopy(model)  # the wrapped forward follows the copy
    torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert clone.forward.model is clone
    ptune_rt.restore(model)  # the public undo takes the soft prompt out
    assert not is_prompt_model(model) and not hasattr(model, "prompt_encoder")
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="carries no"):
        remove_prompt(model)


def test_config_json_round_trip():
    cfg = PTuningConfig(5, encoder="lstm", encoder_hidden_size=16, template="[P*2] {input} [P*3] w4 {x}",
                        anchors={"x": "w7"}, tokenizer="some/path", num_tasks=2)
    back = PTuningConfig.from_json(cfg.to_json())
    assert back == cfg and back.to_dict()["method"] == "p_tuning"
    cfg = PromptTuningConfig(3, init="text", init_text="w1 w2", tokenizer=word_tokenizer())
    d = cfg.to_dict()
    assert d["method"] == "prompt_tuning" and d["tokenizer"] is None
    assert PromptTuningConfig.from_dict(d, tokenizer=cfg.tokenizer).init_text == "w1 w2"
    with pytest.raises(ValueError, match="not a PTuningConfig"):
        PTuningConfig.from_dict(d)


def test_bad_inputs_raise_clear_errors():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match=r"\{input\} exactly once"):
        PTuningConfig(4, template="[P*4] w5 w6")
    with pytest.raises(ValueError, match="places 3 virtual tokens"):
        PTuningConfig(4, template="[P*3] {input}")
    with pytest.raises(ValueError, match="anchors has no 'y'"):
        PTuningConfig(4, template="[P*4] {input} {y}", tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer is required"):
        PTuningConfig(4, template="[P*4] {input} w5")
    with pytest.raises(ValueError, match="encoder must be one of"):
        PTuningConfig(4, encoder="gru")
    with pytest.raises(ValueError, match="init_text is only used"):
        PromptTuningConfig(4, init_text="w5")
    with pytest.raises(ValueError, match="tokenizer is required"):
        PromptTuningConfig(4, init="text", init_text="w5")

    base = base_model("llama")
    with pytest.raises(ValueError, match="init_text='###' tokenizes to no tokens"):
        ptune_rt.apply(base, PromptTuningConfig(4, init="text", init_text="###", tokenizer=tok))
    assert not is_prompt_model(base) and all(p.requires_grad for p in base.parameters())  # nothing changed
    with pytest.raises(ValueError, match="position limit max_position_embeddings=128"):
        ptune_rt.apply(base, PromptTuningConfig(128))

    model = ptune_rt.apply(base, PromptTuningConfig(4, num_tasks=2))
    ids = input_ids(2, 5)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, num_tasks=2\), got values in \[0, 2\]"):
        model(ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, num_tasks=2\)"):
        greedy(model, ids, task_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="task_ids is required"):
        model(ids)
    with pytest.raises(ValueError, match=r"task_ids must be an integer tensor \[batch=2\]"):
        model(ids, task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="beyond the model's position limit max_position_embeddings=128"):
        model(input_ids(1, 125), task_ids=torch.tensor([0]))
    model(input_ids(1, 124), task_ids=torch.tensor([0]))  # 4 + 124 positions fit
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding between its tokens"):
        model(ids, attention_mask=holes, task_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"config must be a ptune_rt config \(LoRAConfig, PrefixConfig, "
                                        r"PromptTuningConfig, PTuningConfig, "):
        ptune_rt.apply(model, object())
