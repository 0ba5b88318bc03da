"""P-tuning v2 for NLU: a prefix in every layer's attention plus the task head, base frozen.

``ptune_rt.apply(model, PrefixConfig(...))`` on BERT / RoBERTa sequence and token classification
models trains the prefix and the classifier (PEFT's modules_to_save for SEQ_CLS / TOKEN_CLS) and
nothing else; the prefix lives in attention, so token-classification logits stay [B, L, C], one
per real token, aligned with the labels.

Convergence: two synthetic tasks whose labels depend on an interaction between tokens, which a
frozen tiny random BERT does not expose linearly, so training the head alone stays near chance
while P-tuning v2 (prefix + head) solves them. Vocabulary: fillers of two "domains" (A: 16..39,
B: 40..63) and ambiguous entity words 8..15 shared by both domains, in two groups (8..11, 12..15).
An entity word's type is its group XOR the sentence's domain (the same word is a person in one
domain and a place in the other): no single token says anything about a label, and the XOR of two
additive features is not linearly separable.

* sequence classification: 10 tokens from one domain with 3 entity words of one group; label =
  group XOR domain;
* tagging (NER-like): fillers of one domain, each position an entity word with probability 0.3;
  tags O / TYPE-1 / TYPE-2, TYPE = group XOR domain; scored on the entity tokens.

Both arms run the same optimizer, steps and batches (one thread, as everywhere in the tests).
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import ptune_rt
from ptune_rt.methods.prefix.inject import has_prefix, prefix_encoder, prefix_state
from ptune_rt.methods.prefix import PrefixConfig
from ptune_rt.testing.tolerances import FP32_END_TO_END

VOCAB = 64
CLS_ID, SEP_ID = 1, 2
SEQ_LEN = 10
P = 8
#: Random-weight scale of the frozen BERT (its default 0.02 makes every layer nearly the identity,
#: so no method could read token interactions off it).
INIT_RANGE = 0.15
STEPS = 400
BATCH = 32
PREFIX_LR, HEAD_LR = 0.1, 0.01
SEED = 0
#: Accuracy P-tuning v2 must reach, the most the head alone may reach, and the least gap between them.
PTUNING_MIN, HEAD_ONLY_MAX, MARGIN = 0.95, 0.75, 0.25

CLASSES = ["BertForSequenceClassification", "BertForTokenClassification", "RobertaForSequenceClassification",
           "RobertaForTokenClassification"]


def _model(cls_name: str, num_labels: int, seed: int = 0, init_range: float = INIT_RANGE) -> nn.Module:
    import transformers

    roberta = cls_name.startswith("Roberta")
    cfg_cls = transformers.RobertaConfig if roberta else transformers.BertConfig
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  classifier_dropout=0.0, num_labels=num_labels, initializer_range=init_range,
                  pad_token_id=1 if roberta else 0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(cfg)
    return model.eval()


# ----------------------------------------------------------------------------------------
# the synthetic tasks
# ----------------------------------------------------------------------------------------


def _wrap(ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    return torch.cat([torch.full((n, 1), CLS_ID), ids, torch.full((n, 1), SEP_ID)], dim=1)


def _fillers(domain: torch.Tensor, n: int, g) -> torch.Tensor:
    return 16 + domain[:, None].long() * 24 + torch.randint(24, (n, SEQ_LEN), generator=g)


def entity_type_sentences(n: int, g: torch.Generator):
    """(input_ids [n, SEQ_LEN + 2], labels [n]): 3 entity words of one group among domain fillers;
    label = group XOR domain."""
    domain = torch.rand(n, generator=g) < 0.5
    group = torch.rand(n, generator=g) < 0.5
    where = torch.rand(n, SEQ_LEN, generator=g).argsort(1)[:, :3]
    is_entity = torch.zeros(n, SEQ_LEN, dtype=torch.bool).scatter_(1, where, True)
    entity = 8 + group[:, None].long() * 4 + torch.randint(4, (n, SEQ_LEN), generator=g)
    ids = torch.where(is_entity, entity, _fillers(domain, n, g))
    return _wrap(ids), (group ^ domain).long()


def entity_tagging(n: int, g: torch.Generator):
    """(input_ids, tags) [n, SEQ_LEN + 2]: tag 0 for fillers, 1 + (group XOR domain) for entity words,
    -100 for [CLS] / [SEP]."""
    domain = torch.rand(n, generator=g) < 0.5
    is_entity = torch.rand(n, SEQ_LEN, generator=g) < 0.3
    entity = 8 + torch.randint(8, (n, SEQ_LEN), generator=g)
    ids = torch.where(is_entity, entity, _fillers(domain, n, g))
    tags = torch.where(is_entity, 1 + ((entity >= 12) ^ domain[:, None]).long(), 0)
    edge = torch.full((n, 1), -100)
    return _wrap(ids), torch.cat([edge, tags, edge], dim=1)


TASKS = {"seq": ("BertForSequenceClassification", 2, entity_type_sentences),
         "tag": ("BertForTokenClassification", 3, entity_tagging)}


def train_and_score(task: str, arm: str, seed: int = SEED, steps: int = STEPS) -> dict:
    """Train one arm ("ptuning_v2": prefix + head, "head_only": the head alone) on ``task``; returns
    held-out accuracy (entity tokens for tagging), the final training loss and the wall time."""
    cls_name, num_labels, make = TASKS[task]
    model = _model(cls_name, num_labels, seed=seed)
    if arm == "ptuning_v2":
        with torch.random.fork_rng(devices=[]):  # the prefix's random init, from the seed too
            torch.manual_seed(seed)
            ptune_rt.apply(model, PrefixConfig(P))
        prefix = list(prefix_encoder(model).parameters())
    elif arm == "head_only":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        prefix = []
    else:
        raise ValueError(arm)
    head = list(model.classifier.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in head + prefix}
    g = torch.Generator().manual_seed(1000 + seed)
    x_train, y_train = make(2048, g)
    x_test, y_test = make(1024, g)
    groups = [{"params": head, "lr": HEAD_LR}] + ([{"params": prefix, "lr": PREFIX_LR}] if prefix else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x_train), (BATCH,), generator=g)
        loss = model(input_ids=x_train[idx], labels=y_train[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x_test).logits
    if task == "tag":
        assert logits.shape[:2] == y_test.shape  # one prediction per real token
        scored = y_test > 0
        acc = (logits.argmax(-1)[scored] == y_test[scored]).float().mean().item()
    else:
        acc = (logits.argmax(-1) == y_test).float().mean().item()
    return {"accuracy": acc, "final_loss": loss.item(), "seconds": seconds}


# ----------------------------------------------------------------------------------------
# what trains, shapes, labels
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", CLASSES)
def test_prefix_and_head_train_base_frozen(cls_name):
    model = _model(cls_name, 3)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptune_rt.apply(model, PrefixConfig(4))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    head = sorted(n for n, _ in model.named_parameters() if n.startswith("classifier."))
    assert head and trainable == sorted(["prompt_encoder.default.embedding.weight"] + head)
    assert prefix_state(model).heads == ["classifier"]
    token = cls_name.endswith("TokenClassification")
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = torch.randint(3, ids.shape if token else (3,), generator=torch.Generator().manual_seed(1))
    if token:
        labels = labels.masked_fill(mask == 0, -100)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    if token:  # the prefix is in attention, not in the sequence: one logit row per real position
        assert out.logits.shape == (3, 7, 3)
        ref = nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
    else:
        assert out.logits.shape == (3, 3)
        ref = nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n
    ptune_rt.restore(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_modules_to_save_choices_and_errors():
    model = _model("BertForSequenceClassification", 2)
    ptune_rt.apply(model, PrefixConfig(4, modules_to_save=[]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    ptune_rt.restore(model)
    ptune_rt.apply(model, PrefixConfig(4, modules_to_save=["classifier", "pooler"]))
    assert prefix_state(model).heads == ["classifier", "bert.pooler"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prompt_encoder.default.embedding.weight", "classifier.weight", "classifier.bias",
        "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    ptune_rt.restore(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module of "
                                         "BertForSequenceClassification"):
        ptune_rt.apply(model, PrefixConfig(4, modules_to_save=["head"]))
    assert not has_prefix(model) and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    bare = _model("BertForSequenceClassification", 2)
    del bare.classifier
    with pytest.raises(ValueError, match="has none of the head modules"):
        ptune_rt.apply(bare, PrefixConfig(4))
    # models without a task head train the prefix alone, as before
    enc = ptune_rt.apply(_model("BertModel", 2), PrefixConfig(4))
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


@pytest.mark.parametrize("cls_name,task_type", [("BertForSequenceClassification", "SEQ_CLS"),
                                                ("RobertaForTokenClassification", "TOKEN_CLS")])
def test_training_matches_peft_modules_to_save(cls_name, task_type):
    """PEFT trains a copy of the classifier (modules_to_save) with the prefix; ptune-rt trains the
    classifier in place: same trainable tensors, same losses step by step."""
    from peft import PrefixTuningConfig, get_peft_model

    base = _model(cls_name, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4))
    mine = ptune_rt.apply(copy.deepcopy(base), PrefixConfig(4))
    prefix_encoder(mine).load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    theirs = {n.replace("base_model.", "", 1).replace(".modules_to_save.default", ""): p
              for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in mine.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(ours)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    token = task_type == "TOKEN_CLS"
    labels = torch.randint(3, ids.shape if token else (4,), generator=g)
    if token:
        labels = labels.masked_fill(mask == 0, -100)
    names = sorted(ours)
    opt_ref = torch.optim.AdamW([theirs[n] for n in names], lr=1e-2)
    opt = torch.optim.AdamW([ours[n] for n in names], lr=1e-2)
    peft_model.train(), mine.train()
    for step in range(8):
        losses = []
        for model, o in ((peft_model, opt_ref), (mine, opt)):
            o.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= FP32_END_TO_END * max(1.0, abs(losses[0])), (step, losses)
    for n in names:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-5, msg=n)


def test_mixed_task_classification():
    """A classification model with several prefixes (one head): rows pick their prefix by task_ids."""
    model = _model("BertForTokenClassification", 3)
    ptune_rt.apply(model, PrefixConfig(4, num_tasks=2))
    with torch.no_grad():
        prefix_encoder(model).embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = model(input_ids=ids, task_ids=torch.tensor([1, 0])).logits
        for i, t in enumerate((1, 0)):
            alone = model(input_ids=ids[i:i + 1], task_ids=torch.tensor([t])).logits[0]
            torch.testing.assert_close(both[i], alone, rtol=0, atol=1e-5)
        assert (model(input_ids=ids, task_ids=torch.tensor([0, 0])).logits[0] - both[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------
# convergence
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["seq", "tag"])
def test_ptuning_v2_solves_what_the_head_alone_cannot(task):
    t0 = time.perf_counter()
    ptuning = train_and_score(task, "ptuning_v2")
    head = train_and_score(task, "head_only")
    total = time.perf_counter() - t0
    print(f"\n{task}: P-tuning v2 accuracy {ptuning['accuracy']:.3f} (loss {ptuning['final_loss']:.3f}, "
          f"{ptuning['seconds']:.1f}s), head only {head['accuracy']:.3f} (loss {head['final_loss']:.3f}, "
          f"{head['seconds']:.1f}s); {total:.1f}s")
    assert ptuning["accuracy"] >= PTUNING_MIN, ptuning
    assert head["accuracy"] <= HEAD_ONLY_MAX, head
    assert ptuning["accuracy"] - head["accuracy"] >= MARGIN
