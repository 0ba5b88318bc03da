"""Several LoRA adapters on one base model, unmerged: ``load_adapter(..., adapter_name=...)`` adds one,
``set_adapter`` switches, each adapter gives PEFT's logits for the same checkpoint, and a refused
add or switch leaves the model exactly as it was."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import ptune_rt
from ptune_rt import load_adapter, save_adapter, set_adapter
from ptune_rt.io import AdapterError
from ptune_rt.testing.tolerances import assert_close_to_reference

from helpers_models import assert_unchanged, input_ids, randomize_lora_b, snapshot, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
#: (r, alpha, targets, seed) of the two adapters: other ranks and scalings on the same modules
ADAPTERS = {"default": (4, 8, ["q_proj", "v_proj", "down_proj"], 1), "b": (2, 6, ["q_proj", "v_proj", "down_proj"], 5)}


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids() if x is None else x).logits


def peft_saved(base, path, r, alpha, targets, seed, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    randomize_lora_b(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A base, two PEFT LoRA checkpoints of it (paths) and the PEFT models that saved them."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("two")
    saved = {name: (root / name, peft_saved(base, root / name, *spec)) for name, spec in ADAPTERS.items()}
    return base, saved


def peft_two(two):
    """PEFT's own multi-adapter model: the "default" checkpoint, then "b" added with load_adapter."""
    base, saved = two
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(saved["default"][0]))
    pm.load_adapter(str(saved["b"][0]), adapter_name="b")
    return pm.eval()


def loaded(two):
    base, saved = two
    model = load_adapter(copy.deepcopy(base), saved["default"][0])
    load_adapter(model, saved["b"][0], adapter_name="b")
    return model


def test_each_adapter_gives_peft_logits_and_switching_is_exact(two):
    base, saved = two
    model = loaded(two)
    want = {name: logits(pm) for name, (_, pm) in saved.items()}
    assert not torch.allclose(want["default"], want["b"], **TOL)  # the two adapters differ
    first = logits(model)  # the added adapter is inactive: the model still runs "default"
    torch.testing.assert_close(first, want["default"], **TOL)
    assert set_adapter(model, "b") is model
    torch.testing.assert_close(logits(model), want["b"], **TOL)
    set_adapter(model, "default")
    assert torch.equal(logits(model), first)
    # every module holds both, with each checkpoint's rank and scaling
    mods = [m for m in model.modules() if isinstance(m, ptune_rt.LoRALinear)]
    assert len(mods) == 6 and all(set(m.lora_A) == {"default", "b"} for m in mods)
    assert all(m.r == {"default": 4, "b": 2} and m.scaling == {"default": 2.0, "b": 3.0} for m in mods)


def test_peft_multi_adapter_model_agrees(two):
    """PEFT's own multi-adapter model (load_adapter + set_adapter) against ptune-rt's, adapter by adapter."""
    base, saved = two
    pm = peft_two(two)
    model = loaded(two)
    for name in ("b", "default"):
        pm.set_adapter(name)
        set_adapter(model, name)
        torch.testing.assert_close(logits(model), logits(pm), **TOL)


def test_set_adapter_trains_the_active_adapter_only(two):
    model = loaded(two)
    set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.b." in n or ".lora_B.b." in n for n in trainable)
    model.train()
    out = model(input_ids(), labels=input_ids())
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_save_an_added_adapter_and_load_it_in_peft(two, tmp_path):
    base, saved = two
    model = loaded(two)
    save_adapter(model, tmp_path / "b", adapter_name="b")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b"))
    torch.testing.assert_close(logits(back), logits(saved["b"][1]), **TOL)


def test_generate_with_each_adapter(two):
    base, saved = two
    model = loaded(two)
    prompt = input_ids(batch=1, seq=6)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    for name in ("b", "default"):
        set_adapter(model, name)
        with torch.no_grad():
            ours = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)
            theirs = saved[name][1].generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)
        assert torch.equal(ours, theirs), name


def test_refused_adds_leave_the_model_unchanged(two, tmp_path):
    base, saved = two
    model = load_adapter(copy.deepcopy(base), saved["default"][0])
    other = peft_saved(base, tmp_path / "other", 2, 4, ["q_proj", "k_proj"], 7)
    biased = peft_saved(base, tmp_path / "biased", 2, 4, ADAPTERS["b"][2], 8, bias="all")
    del other, biased
    # a corrupt weight: every check passes but the last tensor's shape
    from safetensors.torch import load_file, save_file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((saved["b"][0] / "adapter_config.json").read_text())
    t = load_file(str(saved["b"][0] / "adapter_model.safetensors"))
    k = sorted(t)[-1]
    t[k] = t[k][:, :1].contiguous()
    save_file(t, str(tmp_path / "bad" / "adapter_model.safetensors"))
    for path, match in ((tmp_path / "other", "not in the adapter|has no LoRA adapter"),
                        (tmp_path / "biased", "bias='all'.*must have bias='none'"),
                        (tmp_path / "bad", "shape mismatch")):
        snap = snapshot(model)
        with pytest.raises(AdapterError, match=match):
            load_adapter(model, path, adapter_name="x")
        assert_unchanged(model, snap)
    # an add that fails while copying (after the adapter slots exist) takes them out again
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        with _failing_copy():
            load_adapter(model, saved["b"][0], adapter_name="x")
    assert_unchanged(model, snap)


