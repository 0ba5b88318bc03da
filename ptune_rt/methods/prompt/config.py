"""The soft prompts' hyper-parameters: :class:`PromptTuningConfig` and :class:`PTuningConfig` (names
follow PEFT's where they overlap); a tokenizer object is saved by its ``name_or_path``."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Optional

from ptune_rt.heads import check_modules_to_save
from ptune_rt.methods._config import check_choice, check_int, check_number, config_kwargs
from ptune_rt.methods.config_base import MethodConfig
from ptune_rt.methods.prompt.template import parse_template
from ptune_rt.ops.backend import BACKENDS

PROMPT_INITS = ("random", "vocab", "text")
#: Where a padded row's soft prompt goes: "after_padding" (each row computes what it computes
#: alone) or "peft" (PEFT's layout: the prompt first, before any left padding, and the model's own
#: positions, for bit-parity with PEFT; see ``forward``).
PLACEMENTS = ("after_padding", "peft")
ENCODERS = ("mlp", "lstm")


def _tokenizer_to_dict(tokenizer):
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return getattr(tokenizer, "name_or_path", None) or None


class _PromptConfig(MethodConfig):
    """What both soft-prompt configs share: a tokenizer object is written as its ``name_or_path``
    (or None), and ``from_dict`` / ``from_json`` take the tokenizer to use again."""

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copy of a tokenizer
        d["tokenizer"] = _tokenizer_to_dict(d.get("tokenizer"))
        return {"method": self.METHOD, **d}

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
        check_choice(f"{name}.placement", self.placement, PLACEMENTS)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        check_modules_to_save(name, self.modules_to_save)


@dataclasses.dataclass
class PromptTuningConfig(_PromptConfig):
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
    placement: "after_padding" (default): a row is ``[left padding] [prompt] [tokens] [right
        padding]`` with positions counted from its first real token, so a padded row computes what it
        computes alone; "peft": PEFT's layout ``[prompt] [the row as given]`` with the model's own
        positions (PEFT drops ``position_ids``), which differs from the row alone under left padding
        but matches PEFT bit for bit.
    """

    METHOD: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int
    init: str = "random"
    init_text: Optional[str] = None
    tokenizer: Any = None
    num_tasks: int = 1
    backend: str = "auto"
    modules_to_save: Optional[list] = None
    placement: str = "after_padding"

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
class PTuningConfig(_PromptConfig):
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
    placement: "after_padding" or "peft", as in :class:`PromptTuningConfig` (with "peft" the template's
        parts go around the row as given, padding included).
    """

    METHOD: ClassVar[str] = "p_tuning"

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
    placement: str = "after_padding"

    def __post_init__(self):
        if self.anchors is not None and not isinstance(self.anchors, dict):
            raise ValueError(f"PTuningConfig.anchors must be a dict of name -> text, got {self.anchors!r}")
        if self.anchors is not None:
            self.anchors = dict(self.anchors)
        super().__post_init__()

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


