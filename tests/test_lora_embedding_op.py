"""The LoRA embedding op on both backends (Triton under the interpreter) against PEFT's LoRA Embedding:
the eager reference in the same dtype and in float64, PEFT's own layer, and the ops it may run."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ptune_rt.kernels import lora_embedding as K
from ptune_rt.ops.lora_embedding import lora_embedding
from ptune_rt.reference import lora_embedding_reference
from ptune_rt.testing.tolerances import assert_close_to_reference, assert_fp32_end_to_end_close

# D is not a multiple of the interpreter's column tile and r is below BLOCK_R, so both masks are
# exercised; V differs from every other size, so a one-hot product would show in operand shapes.
V, D, R, SCALE = 37, 48, 4, 0.75
SHAPE = (3, 13)  # 39 tokens over 37 ids, and id 5 four times more: the dA scatter sums repeats
REPEATED_ID = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]


def make_inputs(dtype, r=R, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    ids.view(-1)[:4] = REPEATED_ID
    weight = torch.randn(V, D, generator=g).to(dtype)
    lora_a = torch.randn(r, V, generator=g)  # fp32 adapters beside any table dtype, PEFT's default
    lora_b = torch.randn(D, r, generator=g)
    dy = torch.randn(*shape, D, generator=g).to(dtype)
    return ids, weight, lora_a, lora_b, dy


def run(fn, ids, weight, lora_a, lora_b, dy, cast=None, **options):
    """fn's output and its gradients for weight, lora_a, lora_b (all leaves requiring grad)."""
    leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (weight, lora_a, lora_b)]
    out = fn(ids, *leaves, SCALE, **options)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), grads


def check_against_reference(backend, dtype, ids, weight, lora_a, lora_b, dy, **options):
    out, (dw, da, db) = run(lora_embedding, ids, weight, lora_a, lora_b, dy, backend=backend, **options)
    ref, (rdw, rda, rdb) = run(lora_embedding_reference, ids, weight, lora_a, lora_b, dy, **options)
    gold, (gdw, gda, gdb) = run(lora_embedding_reference, ids, weight, lora_a, lora_b, dy, cast=torch.float64,
                                **options)
    assert out.dtype == dtype and out.shape == (*ids.shape, weight.shape[1])
    assert (da.dtype, db.dtype, dw.dtype) == (torch.float32, torch.float32, dtype)
    assert_close_to_reference(out, ref, gold, dtype, "out")
    assert_close_to_reference(dw, rdw, gdw, dtype, "d weight")
    assert_close_to_reference(da, rda, gda, torch.float32, "d lora_a")
    assert_close_to_reference(db, rdb, gdb, torch.float32, "d lora_b")
    return dw, da, db