class _failing_copy:
    """Makes the load's in-place copy into a fresh adapter weight fail once."""

    def __enter__(self):
        self.orig = torch.Tensor.copy_

        def copy_(t, src, *a, **k):
            if t.shape == src.shape and t.dim() == 2 and t.abs().sum() == 0 and src.abs().sum() > 0:
                torch.Tensor.copy_ = self.orig
                raise RuntimeError("injected")
            return self.orig(t, src, *a, **k)
        torch.Tensor.copy_ = copy_
        return self

    def __exit__(self, *exc):
        torch.Tensor.copy_ = self.orig
        return False


def test_set_adapter_refusals(two):
    model = loaded(two)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_name='c' is not an adapter.*\['b', 'default'\]"):
        set_adapter(model, "c")
    with pytest.raises(TypeError, match="adapter_name must be a str"):
        set_adapter(model, ["b"])
    ptune_rt.merge(model)
    with pytest.raises(ValueError, match="merged into their base weight.*unmerge"):
        set_adapter(model, "b")
    ptune_rt.unmerge(model)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="no ptune-rt LoRA modules"):
        set_adapter(tiny_llama(), "b")


def test_added_adapter_may_not_replace_shared_heads_or_join_a_peft_model(two, tmp_path):
    from transformers import LlamaForSequenceClassification

    base, saved = two
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cls_base = LlamaForSequenceClassification(cfg).eval()
    first = peft_saved(cls_base, tmp_path / "cls-a", 2, 4, ["q_proj", "v_proj"], 3, task_type="SEQ_CLS")
    peft_saved(cls_base, tmp_path / "cls-b", 2, 4, ["q_proj", "v_proj"], 4, task_type="SEQ_CLS")
    del first
    model = load_adapter(copy.deepcopy(cls_base), tmp_path / "cls-a")
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=r"modules_to_save=.*score.*cannot replace them"):
        load_adapter(model, tmp_path / "cls-b", adapter_name="b")
    assert_unchanged(model, snap)

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(saved["default"][0]))
    ptune_rt.accelerate(pm)
    with pytest.raises(AdapterError, match="come from a PEFT model"):
        load_adapter(pm, saved["b"][0], adapter_name="b")


# ---------------------------------------------------------------------------------------------- mixed batches

ROWS = ["b", "default", "__base__", "b"]


def test_mixed_batch_matches_peft_adapter_names(two):
    """Each row of a mixed batch gets its own adapter, as PEFT's ``adapter_names=`` forward argument."""
    base, saved = two
    pm = peft_two(two)
    model = loaded(two)
    x = input_ids(batch=len(ROWS), seq=7)
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=ROWS).logits
    with ptune_rt.mixed_adapters(model, ROWS):
        got = logits(model, x)
    torch.testing.assert_close(got, want, **TOL)
    # and row by row: each row as its own single-adapter batch
    for i, name in enumerate(ROWS):
        if name == "__base__":
            alone = logits(base, x[i:i + 1])
        else:
            set_adapter(model, name)
            alone = logits(model, x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], alone, **TOL)
    set_adapter(model, "default")
    # the block is left cleanly: the model runs its active adapter again
    torch.testing.assert_close(logits(model, x), logits(saved["default"][1], x), **TOL)


def test_mixed_batch_generate_matches_peft(two):
    base, saved = two
    pm = peft_two(two)
    model = loaded(two)
    x = input_ids(batch=len(ROWS), seq=6, seed=4)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = pm.generate(input_ids=x, adapter_names=ROWS, **kw)
    with ptune_rt.mixed_adapters(model, [None if n == "__base__" else n for n in ROWS]), torch.no_grad():
        got = model.generate(input_ids=x, **kw)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got[:3, x.shape[1]:].tolist()}) == 3  # the adapters really differ


