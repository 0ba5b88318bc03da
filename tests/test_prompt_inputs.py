"""The soft-prompt input builder: Triton kernel (interpreter) and op (both backends) vs the reference."""
import pytest
import torch

from ptune_rt.kernels.prompt_inputs import build_inputs_embeds as kernel
from ptune_rt.ops.prompt_inputs import build_inputs_embeds
from ptune_rt.reference.prompt_inputs import build_inputs_embeds_reference
from ptune_rt.testing import assert_close_to_reference


def make_src(B, L, V, P, seed=0, template=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    virt = -(torch.arange(P) + 1)
    if template:  # "[P*2] {input} [P*rest]": virtual tokens on both sides of the input
        return torch.cat([virt[:2].expand(B, -1), ids, virt[2:].expand(B, -1)], dim=1)
    return torch.cat([virt.expand(B, -1), ids], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tasks", [False, True])
@pytest.mark.parametrize("template", [False, True])
def test_kernel_matches_reference_exactly(dtype, tasks, template):
    B, L, V, H, P, T = 5, 21, 50, 72, 6, 3
    src = make_src(B, L, V, P, template=template)
    emb = torch.randn(V, H).to(dtype)
    prompts = torch.randn(T, P, H) if tasks else torch.randn(P, H)
    task_ids = torch.tensor([2, 0, 1, 2, 0], dtype=torch.int32) if tasks else None
    out = kernel(src, emb, prompts.to(dtype), task_ids)
    ref = build_inputs_embeds_reference(src, emb, prompts.to(dtype), task_ids)
    assert torch.equal(out, ref)  # a gather: bit-exact


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_gradients_go_to_each_task(backend):
    B, L, V, H, P, T = 4, 9, 30, 16, 3, 2
    src = make_src(B, L, V, P)
    emb = torch.randn(V, H)
    prompts = torch.randn(T, P, H, requires_grad=True)
    task_ids = torch.tensor([1, 0, 1, 1])
    out = build_inputs_embeds(src, emb, prompts, task_ids, backend=backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    p2 = prompts.detach().clone().requires_grad_()
    build_inputs_embeds_reference(src, emb, p2, task_ids).backward(dout)
    torch.testing.assert_close(out, build_inputs_embeds_reference(src, emb, prompts.detach(), task_ids))
    torch.testing.assert_close(prompts.grad, p2.grad)
    # task 0 is used by row 1 only: its gradient is exactly that row's prompt-position gradient
    torch.testing.assert_close(prompts.grad[0], dout[1, :P])


def test_op_rejects_bad_input():
    src = make_src(2, 5, 10, 3)
    emb, prompts = torch.randn(10, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="task_ids must be in"):
        build_inputs_embeds(src, emb, prompts, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="virtual tokens in"):
        build_inputs_embeds(src - 5, emb, prompts, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="together with"):
        build_inputs_embeds(src, emb, prompts)
    with pytest.raises(ValueError, match="hidden=8"):
        build_inputs_embeds(src, emb, prompts[..., :4], torch.tensor([0, 1]))


def test_kernel_reads_strided_task_ids():
    """task_ids as a stride-2 view (int32 and int64): the kernel uses its stride."""
    B, L, V, H, P, T = 5, 7, 30, 24, 4, 3
    src = make_src(B, L, V, P)
    emb, prompts = torch.randn(V, H), torch.randn(T, P, H)
    task_ids = torch.tensor([2, 0, 1, 2, 1])
    for dtype in (torch.int32, torch.int64):
        strided = torch.stack([task_ids, torch.zeros_like(task_ids)], 1).reshape(-1).to(dtype)[::2]
        assert strided.stride(0) == 2
        out = kernel(src, emb, prompts, strided)
        assert torch.equal(out, build_inputs_embeds_reference(src, emb, prompts, task_ids))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_task_ids_of_any_integer_dtype_and_deterministic_gradients(backend, monkeypatch):
    """int32 / int64 / int16 / uint8 task ids (contiguous or strided) give one result, and the
    gradients of the prompts and the embedding table are bit-identical run to run without
    index_add_ / index_put_ (not deterministic on CUDA)."""
    def refuse(*args, **kwargs):
        raise AssertionError("index_add_ / index_put_ accumulation is not deterministic on CUDA")

    B, L, V, H, P, T = 4, 9, 30, 16, 3, 3
    src = make_src(B, L, V, P, template=True)
    src[0, 5] = src[1, 5] = src[2, 6] = 7  # token 7 repeats: its embedding gradient is a sum
    emb0, prompts0 = torch.randn(V, H), torch.randn(T, P, H)
    task_ids = torch.tensor([1, 0, 1, 1])
    dout = torch.randn(B, L + P, H)
    runs = []
    for dtype in (torch.int32, torch.int64, torch.int16, torch.uint8):
        for tids in (task_ids.to(dtype), torch.stack([task_ids, task_ids], 1).reshape(-1).to(dtype)[::2]):
            emb, prompts = emb0.clone().requires_grad_(), prompts0.clone().requires_grad_()
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "index_add_", refuse)
                m.setattr(torch.Tensor, "index_put_", refuse)
                out = build_inputs_embeds(src, emb, prompts, tids, backend=backend)
                out.backward(dout)
            runs.append((out, emb.grad, prompts.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    assert torch.equal(runs[0][0], build_inputs_embeds_reference(src, emb0, prompts0, task_ids))
    grads = {}
    for tag, cast in (("ref", lambda t: t), ("gold", torch.Tensor.double)):  # eager fp32 and float64
        emb, prompts = (cast(t).detach().clone().requires_grad_() for t in (emb0, prompts0))
        build_inputs_embeds_reference(src, emb, prompts, task_ids).backward(cast(dout))
        grads[tag] = (emb.grad, prompts.grad)
    for name, got, ref, gold in zip(("d_embedding", "d_prompts"), runs[0][1:], grads["ref"], grads["gold"]):
        assert_close_to_reference(got, ref, gold, torch.float32, f"op[{backend}]:{name}")
    assert torch.count_nonzero(runs[0][2][2]) == 0  # task 2 is unused
    with pytest.raises(ValueError, match="integer tensor"):
        build_inputs_embeds(src, emb0, prompts0, task_ids.float(), backend=backend)
