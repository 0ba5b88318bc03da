"""P-tuning templates: ``"[P*3] {input} [P*2] Capital: {anchor}"`` parsed into pieces, and the pieces
as a source map (token ids >= 0, virtual token v as ``-(v + 1)``) before and after the input."""
from __future__ import annotations

import re

import torch

_TEMPLATE_PIECE = re.compile(r"\[P(?:\*(\d+))?\]|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_template(template: str, num_virtual_tokens: int, anchors: dict, what: str = "template") -> list:
    """Split a template into ("virtual", n), ("input", None) and ("text", str) pieces, checking that
    ``{input}`` occurs exactly once and that the virtual tokens add up to ``num_virtual_tokens``."""
    pieces, pos = [], 0
    for m in _TEMPLATE_PIECE.finditer(template):
        text = template[pos:m.start()].strip()
        if text:
            pieces.append(("text", text))
        if m.group(2) is None:
            n = int(m.group(1)) if m.group(1) is not None else 1
            if n < 1:
                raise ValueError(f"{what}={template!r}: [P*n] needs n >= 1, got {m.group(0)}")
            pieces.append(("virtual", n))
        elif m.group(2) == "input":
            pieces.append(("input", None))
        else:
            name = m.group(2)
            if name not in anchors:
                raise ValueError(f"{what}={template!r} uses {{{name}}} but anchors has no {name!r} entry "
                                 f"(anchors: {sorted(anchors)})")
            text = anchors[name]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"anchors[{name!r}] must be a non-empty string, got {text!r}")
            pieces.append(("text", text.strip()))
        pos = m.end()
    text = template[pos:].strip()
    if text:
        pieces.append(("text", text))
    n_input = sum(kind == "input" for kind, _ in pieces)
    if n_input != 1:
        raise ValueError(f"{what}={template!r} must contain the placeholder {{input}} exactly once (where the "
                         f"row's tokens go), found it {n_input} times")
    n_virtual = sum(n for kind, n in pieces if kind == "virtual")
    if n_virtual != num_virtual_tokens:
        raise ValueError(f"{what}={template!r} places {n_virtual} virtual tokens ([P*n] pieces) but "
                         f"num_virtual_tokens={num_virtual_tokens}; expected them to add up")
    return pieces


def _encode(tokenizer, text: str, special: bool, what: str) -> list[int]:
    try:
        out = tokenizer(text, add_special_tokens=special)
    except TypeError:
        out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{what}={text!r} tokenizes to no tokens; expected text that gives at least one token")
    return ids


def _resolve_tokenizer(tokenizer, what: str):
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except Exception as e:
            raise ValueError(f"{what}={tokenizer!r} could not be loaded with AutoTokenizer.from_pretrained: {e}") from e
    if not callable(tokenizer):
        raise ValueError(f"{what} must be a Hugging Face tokenizer (callable) or a name/path, got "
                         f"{type(tokenizer).__name__}")
    return tokenizer


def template_src(pieces: list, tokenizer) -> tuple[list[int], list[int]]:
    """The src values of the template before and after ``{input}``: virtual token v as -(v + 1),
    anchor text as its token ids."""
    before, after, v = [], [], 0
    side = before
    for kind, val in pieces:
        if kind == "input":
            side = after
        elif kind == "virtual":
            side.extend(-(v + i + 1) for i in range(val))
            v += val
        else:
            side.extend(_encode(tokenizer, val, False, "PTuningConfig template anchor text"))
    return before, after