def test_mixed_batch_refusals(two):
    model = loaded(two)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'c' is not an adapter.*\['b', 'default'\]"):
        ptune_rt.mixed_adapters(model, ["b", "c"])
    with pytest.raises(TypeError, match="sequence of adapter names"):
        ptune_rt.mixed_adapters(model, "b")
    with pytest.raises(ValueError, match="is empty"):
        ptune_rt.mixed_adapters(model, [])
    with ptune_rt.mixed_adapters(model, ["b", "default"]):
        with pytest.raises(ValueError, match="2 adapter names, one per row.*batch of 3 rows"), torch.no_grad():
            model(input_ids(batch=3))
        with pytest.raises(RuntimeError, match="inference only"):
            model(input_ids(batch=2))
        with pytest.raises(RuntimeError, match="do not nest"):
            ptune_rt.mixed_adapters(model, ["b", "b"])
    lora_mods = [m for m in model.modules() if isinstance(m, ptune_rt.LoRALinear)]
    lora_mods[0].disabled = True
    with pytest.raises(ValueError, match="adapters disabled"):
        ptune_rt.mixed_adapters(model, ["b", "default"])
    lora_mods[0].disabled = False
    ptune_rt.merge(model)
    with pytest.raises(ValueError, match="merged into their base weight"):
        ptune_rt.mixed_adapters(model, ["b", "default"])
    ptune_rt.unmerge(model)
    assert_unchanged(model, snap)
    assert all(m._rows is None for m in model.modules() if isinstance(m, ptune_rt.LoRALinear))


def test_mixed_decode_step_stacks_adapters_exactly(two):
    """A one-token step takes the stacked path (every used adapter's shrink for every row, other
    adapters' columns zeroed); its logits equal PEFT's adapter_names forward on the same tokens."""
    base, saved = two
    pm = peft_two(two)
    model = loaded(two)
    x = input_ids(batch=len(ROWS), seq=1, seed=9)
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=ROWS).logits
    with ptune_rt.mixed_adapters(model, ROWS):
        got = logits(model, x)
        stacks = [m._rows_stack for m in model.modules() if isinstance(m, ptune_rt.LoRALinear)]
    assert all(st is not None and st[0].shape[0] == 2 + 4 for st in stacks)  # ranks of "b" and "default"
    torch.testing.assert_close(got, want, **TOL)
    assert all(m._rows_stack is None for m in model.modules() if isinstance(m, ptune_rt.LoRALinear))


@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
def test_mixed_batch_on_the_triton_kernels(two, seq, monkeypatch):
    """The Triton backend (interpreted on CPU) runs a mixed batch through the shrink and fused
    kernels, one launch each per LoRA linear, and matches the torch path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    from ptune_rt.kernels import lora as K

    base, saved = two
    torch_model = loaded(two)
    tri = load_adapter(copy.deepcopy(base), saved["default"][0], backend="triton")
    load_adapter(tri, saved["b"][0], adapter_name="b")
    assert {m.backend_choice()[0] for m in tri.modules() if isinstance(m, ptune_rt.LoRALinear)} == {"triton"}
    x = input_ids(batch=len(ROWS), seq=seq, seed=11)
    calls = []
    for name in ("skinny_matmul", "fused_lowrank_matmul"):
        orig = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    with ptune_rt.mixed_adapters(tri, ROWS):
        got = logits(tri, x)
    with ptune_rt.mixed_adapters(torch_model, ROWS):
        want = logits(torch_model, x)
    assert calls.count("skinny_matmul") == calls.count("fused_lowrank_matmul") == 6  # one each per LoRA linear
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_batch_on_the_triton_kernels_half(two, dtype, seq):
    """A half-precision base with PEFT's fp32 adapters on top: the Triton backend's mixed batch
    (stacked shrink kernel, low-rank term in the fused kernel's accumulator) against the torch
    path's mixed batch in the same dtype, both judged against the float64 model by the tolerance
    rule (DESIGN section 4)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    base, saved = two

    def mixed_logits(dt, backend):
        model = load_adapter(copy.deepcopy(base).to(dt), saved["default"][0], backend=backend)
        load_adapter(model, saved["b"][0], adapter_name="b")
        mods = [m for m in model.modules() if isinstance(m, ptune_rt.LoRALinear)]
        assert {m.backend_choice()[0] for m in mods} == {backend}
        assert {m.lora_A["b"].weight.dtype for m in mods} == {torch.float64 if dt == torch.float64 else torch.float32}
        with ptune_rt.mixed_adapters(model, ROWS):
            return logits(model, x)

    x = input_ids(batch=len(ROWS), seq=seq, seed=11)
    got = mixed_logits(dtype, "triton")
    assert got.dtype == dtype
    assert_close_to_reference(got, mixed_logits(dtype, "torch"), mixed_logits(torch.float64, "torch"), dtype,
                              "mixed-batch logits")


def test_mixed_blocks_made_before_another_is_entered_do_not_nest(two):
    model = loaded(two)
    outer, inner = ptune_rt.mixed_adapters(model, ["b", "default"]), ptune_rt.mixed_adapters(model, ["b", "b"])
    with outer:
        with pytest.raises(RuntimeError, match="do not nest"):
            with inner:
                pass
        assert all(m._rows is outer.rows for m in model.modules() if isinstance(m, ptune_rt.LoRALinear))
