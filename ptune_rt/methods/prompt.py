"""Soft prompts at the input: prompt tuning and P-tuning v1, with mixed-task batches.

``apply_prompt(model, PromptTuningConfig(...) | PTuningConfig(...))`` gives a Hugging Face model
(the instance, not its class) trainable virtual tokens at its input embeddings:

* prompt tuning: a table of virtual-token embeddings, ``prompt_encoder.default.embedding.weight``
  [P, hidden] for one task (PEFT's name and shape) or [T, P, hidden] for T tasks;
* P-tuning v1: PEFT's ``PromptEncoder`` (an embedding table fed through an MLP, or a bidirectional
  LSTM then an MLP, with PEFT's parameter names) whose output are the virtual tokens, and a template
  such as ``"[P*3] {input} [P*2] Capital: {anchor}"`` that places virtual tokens and anchor text
  around the input (``"[P*n] {input}"``, PEFT's placement, by default).

How it runs. The model's ``forward`` is replaced on the instance by a callable that accepts the
extra keyword ``task_ids`` (one task per row, also through ``generate``) and, at prefill only (no
cache, or an empty one), turns ``input_ids`` into ``inputs_embeds`` with one call of
``ptune_rt.ops.prompt_inputs.build_inputs_embeds``: every row's layout is an index map ``src``
(token ids >= 0, virtual token v as ``-(v + 1)``), so nothing is concatenated and no Python loop
runs over rows. The attention mask (ones for the template), ``position_ids``, ``labels`` (-100 for
the template) and ``token_type_ids`` (0) are laid out the same way. Decode steps (the cache
already holds tokens) take the new tokens as they are and only widen the attention mask and shift
the positions by the template length, so a hand-written ``past_key_values`` loop and ``generate``
agree. The P-tuning encoder runs once per forward for all tasks (not per row); with gradients off
its output is cached until a parameter changes (in place or replaced).

Layout of a row (and the choice for padded batches). The template goes around the row's real
tokens, whatever padding the row has:

    [left padding] [template before {input}] [real tokens] [template after {input}] [right padding]

so the real tokens stay contiguous behind the virtual ones and a padded row computes exactly what
it computes alone. Logits come back in this layout, ``[batch, template + seq, vocab]``: without
padding it is PEFT's (virtual tokens at positions 0..P-1, tokens after them). Inside ``generate``
(also replaced on the instance, only to say that it runs) a right-padded row puts its padding first
instead, so that every row's last real token sits in the last column, which is where ``generate``
reads the next token: right-padded prompts then generate what each row generates alone too.

Positions. With an attention mask, positions are counted by the laid-out mask (``cumsum - 1``,
padding at 0), so the first template token of a row is position 0 whatever its padding, and
``position_ids`` passed by the caller are not used (``generate`` derives them from the mask too,
but numbers a right-padded row's new tokens from its last, padded, column). Without a mask,
``position_ids`` (or 0..L-1, or the count after the cached tokens) are the caller's coordinates
and are shifted past the template. The mask must be 2D, each row's ones contiguous (left or right
padding). A decode step finds the prefill's layout on the cache object (or, for a cache filled
elsewhere, reads it off the mask).

PEFT 0.21.2, by contrast, puts the prompt before the left padding and numbers positions 0..P+L-1
through the padding, so a left-padded row differs from the same row run alone, and it prepends the
prompt on every forward call, so a decode loop over ``past_key_values`` re-inserts it at every step.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptune_rt._cache_names import cache_from_kwargs, cache_from_output
from ptune_rt.methods._config import check_choice, check_int, check_number, check_task_ids, config_kwargs
from ptune_rt.heads import check_modules_to_save, head_modules
from ptune_rt.ops.lora_linear import BACKENDS, resolve_backend
from ptune_rt.ops.prompt_inputs import build_inputs_embeds
from ptune_rt.task_modules import PromptTable, TaskLinear

PROMPT_INITS = ("random", "vocab", "text")
ENCODERS = ("mlp", "lstm")
ADAPTER = "default"
MODULE_ATTR = "prompt_encoder"
REQUIRES_GRAD_ATTR = "_ptune_prompt_requires_grad"
LAYOUT_ATTR = "_ptune_prompt_layout"

_TEMPLATE_PIECE = re.compile(r"\[P(?:\*(\d+))?\]|\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ----------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------

def _tokenizer_to_dict(tokenizer):
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return getattr(tokenizer, "name_or_path", None) or None


class _ConfigIO:
    """JSON round trip shared by the soft-prompt configs (a tokenizer object is saved by its
    ``name_or_path``, or as None)."""

    METHOD = ""

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tokenizer"] = _tokenizer_to_dict(d.get("tokenizer"))
        return {"method": self.METHOD, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, tokenizer=None):
        d = config_kwargs(cls, d, cls.METHOD, cls.__name__)
        if tokenizer is not None:
            d["tokenizer"] = tokenizer
        return cls(**d)

    @classmethod
    def from_json(cls, s: str, tokenizer=None):
        return cls.from_dict(json.loads(s), tokenizer=tokenizer)

    def _check_common(self) -> None:
        """The fields both soft-prompt configs share: counts, backend and modules_to_save (a tuple of
        names is kept as a list, so the JSON round trip compares equal)."""
        name = type(self).__name__
        check_int(f"{name}.num_virtual_tokens", self.num_virtual_tokens)
        check_int(f"{name}.num_tasks", self.num_tasks)
        check_choice(f"{name}.backend", self.backend, BACKENDS)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        check_modules_to_save(name, self.modules_to_save)


@dataclasses.dataclass
class PromptTuningConfig(_ConfigIO):
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` trainable embeddings before the input.

    num_virtual_tokens: P, the number of virtual tokens per task.
    init: "random" (N(0, 1), PEFT's RANDOM), "vocab" (embeddings of P token ids drawn uniformly
        from the vocabulary, PEFT's SAMPLE_VOCAB) or "text" (embeddings of ``init_text``, tokenized
        by ``tokenizer`` with its special tokens, repeated or cut to P tokens, PEFT's TEXT).
    init_text: the text for init="text".
    tokenizer: a Hugging Face tokenizer, or a name/path for ``AutoTokenizer.from_pretrained``.
    num_tasks: T; with T > 1 every forward / generate call takes ``task_ids`` [batch].
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch" for the input builder.
    modules_to_save: modules trained next to the prompt (PEFT's modules_to_save): None picks the task
        head of sequence / token classification and question answering models (``classifier``,
        ``score``, ...) and nothing elsewhere; ``[]`` trains the prompt alone; a list names modules
        (a whole name or a dotted suffix).
    """

    METHOD = "prompt_tuning"

    num_virtual_tokens: int
    init: str = "random"
    init_text: Optional[str] = None
    tokenizer: Any = None
    num_tasks: int = 1
    backend: str = "auto"
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self._check_common()
        check_choice("PromptTuningConfig.init", self.init, PROMPT_INITS)
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(f"PromptTuningConfig.init_text must be a non-empty string when init='text', got "
                                 f"{self.init_text!r}")
            if self.tokenizer is None:
                raise ValueError("PromptTuningConfig.tokenizer is required when init='text' (a Hugging Face "
                                 "tokenizer or a name/path for AutoTokenizer.from_pretrained)")
        elif self.init_text is not None:
            raise ValueError(f"PromptTuningConfig.init_text is only used with init='text', got init={self.init!r}")