@pytest.mark.parametrize("padding_idx", [None, REPEATED_ID], ids=["no_padding", "padding"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, padding_idx):
    ids, weight, lora_a, lora_b, dy = make_inputs(dtype)
    dw, da, db = check_against_reference(backend, dtype, ids, weight, lora_a, lora_b, dy, padding_idx=padding_idx)
    if padding_idx is not None:  # F.embedding's gradient skips the padding row: so do A's column and E's row
        assert not da[:, padding_idx].any() and not dw[padding_idx].any()
    else:
        assert da[:, REPEATED_ID].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_padding_idx_and_scale_grad_by_freq(backend):
    ids, weight, lora_a, lora_b, dy = make_inputs(torch.float16, seed=1)
    ids.view(-1)[-3:] = V - 1
    _, da, _ = check_against_reference(backend, torch.float16, ids, weight, lora_a, lora_b, dy, padding_idx=-1,
                                       scale_grad_by_freq=True)
    assert not da[:, V - 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_walks_columns_and_rank_in_chunks(monkeypatch, dtype):
    """One column chunk per token tile (several column tiles per program) and a rank above the
    largest BLOCK_R (the rank walked in chunks inside the column loop)."""
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 1)
    ids, weight, lora_a, lora_b, dy = make_inputs(dtype, r=K.BLOCK_RS[-1] + 5, shape=(2, 9))
    assert K.column_split(ids.numel(), D, 16, 32) == (1, 64)
    check_against_reference("triton", dtype, ids, weight, lora_a, lora_b, dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_int32_ids(backend):
    ids, weight, lora_a, lora_b, dy = make_inputs(torch.float32, seed=2)
    ids = ids.to(torch.int32).t()  # a non-contiguous view
    weight = weight.t().contiguous().t()  # [V, D] with strides (1, V)
    lora_a = lora_a.t().contiguous().t()  # [r, V] with strides (1, r)
    dy = dy.transpose(0, 1)
    check_against_reference(backend, torch.float32, ids, weight, lora_a, lora_b, dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_output_gradient(backend):
    """A gradient with zero strides (what ``out.sum().backward()`` sends) is read in place."""
    ids, weight, lora_a, lora_b, dy = make_inputs(torch.bfloat16, seed=4)
    check_against_reference(backend, torch.bfloat16, ids, weight, lora_a, lora_b, dy[:1, :1].expand_as(dy))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    ids, weight, lora_a, lora_b, dy = make_inputs(torch.float16, shape=(2, 0))
    out, (dw, da, db) = run(lora_embedding, ids, weight, lora_a, lora_b, dy, backend=backend)
    assert out.shape == (2, 0, D) and not da.any() and not db.any() and not dw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_peft_embedding_layer(backend):
    """PEFT's own LoRA Embedding (padding_idx on the base layer) in fp32: same output and gradients."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Embedding

    ids, _, lora_a, lora_b, dy = make_inputs(torch.float32, seed=3)
    base = nn.Embedding(V, D, padding_idx=REPEATED_ID)
    layer = Embedding(base, "default", LoraConfig(r=R, lora_alpha=8), r=R, lora_alpha=8)
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(lora_a)
        layer.lora_embedding_B["default"].copy_(lora_b)
    peft_out = layer(ids)
    peft_grads = torch.autograd.grad(peft_out, [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]],
                                     dy)
    lora_a, lora_b = (t.detach().clone().requires_grad_() for t in (lora_a, lora_b))
    out = lora_embedding(ids, base.weight.detach(), lora_a, lora_b, layer.scaling["default"],
                         padding_idx=base.padding_idx, backend=backend)
    grads = torch.autograd.grad(out, [lora_a, lora_b], dy)
    assert_fp32_end_to_end_close(out, peft_out, "out")
    for name, got, want in zip(("d lora_a", "d lora_b"), grads, peft_grads):
        assert_fp32_end_to_end_close(got, want, name)


class MatmulLog(TorchDispatchMode):
    """Records the operand shapes of every matmul-family aten op, and whether one_hot runs."""

    MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
               torch.ops.aten.baddbmm, torch.ops.aten.matmul}

    def __init__(self):
        super().__init__()
        self.matmuls, self.one_hot = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in self.MATMULS:
            self.matmuls.append((packet.__name__, *[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        self.one_hot |= packet is torch.ops.aten.one_hot
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_one_hot_matmul(backend):
    """The forward is a gather plus a low-rank gather: the torch path runs exactly one matmul, the
    [M, r] x [r, D] product, the Triton path none; no product anywhere has a vocabulary-sized operand."""
    ids, weight, lora_a, lora_b, dy = make_inputs(torch.float16)
    M = ids.numel()
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    with MatmulLog() as forward:
        out = lora_embedding(ids, weight, lora_a, lora_b, SCALE, backend=backend)
    with MatmulLog() as backward:
        out.backward(dy)
    assert not forward.one_hot and not backward.one_hot
    assert forward.matmuls == ([] if backend == "triton" else [("addmm_", (M, D), (M, R), (R, D))])
    assert backward.matmuls if backend == "torch" else not backward.matmuls
    for name, *shapes in forward.matmuls + backward.matmuls:
        assert all(V not in shape for shape in shapes), (name, shapes)


def test_errors_name_the_argument():
    ids, weight, lora_a, lora_b, _ = make_inputs(torch.float32)
    cases = [
        (dict(ids=ids.float()), TypeError, "ids must be an int32 or int64"),
        (dict(ids=ids.to(torch.int16)), TypeError, "ids must be an int32 or int64"),
        (dict(ids=torch.tensor([0, V])), ValueError, r"ids must be in \[0, num_embeddings=37\)"),
        (dict(ids=torch.tensor([-1, 0])), ValueError, r"ids must be in \[0, num_embeddings=37\)"),
        (dict(weight=weight[0]), ValueError, "weight must be a floating"),
        (dict(lora_a=lora_a.t()), ValueError, r"lora_a must be \[r, num_embeddings=37\]"),
        (dict(lora_b=lora_b.t()), ValueError, r"lora_b must be \[embedding_dim=48, r=4\]"),
        (dict(lora_b=lora_b.half()), TypeError, "lora_a and lora_b must share one floating dtype"),
        (dict(lora_b=lora_b.to("meta")), ValueError, "lora_b is on meta"),
        (dict(scale=torch.tensor(1.0)), TypeError, "scale must be a Python number"),
        (dict(padding_idx=V), ValueError, r"padding_idx must be an int in \[-37, 37\)"),
        (dict(max_norm=1.0), NotImplementedError, "max_norm"),
        (dict(sparse=True), NotImplementedError, "sparse"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(weight=weight.double(), backend="triton"), TypeError, "the Triton backend takes weight"),
    ]
    base = dict(ids=ids, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=SCALE)
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            lora_embedding(**{**base, **change})
