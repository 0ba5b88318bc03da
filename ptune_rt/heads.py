"""The task head that trains next to a prefix or soft prompt (PEFT's ``modules_to_save``).

PEFT trains the classifier of a sequence / token classification or question answering model next to
its prompt-learning adapters (the head of a base model loaded for the task starts random). The
configs' ``modules_to_save`` selects these modules: None picks the task head by its usual attribute
name on such models and nothing elsewhere, ``[]`` trains the adapter alone, a list names modules (a
whole name or a dotted suffix)."""
from __future__ import annotations

from typing import Optional

from torch import nn

#: Model classes (by name suffix) whose task head trains by default, and the head attribute names
#: looked for (PEFT's modules_to_save for SEQ_CLS / TOKEN_CLS / QUESTION_ANS).
HEAD_MODEL_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


def check_modules_to_save(owner: str, value) -> None:
    """``value`` is None or a list of non-empty module names; ``owner`` names the config field."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(n, str) and n.strip() for n in value)):
        raise ValueError(f"{owner}.modules_to_save must be None or a list of module names such as ['classifier'], "
                         f"got {value!r}")


def head_modules(model: nn.Module, modules_to_save: Optional[list], owner: str, skip: str) -> list[str]:
    """Names of the modules of ``model`` that train next to the adapter (outermost matches only);
    modules under ``skip`` (the adapter's own attribute) are never heads. Raises ValueError for a
    name that matches nothing, or a task model without a recognisable head."""
    cls = type(model).__name__
    if modules_to_save is None:
        if not cls.endswith(HEAD_MODEL_SUFFIXES):
            return []
        found = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
        if not found:
            raise ValueError(f"{cls} is a task model but has none of the head modules {HEAD_NAMES} that train with "
                             f"the adapter; name its head in {owner}(modules_to_save=[...]) (or pass "
                             "modules_to_save=[] to train the adapter alone)")
        return found[:1]
    names = [n for n, _ in model.named_modules() if n and not (n == skip or n.startswith(skip + "."))]
    heads: list[str] = []
    for want in modules_to_save:
        hits = [n for n in names if n == want or n.endswith("." + want)]
        hits = [n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)]  # outermost only
        if not hits:
            raise ValueError(f"{owner}.modules_to_save entry {want!r} matches no module of {cls}; expected a "
                             "submodule name such as 'classifier' (a whole name or a dotted suffix)")
        heads += [n for n in hits if n not in heads]
    return heads