@dataclasses.dataclass
class PTuningConfig(_ConfigIO):
    """P-tuning v1 (Liu et al.): virtual tokens produced by PEFT's prompt encoder.

    num_virtual_tokens: P, the number of virtual tokens per task.
    encoder: "mlp" (embedding -> Linear, ReLU, Linear, ReLU, Linear) or "lstm" (embedding ->
        bidirectional LSTM -> Linear, ReLU, Linear), as PEFT's MLP / LSTM reparameterization.
    encoder_hidden_size: the encoder's hidden size (None: the model's hidden size).
    encoder_num_layers: LSTM layers (the MLP always has three linear layers, as in PEFT).
    encoder_dropout: dropout between LSTM layers while training.
    template: where the virtual tokens and anchor text go around the input: ``[P*n]`` (or ``[P]``)
        is n virtual tokens (numbered left to right, P in all), ``{input}`` the row's tokens
        (exactly once), ``{name}`` the text ``anchors[name]``, other text is anchor text; anchor
        text (stripped) is tokenized by ``tokenizer`` without special tokens. None: ``"[P*n] {input}"``.
    anchors: texts for ``{name}`` placeholders of the template.
    tokenizer: a Hugging Face tokenizer, or a name/path, when the template has anchor text.
    num_tasks: T; each task has its own embedding table and encoder weights (stacked on a leading
        task dimension when T > 1), all tasks are encoded in one batched call.
    backend: "auto", "triton" or "torch" for the input builder.
    modules_to_save: modules trained next to the prompt, as in :class:`PromptTuningConfig`.
    """

    METHOD = "p_tuning"

    num_virtual_tokens: int
    encoder: str = "mlp"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    template: Optional[str] = None
    anchors: Optional[dict] = None
    tokenizer: Any = None
    num_tasks: int = 1
    backend: str = "auto"
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        if self.anchors is not None and not isinstance(self.anchors, dict):
            raise ValueError(f"PTuningConfig.anchors must be a dict of name -> text, got {self.anchors!r}")
        if self.anchors is not None:
            self.anchors = dict(self.anchors)
        self.validate()

    def validate(self) -> None:
        self._check_common()
        check_choice("PTuningConfig.encoder", self.encoder, ENCODERS)
        check_int("PTuningConfig.encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_int("PTuningConfig.encoder_num_layers", self.encoder_num_layers)
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError(f"PTuningConfig.encoder_num_layers applies to encoder='lstm' only (the MLP encoder has "
                             f"three linear layers); expected the default 2, got {self.encoder_num_layers!r}")
        check_number("PTuningConfig.encoder_dropout", self.encoder_dropout, 0.0, 1.0)
        anchors = self.anchors
        if anchors is not None and not (isinstance(anchors, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in anchors.items())):
            raise ValueError(f"PTuningConfig.anchors must be None or a dict of name -> text, got {anchors!r}")
        if self.template is not None and not isinstance(self.template, str):
            raise ValueError(f"PTuningConfig.template must be a string such as '[P*3] {{input}} [P*2]', got "
                             f"{self.template!r}")
        pieces = parse_template(self.effective_template, self.num_virtual_tokens, self.anchors or {},
                                "PTuningConfig.template")
        if any(kind == "text" for kind, _ in pieces) and self.tokenizer is None:
            raise ValueError("PTuningConfig.tokenizer is required: the template has anchor text to tokenize")

    @property
    def effective_template(self) -> str:
        return self.template if self.template is not None else f"[P*{self.num_virtual_tokens}] {{input}}"


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


# ----------------------------------------------------------------------------------------
# modules holding the trainable parameters
# ----------------------------------------------------------------------------------------

class SoftPromptEmbedding(nn.Module):
    """Prompt tuning's parameters: the virtual-token embeddings themselves."""

    def __init__(self, num_tasks: int, num_virtual_tokens: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.num_tasks, self.num_virtual_tokens = num_tasks, num_virtual_tokens
        self.embedding = PromptTable(num_tasks, num_virtual_tokens, hidden, device, dtype)

    def prompts(self) -> torch.Tensor:
        """[P, hidden] for one task, [T, P, hidden] for T tasks."""
        return self.embedding.weight


class TaskLSTM(nn.Module):
    """A bidirectional, batch-first nn.LSTM per task, stacked on a leading task dimension.

    Parameters carry nn.LSTM's names (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...) with shapes
    [T, ...]; x [T, n, in] -> [T, n, 2 * hidden]; same gate order (input, forget, cell, output) and
    math as nn.LSTM, all tasks stepping together.
    """

    def __init__(self, num_tasks: int, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, float(dropout)
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else 2 * hidden_size
            for sfx in ("", "_reverse"):
                for name, shape in ((f"weight_ih_l{layer}{sfx}", (4 * hidden_size, in_size)),
                                    (f"weight_hh_l{layer}{sfx}", (4 * hidden_size, hidden_size)),
                                    (f"bias_ih_l{layer}{sfx}", (4 * hidden_size,)),
                                    (f"bias_hh_l{layer}{sfx}", (4 * hidden_size,))):
                    p = nn.Parameter(torch.empty((num_tasks,) + shape, device=device, dtype=dtype))
                    nn.init.uniform_(p, -bound, bound)
                    self.register_parameter(name, p)

    def _direction(self, x: torch.Tensor, layer: int, sfx: str) -> torch.Tensor:
        w_ih, w_hh = getattr(self, f"weight_ih_l{layer}{sfx}"), getattr(self, f"weight_hh_l{layer}{sfx}")
        b = getattr(self, f"bias_ih_l{layer}{sfx}") + getattr(self, f"bias_hh_l{layer}{sfx}")
        gx = torch.baddbmm(b.unsqueeze(1), x, w_ih.transpose(1, 2))  # input part of all gates, all steps
        T, n, _ = x.shape
        h = x.new_zeros(T, 1, self.hidden_size)
        c = x.new_zeros(T, 1, self.hidden_size)
        steps = range(n - 1, -1, -1) if sfx else range(n)
        out = [None] * n
        for s in steps:
            g = torch.baddbmm(gx[:, s:s + 1], h, w_hh.transpose(1, 2))
            i, f, cell, o = g.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cell)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[s] = h
        return torch.cat(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x = torch.cat([self._direction(x, layer, ""), self._direction(x, layer, "_reverse")], dim=-1)
        return x


class PTuningEncoder(nn.Module):
    """P-tuning v1's prompt encoder with PEFT's parameter names and math.

    ``embedding.weight`` [P, hidden] feeds ``mlp_head`` (Linear(hidden, h), ReLU, Linear(h, h), ReLU,
    Linear(h, hidden)) or ``lstm_head`` (bidirectional LSTM, hidden -> h per direction) then
    ``mlp_head`` (Linear(2h, 2h), ReLU, Linear(2h, hidden)). One task uses nn.Linear / nn.LSTM, as
    PEFT; T tasks stack each parameter on a leading task dimension and run as one batch.
    """

    def __init__(self, num_tasks: int, num_virtual_tokens: int, hidden: int, encoder: str, encoder_hidden: int,
                 num_layers: int = 2, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_tasks, self.num_virtual_tokens, self.encoder = num_tasks, num_virtual_tokens, encoder
        self.encoder_dropout = float(dropout) if encoder == "lstm" else 0.0
        kw = dict(device=device, dtype=dtype)
        self.embedding = PromptTable(num_tasks, num_virtual_tokens, hidden, **kw)
        h = encoder_hidden

        def linear(i, o):
            return nn.Linear(i, o, **kw) if num_tasks == 1 else TaskLinear(num_tasks, i, o, **kw)

        if encoder == "lstm":
            if num_tasks == 1:
                self.lstm_head = nn.LSTM(hidden, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                         batch_first=True, **kw)
            else:
                self.lstm_head = TaskLSTM(num_tasks, hidden, h, num_layers, dropout, **kw)
            self.mlp_head = nn.Sequential(linear(2 * h, 2 * h), nn.ReLU(), linear(2 * h, hidden))
        else:
            self.mlp_head = nn.Sequential(linear(hidden, h), nn.ReLU(), linear(h, h), nn.ReLU(), linear(h, hidden))
        self._cache = None

    def encode(self) -> torch.Tensor:
        """Run the encoder once for every task: [P, hidden] for one task, [T, P, hidden] for T."""
        x = self.embedding.stacked()
        if self.encoder == "lstm":
            x = self.lstm_head(x)[0] if self.num_tasks == 1 else self.lstm_head(x)
        x = self.mlp_head(x)
        return x[0] if self.num_tasks == 1 else x

    def prompts(self) -> torch.Tensor:
        """``encode()``; with gradients off (or nothing trainable) the result is cached and reused
        until a parameter changes (an in-place update or a new tensor), or its dtype / device does."""
        params = list(self.parameters())
        random = self.training and self.encoder_dropout > 0
        if random or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._cache = None
            return self.encode()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.encode())
        return self._cache[1]


# ----------------------------------------------------------------------------------------
# the model's forward on the instance
# ----------------------------------------------------------------------------------------

def _cache_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


def _moved_positions(p: torch.Tensor, col: torch.Tensor, is_tmpl: torch.Tensor, B: int, L: int,
                     name: str) -> torch.Tensor:
    """A question-answering model's ``start_positions`` / ``end_positions`` (one input token index
    per row) as indices into the laid-out sequence, where the soft prompt and any template text
    sit around the input. As the model reads them: a negative index means 0, and one at or past
    the input's length is ignored by the loss (it stays past the new length)."""
    if not isinstance(p, torch.Tensor) or p.numel() != B or p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor with one token index per row [batch={B}], got "
                         f"{tuple(getattr(p, 'shape', ()))} {getattr(p, 'dtype', type(p).__name__)}")
    flat = p.reshape(B).to(device=col.device, dtype=torch.long)
    inside = flat.clamp(min=0, max=L - 1)
    where = (col == inside[:, None]) & ~is_tmpl  # exactly one slot per row holds input column `inside`
    moved = where.int().argmax(dim=1)
    moved = torch.where(flat >= L, torch.full_like(moved, col.shape[1]), moved)
    return moved.to(p.dtype).reshape(p.shape)


def _row_spans(mask: Optional[torch.Tensor], B: int, L: int, device, what: str):
    """(first real column, end of the real columns) per row of a 2D padding mask."""
    if mask is None:
        return torch.zeros(B, dtype=torch.long, device=device), torch.full((B,), L, dtype=torch.long, device=device)
    ones = mask != 0
    n_real = ones.sum(1)
    first = torch.where(n_real > 0, ones.int().argmax(1), torch.zeros_like(n_real))
    end = first + n_real
    j = torch.arange(L, device=device)
    inside = (j >= first[:, None]) & (j < end[:, None])
    if not torch.equal(inside, ones):
        bad = int((inside != ones).any(1).nonzero()[0, 0])
        raise ValueError(f"{what} row {bad} has padding between its tokens ({mask[bad].tolist()}); expected each row's "
                         "ones to be contiguous (left or right padding only)")
    return first, end


def _layout(n_left, end, pad_before, L0: int, Lu: int, A: int, E: int):
    """Where every output column of a row comes from. [B, Lu + E] each: the caller's column it
    copies, the template slot it holds (template = before ++ after), whether it is a template slot.

    The first ``L0`` caller columns (the prefill input; its real tokens are ``[n_left, end)``) are
    laid out as ``[pad_before pads] [template before] [real tokens] [template after] [other pads]``,
    the pads in their original order; columns from ``L0`` on (tokens decoded later) follow as they are.
    """
    j = torch.arange(Lu + E, device=n_left.device)[None]
    nl, en, pb = n_left[:, None], end[:, None], pad_before[:, None]
    n_real = en - nl
    t0 = pb + A  # first real token
    t1 = t0 + n_real  # first slot after the real tokens
    in_before = (j >= pb) & (j < t0)
    in_after = (j >= t1) & (j < t1 + E - A)
    is_tmpl = in_before | in_after
    k = torch.where(j < pb, j, j - E - n_real)  # index among the prefill's pads
    pad_col = torch.where(k < nl, k, en + k - nl)
    col = torch.where((j >= t0) & (j < t1), nl + j - t0, pad_col)
    col = torch.where(j >= L0 + E, j - E, col).clamp(0, max(Lu - 1, 0))
    slot = torch.where(in_before, j - pb, j - pb - n_real).clamp(0, max(E - 1, 0))
    return col, slot, is_tmpl


def _mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted by a 2D padding mask, as generate numbers them (padding gets 0)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _as_task_ids(task_ids, B: int, T: int, device) -> Optional[torch.Tensor]:
    """Each row's task as int32 [B] on ``device`` (None for one task); any integer dtype alike."""
    tasks = check_task_ids(task_ids, B, T, "soft prompts")
    return tasks.to(device) if tasks is not None else None


class PromptForward:
    """The model instance's ``forward``: builds the soft-prompt inputs, then calls the model's own.

    Its signature is the model's forward plus the keyword ``task_ids`` (so ``generate`` accepts and
    passes it on). Held in ``model.__dict__["forward"]``; ``remove_prompt`` takes it out.
    """

    def __init__(self, model: nn.Module, prev, method: str, backend: str, A: int, E: int, num_tasks: int):
        self.model, self.prev, self.method, self.backend = model, prev, method, backend
        self.A, self.E, self.num_tasks = A, E, num_tasks
        # a sequence classifier's labels are one per row (or per row and label), not per token:
        # they pass through as they are, as in PEFT
        self.row_labels = type(model).__name__.endswith("ForSequenceClassification")
        # a decoder's sequence classifier (its head is ``score``) reads each row's last token, which it
        # finds from input_ids; from inputs_embeds it takes the last column: all padding goes first
        self.last_token_head = self.row_labels and isinstance(getattr(model, "score", None), nn.Module)
        self._generating = 0
        base_sig = inspect.signature(prev if prev is not None else type(model).forward.__get__(model))
        params = list(base_sig.parameters.values())
        self.positional = [p.name for p in params
                           if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.accepts = {p.name for p in params}
        self.var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        extra = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        if params and params[-1].kind == inspect.Parameter.VAR_KEYWORD:
            params = params[:-1] + [extra, params[-1]]
        else:
            params = params + [extra]
        self.__signature__ = base_sig.replace(parameters=params)

    # -- plumbing --------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        return getattr(self.model, MODULE_ATTR)[ADAPTER]

    def _call_model(self, kwargs):
        if self.prev is not None:
            return self.prev(**kwargs)
        return type(self.model).forward(self.model, **kwargs)

    def __call__(self, *args, task_ids=None, **kwargs):
        if len(args) > len(self.positional):
            raise TypeError(f"forward takes at most {len(self.positional)} positional arguments, got {len(args)}")
        for name, a in zip(self.positional, args):
            if name in kwargs:
                raise TypeError(f"forward got multiple values for argument {name!r}")
            kwargs[name] = a
        past = cache_from_kwargs(kwargs)
        past_len = _cache_length(past)
        if past_len > 0:
            return self._call_model(self._decode(kwargs, past, past_len))
        kwargs, layout = self._prefill(kwargs, task_ids)
        out = self._call_model(kwargs)
        cache = past if past is not None else cache_from_output(out)
        if cache is not None and not isinstance(cache, (tuple, list)):
            try:
                setattr(cache, LAYOUT_ATTR, layout)
            except Exception:  # a cache type that takes no attributes: decode derives the layout from the mask
                pass
        return out

    # -- limits ----------------------------------------------------------------------------
    def _check_positions(self, pos: torch.Tensor, what: str) -> None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and pos.numel():
            top = int(pos.max())
            if top >= limit:
                raise ValueError(f"{what} needs position {top}, beyond the model's position limit "
                                 f"max_position_embeddings={limit} (the soft prompt / template adds {self.E} "
                                 f"tokens per row); expected at most {limit - self.E} tokens of input per row")

    def _check_mask(self, mask, B: int, L: int, what: str):
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, L):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must be a 2D padding mask [batch={B}, {what}={L}], got {shape}")
        return mask

    def _caller_positions(self, position_ids, B: int, L: int, offset: int, device):
        """Positions of the caller's columns in its own coordinates (no template), without a mask."""
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
                    position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
                shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else position_ids
                raise ValueError(f"position_ids must be [batch={B} or 1, seq={L}], got {shape}")
            return position_ids.to(device=device, dtype=torch.long).expand(B, L)
        return (torch.arange(L, device=device) + offset).unsqueeze(0).expand(B, L)

    # -- prefill ---------------------------------------------------------------------------
    def _prefill(self, kw: dict, task_ids):
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = ids if ids is not None else embeds
        if ids is not None and (ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} {ids.dtype}")
        if embeds is not None and embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, seq, hidden], got {tuple(embeds.shape)}")
        B, L = x.shape[0], x.shape[1]
        if L == 0:
            raise ValueError("input_ids must hold at least one token per row, got seq length 0")
        device = x.device
        enc = self.encoder
        A, E = self.A, self.E
        tasks = _as_task_ids(task_ids, B, self.num_tasks, device)
        mask = self._check_mask(kw.get("attention_mask"), B, L, "seq")
        n_left, end = _row_spans(mask, B, L, device, "attention_mask")
        # generate (and a decoder's sequence classifier) reads every row's last token off the last
        # column: there all padding goes first
        pad_before = L - (end - n_left) if (self._generating or self.last_token_head) else n_left
        col, slot, is_tmpl = _layout(n_left, end, pad_before, L, L, A, E)

        if mask is not None:  # positions counted by the laid-out mask
            new_mask = torch.where(is_tmpl, torch.ones_like(col), mask.gather(1, col).long())
            pos = _mask_positions(new_mask)
            new_mask = new_mask.to(mask.dtype)
        else:  # the caller's positions, shifted past the template before them
            upos = self._caller_positions(kw.get("position_ids"), B, L, 0, device)
            tmpl_pos = torch.where(slot < A, upos[:, :1] + slot, upos[:, -1:] + 1 + slot)
            pos = torch.where(is_tmpl, tmpl_pos, upos.gather(1, col) + A)
        self._check_positions(pos, f"input of {L} tokens per row")

        # the index map: token ids (or rows of a gathered table) and virtual tokens -(v+1)
        tmpl = enc.template_src.to(device)
        tmpl_vals = tmpl[slot] if E else torch.zeros_like(col)
        emb_module = self.model.get_input_embeddings()
        if embeds is None and type(emb_module) is nn.Embedding and emb_module.max_norm is None and \
                not (emb_module.weight.requires_grad and emb_module.padding_idx is not None):
            table = emb_module.weight
            tok = ids.long().gather(1, col)
        else:  # inputs_embeds, or an embedding module with its own forward (e.g. scaled): gather its rows
            rows = embeds if embeds is not None else emb_module(ids)
            table = rows.reshape(B * L, -1)
            if E and bool((tmpl >= 0).any()):  # anchor text: its embeddings go after the caller's rows
                table = torch.cat([table, emb_module(tmpl.clamp(min=0)).to(rows.dtype)], dim=0)
                tmpl_vals = torch.where(tmpl_vals >= 0, B * L + slot, tmpl_vals)
            tok = col + torch.arange(B, device=device)[:, None] * L
        src = torch.where(is_tmpl, tmpl_vals, tok)
        prompts = enc.prompts()
        if tasks is not None and prompts.dim() == 2:
            prompts = prompts.unsqueeze(0)
        new_embeds = build_inputs_embeds(src, table, prompts, tasks, backend=self.backend)

        out = dict(kw)
        out["input_ids"] = None
        out["inputs_embeds"] = new_embeds
        if mask is not None:
            out["attention_mask"] = new_mask
        if "position_ids" in self.accepts or self.var_kw:
            out["position_ids"] = pos
        if kw.get("labels") is not None and self.row_labels:
            labels = kw["labels"]
            if labels.dim() == 0 or labels.shape[0] != B:
                raise ValueError(f"labels of a sequence classifier must have one row per input row [batch={B}, ...], "
                                 f"got {tuple(labels.shape)}")
            out["labels"] = labels
        elif kw.get("labels") is not None:
            labels = kw["labels"]
            if tuple(labels.shape) != (B, L):
                raise ValueError(f"labels must be [batch={B}, seq={L}] like input_ids, got {tuple(labels.shape)}")
            out["labels"] = torch.where(is_tmpl, torch.full_like(col, -100), labels.gather(1, col))
        for name in ("start_positions", "end_positions"):  # question answering: token indices into the input
            if kw.get(name) is not None:
                out[name] = _moved_positions(kw[name], col, is_tmpl, B, L, name)
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"]
            out["token_type_ids"] = torch.where(is_tmpl, torch.zeros_like(col), tt.gather(1, col).long()).to(tt.dtype)
        self._check_static_cache(cache_from_kwargs(kw), L + E)
        return out, (n_left, end, pad_before, L)

    def _check_static_cache(self, past, needed: int) -> None:
        layers = getattr(past, "layers", None)
        if not layers:
            return
        cap = getattr(layers[0], "max_cache_len", None)
        if type(layers[0]).__name__ == "StaticLayer" and isinstance(cap, int) and needed > cap:
            raise ValueError(f"past_key_values is a static cache of {cap} positions but the input with its soft "
                             f"prompt needs {needed}; allocate {self.E} more positions (the template length)")

    # -- decode ----------------------------------------------------------------------------
    def _decode(self, kw: dict, past, past_len: int) -> dict:
        A, E = self.A, self.E
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            raise ValueError("pass input_ids (or inputs_embeds) for the new tokens")
        B, n = x.shape[0], x.shape[1]
        device = x.device
        user_past = past_len - E
        if user_past < 0:
            raise ValueError(f"past_key_values holds {past_len} tokens, fewer than the {E} the soft prompt adds; "
                             "expected a cache filled by a forward of this model")
        mask = self._check_mask(kw.get("attention_mask"), B, user_past + n, "cached + new tokens")
        out = dict(kw)
        if mask is not None:
            layout = getattr(past, LAYOUT_ATTR, None)
            if layout is not None and layout[0].shape[0] == B and layout[3] <= user_past:
                n_left, end, pad_before = (t.to(device) for t in layout[:3])
                L0 = layout[3]
            else:  # a cache filled elsewhere: read the prefill's padding off the mask
                L0 = user_past
                n_left, end = _row_spans(mask[:, :L0], B, L0, device, "attention_mask (cached part)")
                pad_before = n_left
            col, _, is_tmpl = _layout(n_left, end, pad_before, L0, user_past + n, A, E)
            new_mask = torch.where(is_tmpl, torch.ones_like(col), mask.gather(1, col).long())
            pos = _mask_positions(new_mask)[:, -n:]
            out["attention_mask"] = new_mask.to(mask.dtype)
        else:
            pos = self._caller_positions(kw.get("position_ids"), B, n, user_past, device) + E
        self._check_positions(pos, f"decoding {n} token(s) after {user_past} cached ones")
        if "position_ids" in self.accepts or self.var_kw:
            out["position_ids"] = pos
        return out


class PromptGenerate:
    """The model instance's ``generate``: the model's own, told that it runs (so the prefill puts
    every row's padding first and each row's last real token in the last column)."""

    def __init__(self, model: nn.Module, prev):
        self.model, self.prev = model, prev
        self.__signature__ = inspect.signature(prev if prev is not None else type(model).generate.__get__(model))

    def __call__(self, *args, **kwargs):
        fwd = self.model.__dict__["forward"]
        fwd._generating += 1
        try:
            if self.prev is not None:
                return self.prev(*args, **kwargs)
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            fwd._generating -= 1


# ----------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------

def is_prompt_model(model: nn.Module) -> bool:
    """Whether ``model`` carries a soft prompt from ``apply_prompt``."""
    return isinstance(getattr(model, "__dict__", {}).get("forward"), PromptForward)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def occupied_message(model: nn.Module) -> str:
    """Why a model that already has a ``prompt_encoder`` attribute cannot take a soft prompt. A ptune-rt
    prefix keeps its ``PrefixEncoder`` there (recognised by name: the prefix package imports this one)."""
    held = getattr(model, MODULE_ATTR, None)
    held = held[ADAPTER] if isinstance(held, nn.ModuleDict) and ADAPTER in held else held
    if type(held).__name__ == "PrefixEncoder":
        return (f"model already has a {MODULE_ATTR!r} module: the model already carries a ptune-rt prefix, and a soft "
                "prompt and a prefix do not combine on one model: ptune_rt.restore(model) first")
    return (f"model already has a {MODULE_ATTR!r} attribute (a PEFT prompt-learning model?); expected a plain "
            "Hugging Face model")


def apply_prompt(model: nn.Module, config) -> nn.Module:
    """Give ``model`` (in place) the soft prompt of ``config``, freeze everything else, return it.

    Afterwards exactly the prompt parameters (``prompt_encoder.default.*``) and the modules of
    ``config.modules_to_save`` (by default a classification / QA model's task head) train. Every
    check runs before the first change; the previous requires_grad flags are kept for ``remove_prompt``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
    if not isinstance(config, (PromptTuningConfig, PTuningConfig)):
        raise TypeError(f"config must be a PromptTuningConfig or PTuningConfig, got {type(config).__name__}")
    config.validate()
    if is_prompt_model(model):
        raise ValueError("model already carries a ptune-rt soft prompt; call ptune_rt.methods.prompt.remove_prompt"
                         "(model) first")
    if hasattr(model, MODULE_ATTR):
        raise ValueError(occupied_message(model))
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; soft prompts at the input support "
                         "decoder-only and encoder-only models")
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); expected a "
                         "Hugging Face model")
    sig = inspect.signature(model.forward)
    if "inputs_embeds" not in sig.parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no inputs_embeds; soft prompts need it")
    emb = model.get_input_embeddings()
    weight = emb.weight
    V, H = weight.shape
    try:
        resolve_backend(config.backend, weight.device)
    except RuntimeError as e:
        raise ValueError(f"{type(config).__name__}.backend={config.backend!r} cannot run on {weight.device}: {e}") \
            from None
    T, P = config.num_tasks, config.num_virtual_tokens

    # template (anchor text tokenized here) and text init, all before any change
    if isinstance(config, PTuningConfig):
        pieces = parse_template(config.effective_template, P, config.anchors or {}, "PTuningConfig.template")
        tok = _resolve_tokenizer(config.tokenizer, "PTuningConfig.tokenizer") \
            if any(k == "text" for k, _ in pieces) else None
        before, after = template_src(pieces, tok)
    else:
        before, after = [-(v + 1) for v in range(P)], []
    bad = [t for t in before + after if t >= V]
    if bad:
        raise ValueError(f"the template's anchor text tokenizes to ids {bad} outside the model's vocabulary "
                         f"[0, {V}); expected the model's own tokenizer")
    A, E = len(before), len(before) + len(after)
    limit = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit, int) and E >= limit:
        raise ValueError(f"the soft prompt / template takes {E} positions, leaving no room for input within the "
                         f"model's position limit max_position_embeddings={limit}; expected fewer virtual tokens")
    init_ids = None
    if isinstance(config, PromptTuningConfig) and config.init == "text":
        tok = _resolve_tokenizer(config.tokenizer, "PromptTuningConfig.tokenizer")
        ids = _encode(tok, config.init_text, True, "PromptTuningConfig.init_text")
        ids = (ids * math.ceil(P / len(ids)))[:P]  # repeated or cut to P tokens, as PEFT does
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"PromptTuningConfig.init_text tokenizes to ids {bad} outside the model's vocabulary "
                             f"[0, {V}); expected the model's own tokenizer")
        init_ids = torch.tensor(ids, dtype=torch.long, device=weight.device)
    if isinstance(config, PTuningConfig):
        enc_h = config.encoder_hidden_size or H
    heads = head_modules(model, config.modules_to_save, type(config).__name__, MODULE_ATTR)

    # build the parameters
    kw = dict(device=weight.device, dtype=_adapter_dtype(weight))
    if isinstance(config, PromptTuningConfig):
        module = SoftPromptEmbedding(T, P, H, **kw)
        with torch.no_grad():
            if config.init == "vocab":
                sample = torch.randint(0, V, (T * P,), dtype=torch.long).to(weight.device)
                module.embedding.weight.copy_(emb(sample).detach().reshape(module.embedding.weight.shape))
            elif config.init == "text":
                rows = emb(init_ids).detach()
                module.embedding.stacked().copy_(rows.unsqueeze(0).expand(T, P, H))
        method = "prompt_tuning"
    else:
        module = PTuningEncoder(T, P, H, config.encoder, enc_h, config.encoder_num_layers, config.encoder_dropout,
                                **kw)
        method = "p_tuning"
    module.register_buffer("template_src", torch.tensor(before + after, dtype=torch.long, device=weight.device),
                           persistent=False)
    module.train(model.training)

    # nothing below can fail on a validated model
    prev = model.__dict__.get("forward")
    fwd = PromptForward(model, prev, method, config.backend, A, E, T)
    gen = PromptGenerate(model, model.__dict__.get("generate")) if callable(getattr(model, "generate", None)) \
        else None
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in heads:  # the task head trains with the prompt, as PEFT's modules_to_save
        model.get_submodule(name).requires_grad_(True)
    setattr(model, MODULE_ATTR, nn.ModuleDict({ADAPTER: module}))
    model.__dict__[REQUIRES_GRAD_ATTR] = before_flags
    model.__dict__["_ptune_prompt_config"] = config
    model.__dict__["forward"] = fwd
    if gen is not None:
        model.__dict__["generate"] = gen
    return model


def remove_prompt(model: nn.Module) -> nn.Module:
    """Undo ``apply_prompt``: the model's own forward comes back, the prompt module goes, and the
    previous requires_grad flags return. Returns the model."""
    if not is_prompt_model(model):
        raise ValueError(f"{type(model).__name__} carries no ptune-rt soft prompt; expected a model from "
                         "ptune_rt.apply(model, PromptTuningConfig(...) or PTuningConfig(...))")
    for name, wrapper_type in (("forward", PromptForward), ("generate", PromptGenerate)):
        wrapper = model.__dict__.get(name)
        if isinstance(wrapper, wrapper_type):
            if wrapper.prev is None:
                del model.__dict__[name]
            else:
                model.__dict__[name] = wrapper.prev
    delattr(model, MODULE_ATTR)
    flags = model.__dict__.pop(REQUIRES_GRAD_ATTR, {})
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    model.__dict__.pop("_ptune_prompt_config", None)
    return model


def prompt_report(model: nn.Module) -> dict:
    """What the soft prompt of ``model`` is and which backend builds its inputs, and why."""
    if not is_prompt_model(model):
        raise ValueError(f"{type(model).__name__} carries no ptune-rt soft prompt")
    fwd = model.__dict__["forward"]
    enc = fwd.encoder
    backend, why = resolve_backend(fwd.backend, model.get_input_embeddings().weight.device)
    return {"method": fwd.method, "num_virtual_tokens": enc.num_virtual_tokens, "num_tasks": fwd.num_tasks,
            "template_tokens": fwd.E, "before_input": fwd.A,
            "encoder": getattr(enc, "encoder", None), "backend": backend, "why": why,
            "trainable_parameters": sum(p.numel() for p in enc.parameters() if p.requires_grad)}


__all__ = ["PromptTuningConfig", "PTuningConfig", "SoftPromptEmbedding", "PTuningEncoder", "PromptTable",
           "TaskLinear", "TaskLSTM", "apply_prompt", "remove_prompt", "is_prompt_model", "prompt_report",
           "parse_template"]
