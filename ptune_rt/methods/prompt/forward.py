"""The forward and generate of a model with a soft prompt (held on the instance).

At prefill (no cache, or an empty one) ``input_ids`` become ``inputs_embeds`` in one call of
``ptune_rt.ops.prompt_inputs.build_inputs_embeds`` over an index map per row (no concatenation, no
loop over rows); the attention mask, positions, labels and token types are laid out alike. A row is
``[left padding] [template before {input}] [real tokens] [template after] [right padding]``, so a
padded row computes what it computes alone; inside ``generate`` a right-padded row puts its padding
first, so each row's last real token is in the last column. Positions are counted by the laid-out
mask (``cumsum - 1``), or shifted past the template without a mask. Decode steps take new tokens
as they are and only widen the mask and shift positions, so hand-written cache loops and
``generate`` agree. PEFT 0.21.2 instead puts the prompt before left padding, lets the model number
the positions itself (it drops ``position_ids``) and re-inserts the prompt on every call of a cache
loop; tests pin both behaviours. ``placement="peft"`` takes PEFT's layout and positions (a row is
``[template before] [the row as given] [template after]``; decode steps widen the mask and pass no
positions), for bit-parity with PEFT.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ptune_rt._cache_names import cache_from_kwargs, cache_from_output
from ptune_rt.methods._config import check_task_ids
from ptune_rt.ops.prompt_inputs import build_inputs_embeds

ADAPTER = "default"
MODULE_ATTR = "prompt_encoder"
LAYOUT_ATTR = "_ptune_prompt_layout"


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
    if not torch.compiler.is_compiling():  # a data-dependent check: eager only (no graph break when compiled)
        j = torch.arange(L, device=device)
        inside = (j >= first[:, None]) & (j < end[:, None])
        if not torch.equal(inside, ones):
            bad = int((inside != ones).any(1).nonzero()[0, 0])
            raise ValueError(f"{what} row {bad} has padding between its tokens ({mask[bad].tolist()}); expected each "
                             "row's ones to be contiguous (left or right padding only)")
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

    def __init__(self, model: nn.Module, prev, method: str, backend: str, A: int, E: int, num_tasks: int, *,
                 has_text: bool, peft_placement: bool = False):
        self.model, self.prev, self.method, self.backend = model, prev, method, backend
        self.peft_placement = peft_placement
        self.A, self.E, self.num_tasks = A, E, num_tasks
        # whether the template holds anchor text (token ids >= 0 in ``template_src``): fixed when the
        # prompt is applied, so the forward never reads the template's values to decide
        self.has_text = has_text
        # a sequence classifier's labels are one per row (or per row and label), not per token:
        # they pass through as they are, as in PEFT
        self.row_labels = type(model).__name__.endswith("ForSequenceClassification")
        # a decoder's sequence classifier (its head is ``score``) reads each row's last token, which it
        # finds from input_ids; from inputs_embeds it takes the last column: all padding goes first
        self.last_token_head = self.row_labels and isinstance(getattr(model, "score", None), nn.Module)
        self._generating = 0
        self.disabled = False  # ptune_rt.disable_adapter: the model runs without its soft prompt
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
        if self.disabled:
            return self.prev(*args, **kwargs) if self.prev is not None else type(self.model).forward(
                self.model, *args, **kwargs)
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
        # reads the largest position: eager only, so a compiled forward has no graph break here
        if torch.compiler.is_compiling():
            return
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
        n_left, end, pad_before = self._row_layout(mask, B, L, device)
        col, slot, is_tmpl = _layout(n_left, end, pad_before, L, L, A, E)

        if self.peft_placement:  # the model numbers the positions itself, as under PEFT
            pos = None
            new_mask = None if mask is None else torch.where(is_tmpl, torch.ones_like(col), mask.gather(1, col).long()
                                                             ).to(mask.dtype)
        elif mask is not None:  # positions counted by the laid-out mask
            new_mask = torch.where(is_tmpl, torch.ones_like(col), mask.gather(1, col).long())
            pos = _mask_positions(new_mask)
            new_mask = new_mask.to(mask.dtype)
        else:  # the caller's positions, shifted past the template before them
            upos = self._caller_positions(kw.get("position_ids"), B, L, 0, device)
            tmpl_pos = torch.where(slot < A, upos[:, :1] + slot, upos[:, -1:] + 1 + slot)
            pos = torch.where(is_tmpl, tmpl_pos, upos.gather(1, col) + A)
        if pos is not None:
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
            if self.has_text:  # anchor text: its embeddings go after the caller's rows
                table = torch.cat([table, emb_module(tmpl.clamp(min=0)).to(rows.dtype)], dim=0)
                tmpl_vals = torch.where(tmpl_vals >= 0, B * L + slot, tmpl_vals)
            tok = col + torch.arange(B, device=device)[:, None] * L
        src = torch.where(is_tmpl, tmpl_vals, tok)
        # compiled: the encoder runs in the graph (P-tuning's no-grad cache of its output compares data
        # pointers, which Dynamo cannot trace); the same values as the cached ones
        prompts = enc.prompts()
        if tasks is not None and prompts.dim() == 2:
            prompts = prompts.unsqueeze(0)
        new_embeds = build_inputs_embeds(src, table, prompts, tasks, backend=self.backend)

        out = dict(kw)
        out["input_ids"] = None
        out["inputs_embeds"] = new_embeds
        if mask is not None:
            out["attention_mask"] = new_mask
        if pos is None:
            out.pop("position_ids", None)
        elif "position_ids" in self.accepts or self.var_kw:
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

    def _row_layout(self, mask, B: int, L: int, device):
        """(first real column, end of the real columns, pads before the prompt) per row. Under PEFT's
        placement the whole row counts as real (its padding stays where it is, after the prompt);
        otherwise generate (and a decoder's sequence classifier), which read every row's last token
        off the last column, put all padding first, and anything else puts the left padding first."""
        if self.peft_placement:
            zero = torch.zeros(B, dtype=torch.long, device=device)
            if mask is not None:
                _row_spans(mask, B, L, device, "attention_mask")  # its checks
            return zero, zero + L, zero
        n_left, end = _row_spans(mask, B, L, device, "attention_mask")
        pad_before = L - (end - n_left) if (self._generating or self.last_token_head) else n_left
        return n_left, end, pad_before

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
        if self.peft_placement:  # [before] [prefill row] [after] [decoded tokens]; the model numbers positions
            if mask is not None:
                layout = getattr(past, LAYOUT_ATTR, None)
                L0 = layout[3] if layout is not None and layout[3] <= user_past else user_past
                out["attention_mask"] = torch.cat([mask.new_ones(B, A), mask[:, :L0], mask.new_ones(B, E - A),
                                                   mask[:, L0:]], dim=1)
            out.pop("position_ids", None)
            return out
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


