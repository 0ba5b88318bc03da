"""The benchmark workload and its setup factory.

One factory builds everything a measurement needs: a Llama-like model with random weights (from a
``LlamaConfig``, never from the hub), the same model with HF PEFT's LoRA layers, the same model
with ptune-rt's fused LoRA layers, identical adapter weights in both (``lora_B`` non-zero, so the
low-rank term really contributes), and the inputs. The speed runs, the memory runs, the op counts
and the pytest-benchmark suite all call :func:`build` so they measure the very same thing.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The Llama-like model every benchmark suite runs (random weights from a ``LlamaConfig``)."""

    hidden: int = 512
    intermediate: int = 1376
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 32000
    dtype: str = "float32"
    seed: int = 0

    #: the tiny shape of every suite's ``--quick`` run: same structure (GQA), seconds to run
    QUICK = {"hidden": 64, "intermediate": 176, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512}

    @classmethod
    def default(cls):
        """The suite's default workload (every field at its default)."""
        return cls()

    def model_fields(self) -> dict:
        """This shape's fields (with dtype and seed) as keyword arguments, e.g. for :class:`Workload`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class Workload(ModelShape):
    """Model shape, batch and adapter of one benchmark run."""

    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: float = 32.0
    targets: tuple = LLAMA_TARGETS
    gen_batch: int = 1
    gen_prompt: int = 64
    gen_new_tokens: int = 32
    #: standard deviation of the random (non-zero) lora_B, large enough that the low-rank term
    #: visibly changes the logits
    lora_b_std: float = 0.02

    @classmethod
    def quick(cls) -> "Workload":
        """Tiny shapes for smoke tests: same structure (GQA, all seven targets), seconds to run."""
        # 2 x 40 = 80 tokens per training step: above SMALL_BATCH_ROWS, so the smoke run trains through
        # the same LoRA path as the full run
        return cls(**cls.QUICK, batch=2, seq=40, r=8, alpha=16.0, gen_prompt=8, gen_new_tokens=4)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def n_lora_linears(self) -> int:
        return self.layers * len(self.targets)

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           max_position_embeddings=max(2048, self.seq, self.gen_prompt + self.gen_new_tokens),
                           tie_word_embeddings=False, use_cache=True)

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(target, in_features, out_features) of every LoRA target of one decoder layer."""
        hd = self.hidden // self.heads
        shapes = {"q_proj": (self.hidden, self.heads * hd), "k_proj": (self.hidden, self.kv_heads * hd),
                  "v_proj": (self.hidden, self.kv_heads * hd), "o_proj": (self.heads * hd, self.hidden),
                  "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                  "down_proj": (self.intermediate, self.hidden)}
        return [(t, *shapes[t]) for t in self.targets]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["scaling"] = self.scaling
        d["tokens_per_step"] = self.batch * self.seq
        d["n_lora_linears"] = self.n_lora_linears
        return d


@dataclasses.dataclass
class Setup:
    """The three models of one configuration and their inputs."""

    workload: Workload
    dropout: float
    device: torch.device
    base: nn.Module          # the frozen model without any adapter (eager lower bound)
    peft: nn.Module          # HF PEFT LoRA model (PeftModelForCausalLM)
    ptune: nn.Module         # the same model with ptune-rt's fused LoRA layers
    input_ids: torch.Tensor  # [batch, seq]
    prompt_ids: torch.Tensor  # [gen_batch, gen_prompt]

    @property
    def models(self) -> dict[str, nn.Module]:
        return {"base": self.base, "peft": self.peft, "ptune-rt": self.ptune}

    def ptune_backends(self) -> dict[str, int]:
        import ptune_rt

        counts: dict[str, int] = {}
        for row in ptune_rt.report(self.ptune):
            counts[row["backend"]] = counts.get(row["backend"], 0) + 1
        return counts


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_base(workload: Workload, device="cpu") -> nn.Module:
    """The Llama-like model with random weights, frozen, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(workload.seed)
    cfg = workload.llama_config()
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=workload.torch_dtype)
    model.requires_grad_(False)
    model.eval()
    # greedy decoding of a fixed number of tokens: no early stop on a random EOS
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _random_adapter(workload: Workload, shapes: dict[str, tuple[int, int]], device) -> dict:
    """Non-zero A and B for every target module, from a fixed seed."""
    g = torch.Generator().manual_seed(workload.seed + 1)
    out = {}
    for name, (k, n) in shapes.items():
        bound = 1.0 / math.sqrt(k)  # PEFT's default Kaiming-uniform(a=sqrt(5)) bound for A
        a = (torch.rand(workload.r, k, generator=g) * 2 - 1) * bound
        b = torch.randn(n, workload.r, generator=g) * workload.lora_b_std
        out[name] = (a.to(device), b.to(device))
    return out


def build(workload: Workload, dropout: float = 0.0, device=None, base: Optional[nn.Module] = None,
          backend: str = "auto") -> Setup:
    """Build the base, PEFT and ptune-rt models with identical weights, plus the inputs.

    ``base`` may be passed to reuse an already built frozen model (it is deep-copied, never
    modified). ``backend`` is ptune-rt's backend choice ("auto": Triton on CUDA, torch elsewhere).
    """
    import ptune_rt
    from peft import LoraConfig, get_peft_model

    device = torch.device(device or default_device())
    if base is None:
        base = build_base(workload, device)
    targets = list(workload.targets)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=workload.r, lora_alpha=workload.alpha, lora_dropout=dropout, target_modules=targets, bias="none"))
    ptune_model = ptune_rt.apply(copy.deepcopy(base), ptune_rt.LoRAConfig(
        r=workload.r, alpha=workload.alpha, dropout=dropout, target_modules=targets, backend=backend))

    ptune_layers = lora_layers(ptune_model)
    peft_inner = peft_model.get_base_model()
    shapes = {n: (m.in_features, m.out_features) for n, m in ptune_layers.items()}
    weights = _random_adapter(workload, shapes, device)
    with torch.no_grad():
        for name, m in ptune_layers.items():
            a, b = weights[name]
            pm = peft_inner.get_submodule(name)
            for mod in (m, pm):
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
    check_same_adapters(peft_model, ptune_model)

    g = torch.Generator().manual_seed(workload.seed + 2)
    input_ids = torch.randint(0, workload.vocab, (workload.batch, workload.seq), generator=g).to(device)
    prompt_ids = torch.randint(0, workload.vocab, (workload.gen_batch, workload.gen_prompt), generator=g).to(device)
    return Setup(workload, dropout, device, base, peft_model, ptune_model, input_ids, prompt_ids)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """ptune-rt's LoRA modules of ``model`` by name."""
    from ptune_rt.methods.lora import LoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_module(m: nn.Module) -> bool:
    """True for a LoRA-carrying linear of either implementation (PEFT's or ptune-rt's)."""
    from ptune_rt.methods.lora import LoRALinear

    if isinstance(m, LoRALinear):
        return True
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # pragma: no cover - peft is a bench dependency
        return False
    return isinstance(m, LoraLayer)


def check_same_adapters(peft_model: nn.Module, ptune_model: nn.Module) -> None:
    """Raise unless both models hold the same frozen weights and the same trainable adapters."""
    ours = dict(ptune_model.named_parameters())
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters()}
    if set(ours) != set(theirs):
        raise RuntimeError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))[:6]}")
    for n, p in ours.items():
        q = theirs[n]
        if p.requires_grad != q.requires_grad or not torch.equal(p, q):
            raise RuntimeError(f"parameter {n} differs between the PEFT and the ptune-rt model")


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def train_step(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Forward + causal-LM loss + backward (gradients land in the adapters' .grad)."""
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return out.loss.detach()


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def generate(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens."""
    with torch.no_grad():
        return model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
