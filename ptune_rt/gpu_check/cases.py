"""The cases gpu-check runs: one list shared by the CLI and ``pytest -m gpu``.

A case is a frozen dataclass that says what to build (shapes, dtype); ``numerics.check`` checks it
and ``timing.time_case`` times it. ``numerics_cases`` / ``timing_cases`` give them in run order:
the most important first, so that a run cut short by its time budget drops the least important.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

#: 7B-class (Llama-2-7B) linears: (label, in_features K, out_features N).
LORA_LINEARS = (("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 4096, 11008), ("down_proj", 11008, 4096))
M_VALUES = (1, 16, 4096, 16384)   # tokens per step: decode, small batch, one and four 4k sequences
RANKS = (8, 16, 64)
DTYPES = ("bfloat16", "float16", "float32")
#: One 7B-class attention layer: 32 query heads, 8 KV heads, head dim 128, prefix of 128, 4k tokens.
ATTENTION = dict(Hq=32, Hkv=8, D=128, P=128, L=4096)
#: The embedding table the prompt-input gather reads (Llama-2's vocabulary x hidden size).
EMBEDDING = dict(V=32000, H=4096)
#: A 7B-class MLP weight (gate/up projection, [11008, 4096]): what one Child-tuning AdamW step updates.
MLP_WEIGHT = (11008, 4096)
CHILD_RESERVE_P = 0.3  # the share of entries in the child network (the paper's default)
DROPOUT_P = 0.1
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class LoraCase:
    """One LoRA linear: x [M, K], frozen W [N, K] (no bias, as in Llama), fp32 adapters (PEFT's default)."""
    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float = 0.0
    kind: ClassVar[str] = "lora"

    @property
    def id(self) -> str:
        drop = f" p{self.dropout:g}" if self.dropout else ""
        return f"lora {_SHORT[self.dtype]} M{self.M} K{self.K} N{self.N} r{self.r}{drop}"


@dataclasses.dataclass(frozen=True)
class DoraCase(LoraCase):
    """One DoRA linear (``ptune_rt.ops.dora_linear``): a LoRA case's operands plus a trainable
    magnitude [N]; with dropout the twin kernel's path."""
    kind: ClassVar[str] = "dora"

    @property
    def id(self) -> str:
        drop = f" p{self.dropout:g}" if self.dropout else ""
        return f"dora {_SHORT[self.dtype]} M{self.M} K{self.K} N{self.N} r{self.r}{drop}"


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Prefix attention: q [B, Hq, L, D] over [prefix [Hkv, P, D] ; k/v [B, Hkv, S, D]]. L = 1 is a
    decode step against a cache of S - 1 keys (forward only); otherwise forward + backward."""
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    dtype: str
    causal: bool = True
    padding: Optional[str] = None  # None, "left" or "right": rows of different lengths
    kind: ClassVar[str] = "attention"

    @property
    def mode(self) -> str:
        return "decode" if self.L == 1 else "train"

    @property
    def id(self) -> str:
        pad = f" {self.padding}-padded" if self.padding else ""
        return (f"attention {self.mode} {_SHORT[self.dtype]} B{self.B} H{self.Hq}/{self.Hkv} L{self.L} "
                f"S{self.S} P{self.P} D{self.D}{'' if self.causal else ' bidirectional'}{pad}")


@dataclasses.dataclass(frozen=True)
class GatherCase:
    """Soft-prompt inputs: B rows of L token ids after P virtual tokens, from a [V, H] embedding;
    T > 1: a [T, P, H] prompt stack with one task per row."""
    B: int
    L: int
    P: int
    V: int
    H: int
    T: int
    dtype: str
    kind: ClassVar[str] = "gather"

    @property
    def id(self) -> str:
        return f"gather {_SHORT[self.dtype]} B{self.B} L{self.L} P{self.P} V{self.V} H{self.H} T{self.T}"


@dataclasses.dataclass(frozen=True)
class IA3Case:
    """One IA3 linear (``ptune_rt.ops.ia3_linear``): x [M, K], frozen W [N, K] (no bias), an fp32
    vector l; ``feedforward``: the input scale ``(x * l) W^T`` (l [K], the FFN's down projection),
    else the output scale ``(x W^T) * l`` (l [N], keys and values)."""
    M: int
    K: int
    N: int
    dtype: str
    feedforward: bool = False
    kind: ClassVar[str] = "ia3"

    @property
    def id(self) -> str:
        scale = "input-scale" if self.feedforward else "output-scale"
        return f"ia3 {_SHORT[self.dtype]} M{self.M} K{self.K} N{self.N} {scale}"


@dataclasses.dataclass(frozen=True)
class LoraEmbeddingCase:
    """LoRA on an embedding table (``ptune_rt.ops.lora_embedding``): M token ids into a frozen [V, H]
    table, fp32 adapters A [r, V] and B [H, r] (PEFT's default)."""
    M: int
    V: int
    H: int
    r: int
    dtype: str
    kind: ClassVar[str] = "lora_embedding"

    @property
    def id(self) -> str:
        return f"lora_embedding {_SHORT[self.dtype]} M{self.M} V{self.V} H{self.H} r{self.r}"


@dataclasses.dataclass(frozen=True)
class ChildAdamwCase:
    """The fused Child-tuning AdamW step (``ChildTuningAdamW``) on one [N, K] parameter with fp32
    moments; mode "F" (a fresh Bernoulli(reserve_p) gradient mask each step) or "D" (a fixed child)."""
    N: int
    K: int
    dtype: str
    mode: str
    reserve_p: float = CHILD_RESERVE_P
    kind: ClassVar[str] = "child_adamw"

    @property
    def id(self) -> str:
        return f"child_adamw {_SHORT[self.dtype]} {self.N}x{self.K} mode {self.mode} p{self.reserve_p:g}"


Case = Union[LoraCase, DoraCase, AttentionCase, GatherCase, IA3Case, LoraEmbeddingCase, ChildAdamwCase]
#: Case kinds in report order.
KINDS = ("lora", "dora", "attention", "gather", "ia3", "lora_embedding", "child_adamw")


def describe(case: Case) -> dict:
    """The case as JSON: its kind, id and fields."""
    return {"kind": case.kind, "id": case.id, **dataclasses.asdict(case)}


# ----------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------


def _lora_numerics() -> list[LoraCase]:
    """bf16: every M x r on the two 4096-in linears, then the dropout case; fp16 and fp32 at r = 16;
    the down projection (11008 -> 4096) last, in bf16."""
    qkv, up, down = ((K, N) for _, K, N in LORA_LINEARS)
    cases = [LoraCase(M, K, N, r, "bfloat16") for K, N in (qkv, up) for M in M_VALUES for r in RANKS]
    cases.append(LoraCase(4096, *qkv, 16, "bfloat16", DROPOUT_P))
    cases += [LoraCase(M, K, N, 16, dt) for dt in ("float16", "float32") for K, N in (qkv, up) for M in M_VALUES]
    cases += [LoraCase(M, *down, 16, "bfloat16") for M in M_VALUES]
    return cases


def _dora_numerics() -> list[DoraCase]:
    """Every dtype on the q/k/v-sized linear at 4096 tokens, then bf16 decode-sized and the down projection."""
    qkv, _, down = ((K, N) for _, K, N in LORA_LINEARS)
    return ([DoraCase(4096, *qkv, 16, dt) for dt in DTYPES] + [DoraCase(16, *qkv, 16, "bfloat16")]
            + [DoraCase(4096, *qkv, 16, "bfloat16", DROPOUT_P)] + [DoraCase(4096, *down, 16, "bfloat16")])


def _attention_numerics() -> list[AttentionCase]:
    a = ATTENTION
    train = [AttentionCase(1, a["Hq"], a["Hkv"], a["L"], a["L"], a["P"], a["D"], dt) for dt in DTYPES]
    decode = [AttentionCase(8, a["Hq"], a["Hkv"], 1, a["L"], a["P"], a["D"], dt, padding="left") for dt in DTYPES]
    padded = [AttentionCase(2, a["Hq"], a["Hkv"], 1024, 1024, a["P"], a["D"], "bfloat16", padding="right")]
    return train + decode + padded


def _gather_numerics() -> list[GatherCase]:
    e = EMBEDDING
    return [GatherCase(4, 512, 32, e["V"], e["H"], 4, dt) for dt in DTYPES] + \
        [GatherCase(4, 512, 32, e["V"], e["H"], 1, "bfloat16")]


def _ia3_numerics() -> list[IA3Case]:
    """Both scales in every dtype at 4096 tokens: the output scale on the q/k/v-sized linear (keys,
    values), the input scale on the down projection (11008 -> 4096)."""
    qkv, _, down = ((K, N) for _, K, N in LORA_LINEARS)
    return ([IA3Case(4096, *qkv, dt) for dt in DTYPES] + [IA3Case(4096, *down, dt, True) for dt in DTYPES])


def _lora_embedding_numerics() -> list[LoraEmbeddingCase]:
    e = EMBEDDING
    return [LoraEmbeddingCase(4096, e["V"], e["H"], 16, dt) for dt in DTYPES]


def _child_adamw_numerics() -> list[ChildAdamwCase]:
    return [ChildAdamwCase(*MLP_WEIGHT, dt, mode) for dt in ("float32", "bfloat16") for mode in ("F", "D")]


def _pytest_numerics() -> list[Case]:
    """A smaller subset for ``pytest -m gpu``: the same checker at fewer, smaller shapes."""
    a, e = ATTENTION, EMBEDDING
    lora = [LoraCase(M, 4096, 4096, 16, dt) for dt in DTYPES for M in (1, 4096)]
    lora += [LoraCase(16, 4096, 11008, r, "bfloat16") for r in (8, 64)]
    lora.append(LoraCase(4096, 4096, 4096, 16, "bfloat16", DROPOUT_P))
    lora += [DoraCase(1024, 4096, 4096, 16, dt) for dt in ("bfloat16", "float32")]
    lora.append(DoraCase(1024, 4096, 4096, 16, "bfloat16", DROPOUT_P))
    attn = [AttentionCase(1, a["Hq"], a["Hkv"], 1024, 1024, a["P"], a["D"], dt) for dt in DTYPES]
    attn.append(AttentionCase(4, a["Hq"], a["Hkv"], 1, a["L"], a["P"], a["D"], "bfloat16", padding="left"))
    gather = [GatherCase(2, 128, 16, e["V"], e["H"], 2, dt) for dt in ("bfloat16", "float32")]
    ia3 = [IA3Case(1024, 4096, 4096, "bfloat16"), IA3Case(1024, 11008, 4096, "float16", True)]
    embedding = [LoraEmbeddingCase(1024, e["V"], e["H"], 16, "bfloat16")]
    child = [ChildAdamwCase(4096, 4096, "bfloat16", "F"), ChildAdamwCase(4096, 4096, "float32", "D")]
    return lora + attn + gather + ia3 + embedding + child


def numerics_cases(subset: str = "full") -> dict[str, list[Case]]:
    """Numerics cases by section id, in run order; ``subset="pytest"`` for the pytest-sized subset."""
    if subset == "pytest":
        cases = _pytest_numerics()
        return {f"numerics_{k}": [c for c in cases if c.kind == k] for k in KINDS}
    return {"numerics_lora": _lora_numerics(), "numerics_dora": _dora_numerics(),
            "numerics_attention": _attention_numerics(), "numerics_gather": _gather_numerics(),
            "numerics_ia3": _ia3_numerics(), "numerics_lora_embedding": _lora_embedding_numerics(),
            "numerics_child_adamw": _child_adamw_numerics()}


# ----------------------------------------------------------------------------------------
# timings
# ----------------------------------------------------------------------------------------

#: What gets timed per case: a training step (forward + backward) and a no-grad forward.
MODES = ("train", "forward")


def timing_cases(subset: str = "full") -> dict[str, list[tuple[Case, tuple[str, ...]]]]:
    """(case, modes) by section id, in run order: bf16, r = 16, the numerics' shapes."""
    if subset == "pytest":
        return {}
    a, e = ATTENTION, EMBEDDING
    lora = [(LoraCase(M, K, N, 16, "bfloat16"), MODES) for _, K, N in LORA_LINEARS[:2] for M in M_VALUES]
    lora.append((LoraCase(4096, 4096, 11008, 16, "bfloat16", DROPOUT_P), ("train",)))
    lora += [(LoraCase(M, *LORA_LINEARS[2][1:], 16, "bfloat16"), MODES) for M in M_VALUES]
    attn = [(AttentionCase(1, a["Hq"], a["Hkv"], a["L"], a["L"], a["P"], a["D"], "bfloat16"), MODES),
            (AttentionCase(8, a["Hq"], a["Hkv"], 1, a["L"], a["P"], a["D"], "bfloat16"), ("forward",))]
    gather = [(GatherCase(4, 512, 32, e["V"], e["H"], 1, "bfloat16"), MODES)]
    dora = [(DoraCase(M, *LORA_LINEARS[0][1:], 16, "bfloat16"), MODES) for M in (16, 4096)]
    return {"timing_lora": lora, "timing_dora": dora, "timing_attention": attn, "timing_gather": gather}


SECTION_TITLES = {
    "numerics_lora": "numerics: fused LoRA linear",
    "numerics_dora": "numerics: DoRA linear",
    "numerics_attention": "numerics: prefix attention",
    "numerics_gather": "numerics: prompt-input gather",
    "numerics_ia3": "numerics: IA3 linear",
    "numerics_lora_embedding": "numerics: LoRA embedding",
    "numerics_child_adamw": "numerics: Child-tuning AdamW step",
    "timing_lora": "timing: LoRA linear vs PEFT vs eager",
    "timing_dora": "timing: DoRA linear vs PEFT DoRA vs eager",
    "timing_attention": "timing: prefix attention vs PEFT vs eager",
    "timing_gather": "timing: prompt-input gather vs PEFT",
}
