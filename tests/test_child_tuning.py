"""Child-tuning: the fused masked AdamW kernel against its eager reference (the tolerance rule, the
same Philox mask from the same seed), mode F's keep rate, mode D's untouched entries and 1-bit mask,
the Fisher top-p choice, the optimizer wrapper around torch optimizers and in HF Trainer, config
errors, and the registry's apply / restore / checkpoint round trip."""
import math
import os

import pytest
import torch

import ptune_rt
from ptune_rt.kernels._triton_utils import KernelConfig
from ptune_rt.kernels.child_adamw import child_adamw_step, child_keep_mask
from ptune_rt.methods.child_tuning import (ChildMask, ChildTuningAdamW, ChildTuningConfig, ChildTuningOptimizer,
                                           child_mask_from_data, estimate_fisher, fisher_mask, pack_bits, unpack_bits)
from ptune_rt.reference.child_tuning import child_adamw_reference, keep_mask, step_seed
from ptune_rt.testing.tolerances import assert_close_to_reference, assert_fp32_end_to_end_close

from helpers_models import VOCAB, tiny_gpt2

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def torch_path(monkeypatch):
    """CPU without Triton: ChildTuningAdamW and keep_mask take their torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def binomial_interval(n: int, p: float, z: float = 3.2905) -> tuple:
    """Where the keep rate of n Bernoulli(p) draws falls with 99.9% probability (normal approximation)."""
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def tiny_mlp(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))


def mlp_batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def train(model, opt, steps=3, seed=1):
    for batch in mlp_batches(steps, seed):
        opt.zero_grad()
        mlp_loss(model, batch).backward()
        opt.step()


# ----------------------------------------------------------------------------------------------
# the kernel against the eager reference
# ----------------------------------------------------------------------------------------------

def check_fused_step(dtype, mode, device="cpu"):
    """Three steps of the kernel (5 blocks of 1024, a ragged tail and a partial last mask byte) against
    the eager step in the same dtype and in float64, the same mask each step (F: the Philox mask the
    reference materializes from the same key and stream)."""
    n, stream, seed, p_keep = 5001, 7, 1234, 0.3
    g = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=g).to(device, dtype)
    grads = [torch.randn(n, generator=g).to(device, dtype) for _ in range(3)]
    child = (torch.rand(n, generator=g) < p_keep).to(device)
    runs = {name: [param.clone() if name != "gold" else param.double(), torch.zeros(n, dtype=work, device=device),
                   torch.zeros(n, dtype=work, device=device)]
            for name, work in (("out", torch.float32), ("ref", torch.float32), ("gold", torch.float64))}
    for step, grad in enumerate(grads, 1):
        key = step_seed(seed, step)
        keep = child if mode == "D" else keep_mask((n,), p_keep, key, stream, device)
        kw = dict(HYPER, step=step, mode=mode, reserve_p=p_keep)
        child_adamw_step(*runs["out"][:1], grad, *runs["out"][1:], **kw, seed=key, stream=stream,
                         child_bits=pack_bits(child), config=KernelConfig({"BLOCK": 1024}, 4, 1))
        child_adamw_reference(runs["ref"][0], grad, *runs["ref"][1:], **kw, keep=keep)
        child_adamw_reference(runs["gold"][0], grad.double(), *runs["gold"][1:], **kw, keep=keep)
    for i, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
        assert_close_to_reference(runs["out"][i], runs["ref"][i], runs["gold"][i],
                                  dtype if i == 0 else torch.float32, name)
    if mode == "D":  # outside the child: bit for bit as before
        assert torch.equal(runs["out"][0][~child], param[~child])
        assert not runs["out"][1][~child].any() and not runs["out"][2][~child].any()


@pytest.mark.parametrize("mode", [None, "F", "D"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_step_matches_eager_reference(dtype, mode):
    check_fused_step(dtype, mode)


@pytest.mark.gpu
def test_fused_step_matches_eager_reference_on_cuda():
    """The same check with the kernels compiled for CUDA (in a child process: this suite's conftest makes
    the kernels interpreted)."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    code = ("import test_child_tuning as T\n"
            "for dtype in T.DTYPES:\n"
            "    for mode in (None, 'F', 'D'):\n"
            "        T.check_fused_step(dtype, mode, 'cuda')\n"
            "print('fused step OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0 and "fused step OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_kernel_draws_the_mask_the_reference_materializes():
    """One step from zero moments with g = 1 and no decay: exp_avg is nonzero exactly where the kernel kept
    the gradient, which must be the mask child_keep_mask writes for the same key and stream."""
    n, p_keep, key = 4099, 0.25, step_seed(99, 1)
    for stream in (0, 3):
        param, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        child_adamw_step(param, torch.ones(n), m, v, **dict(HYPER, weight_decay=0.0), step=1, mode="F",
                         reserve_p=p_keep, seed=key, stream=stream)
        keep = child_keep_mask(n, p_keep, key, stream, "cpu")
        assert torch.equal(m != 0, keep)
        torch.testing.assert_close(m[keep], torch.full_like(m[keep], 0.1 / p_keep), rtol=1e-6, atol=0)
    assert not torch.equal(child_keep_mask(n, p_keep, key, 0, "cpu"), child_keep_mask(n, p_keep, key, 1, "cpu"))


@pytest.mark.parametrize("p_keep", [0.1, 0.5, 0.9])
def test_keep_rate_is_p_within_the_binomial_interval(p_keep):
    n = 100_000
    lo, hi = binomial_interval(n, p_keep)
    rate = child_keep_mask(n, p_keep, step_seed(3, 1), 0, "cpu").float().mean().item()
    assert lo <= rate <= hi, (rate, lo, hi)
    # the stream index gives every tensor its own mask: two streams agree as independent draws do
    agree = (child_keep_mask(n, p_keep, step_seed(3, 1), 1, "cpu")
             == child_keep_mask(n, p_keep, step_seed(3, 1), 2, "cpu")).float().mean().item()
    lo, hi = binomial_interval(n, p_keep ** 2 + (1 - p_keep) ** 2)
    assert lo <= agree <= hi, (agree, lo, hi)


def test_torch_path_mask_has_the_same_distribution(torch_path):
    n, p_keep = 100_000, 0.3
    lo, hi = binomial_interval(n, p_keep)
    keep = keep_mask((n,), p_keep, step_seed(3, 1), 0, "cpu")
    assert lo <= keep.float().mean().item() <= hi
    assert torch.equal(keep, keep_mask((n,), p_keep, step_seed(3, 1), 0, "cpu"))  # a function of (key, stream)


def test_kernel_refuses_cpu_tensors_without_the_interpreter(torch_path):
    t = torch.zeros(8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        child_adamw_step(t, t, t.clone(), t.clone(), step=1, **HYPER)


# ----------------------------------------------------------------------------------------------
# mode D: bits, Fisher, untouched entries
# ----------------------------------------------------------------------------------------------

def test_packed_bits_are_one_bit_per_parameter():
    for n in (1, 8, 13, 1001):
        mask = torch.rand(n) < 0.4
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.nbytes == math.ceil(n / 8)
        assert torch.equal(unpack_bits(bits, n), mask)
    model = tiny_mlp()
    mask = child_mask_from_data(model, mlp_batches(), 0.3, loss_fn=mlp_loss)
    for p in model.parameters():
        assert mask.bits[p].dtype == torch.uint8 and mask.bits[p].nbytes == math.ceil(p.numel() / 8)
    assert mask.nbytes == sum(math.ceil(p.numel() / 8) for p in model.parameters())


def test_fisher_is_the_sum_of_squared_gradients_and_the_mask_its_top_p():
    model = tiny_mlp()
    batches = mlp_batches(3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)  # a pending step's gradients survive the estimate
    fisher = estimate_fisher(model, batches, mlp_loss)
    assert all(torch.equal(p.grad, torch.full_like(p, 5.0)) for p in model.parameters())
    want = {p: torch.zeros_like(p) for p in model.parameters()}
    for batch in batches:
        grads = torch.autograd.grad(mlp_loss(model, batch), list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            want[p] += g.square()
    for p in model.parameters():
        torch.testing.assert_close(fisher[p], want[p], rtol=1e-6, atol=0)
    n = sum(p.numel() for p in model.parameters())
    mask = fisher_mask(fisher, 0.3)
    assert mask.total == n and mask.kept == round(0.3 * n)
    chosen = torch.cat([fisher[p][mask.keep(p)] for p in model.parameters()])
    others = torch.cat([fisher[p][~mask.keep(p)] for p in model.parameters()])
    assert chosen.min() >= others.max()  # one global ranking: the kept are the largest


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_d_mode_never_changes_entries_outside_the_mask(dtype, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_mlp().to(dtype)
    mask = child_mask_from_data(model, [(x.to(dtype), y) for x, y in mlp_batches()], 0.2, loss_fn=mlp_loss)
    before = {p: p.detach().clone() for p in model.parameters()}
    opt = ChildTuningAdamW(model.parameters(), ChildTuningConfig(mode="D", reserve_p=0.2), lr=1e-2,
                           weight_decay=0.1, mask=mask)
    for batch in mlp_batches(4, seed=5):
        opt.zero_grad()
        mlp_loss(model, (batch[0].to(dtype), batch[1])).backward()
        opt.step()
    changed = 0
    for p in model.parameters():
        keep = mask.keep(p)
        assert torch.equal(p.detach()[~keep], before[p][~keep]), "an entry outside the child changed"
        assert not opt.state[p]["exp_avg"][~keep].any() and not opt.state[p]["exp_avg_sq"][~keep].any()
        changed += int((p.detach()[keep] != before[p][keep]).sum())
    assert changed > 0.9 * mask.kept


# ----------------------------------------------------------------------------------------------
# the optimizers
# ----------------------------------------------------------------------------------------------

def test_wrapper_around_adamw_equals_the_fused_step():
    """Same seed, same F masks: the wrapper's masked gradient into torch's AdamW and the fused kernel."""
    a, b = tiny_mlp(), tiny_mlp()
    cfg = ChildTuningConfig(mode="F", reserve_p=0.4)
    train(a, ChildTuningOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1), cfg, seed=11))
    train(b, ChildTuningAdamW(b.parameters(), cfg, lr=1e-2, weight_decay=0.1, seed=11))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_fp32_end_to_end_close(pb.detach(), pa.detach(), "parameter after 3 steps")


def test_torch_path_equals_the_wrapper_around_adamw(torch_path):
    a, b = tiny_mlp(), tiny_mlp()
    cfg = ChildTuningConfig(mode="F", reserve_p=0.4)
    train(a, ChildTuningOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-2), cfg, seed=11))
    train(b, ChildTuningAdamW(b.parameters(), cfg, lr=1e-2, seed=11))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_wrapper_around_sgd_masks_and_scales_the_gradient():
    model = tiny_mlp()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = ChildTuningOptimizer(torch.optim.SGD(params, lr=0.1), ChildTuningConfig(mode="F", reserve_p=0.5), seed=4)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    key = step_seed(4, 1)
    for stream, (p, b, g) in enumerate(zip(params, before, grads)):
        keep = keep_mask(p.shape, 0.5, key, stream, "cpu")
        assert torch.equal(p.detach()[~keep], b[~keep])
        torch.testing.assert_close(p.detach()[keep], b[keep] - 0.1 * g[keep] / 0.5, rtol=1e-6, atol=1e-7)


def test_wrapper_d_mode_with_mask_re_estimation():
    model = tiny_mlp()
    calls = []

    def estimate():
        calls.append(1)
        return child_mask_from_data(model, mlp_batches(2, seed=len(calls)), 0.3, loss_fn=mlp_loss)

    before = {p: p.detach().clone() for p in model.parameters()}
    opt = ChildTuningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0),
                               ChildTuningConfig(mode="D", reserve_p=0.3, mask_every=2), mask_fn=estimate)
    first = {p: b.clone() for p, b in opt.selection.bits.items()}
    train(model, opt, steps=2)
    for p in model.parameters():  # a fixed mask, no weight decay: zero moments outside, nothing moves there
        keep = unpack_bits(first[p], p.numel()).reshape(p.shape)
        assert torch.equal(p.detach()[~keep], before[p][~keep])
    train(model, opt, steps=3)
    assert len(calls) == 3  # before step 1, before step 3, before step 5


class Tokens(torch.utils.data.Dataset):
    ids = torch.randint(3, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_run(out, optimizer_of, steps, save_steps, resume=None, scheduler_of=lambda opt: None):
    """A tiny GPT-2 with Child-tuning applied, trained by HF Trainer with ``optimizers=(opt, sched)``."""
    import warnings

    from transformers import Trainer, TrainingArguments

    model = ptune_rt.apply(tiny_gpt2(), ChildTuningConfig(mode="F", reserve_p=0.3))
    opt = optimizer_of(model)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=save_steps, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, scheduler_of(opt)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train(resume_from_checkpoint=resume)
    return model, opt, result


def test_trainer_runs_the_wrapper_with_a_scheduler(tmp_path):
    cfg = ChildTuningConfig(mode="F", reserve_p=0.3)
    before = {n: p.detach().clone() for n, p in tiny_gpt2().named_parameters()}
    model, opt, result = trainer_run(
        tmp_path, lambda m: ChildTuningOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), cfg, seed=0), 3, 3,
        scheduler_of=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10))
    assert math.isfinite(result.training_loss)
    assert opt.selection.steps == 3 and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.7)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()
    ptune_rt.restore(model)


def test_trainer_resumes_the_fused_optimizer_bit_exactly(tmp_path):
    """4 steps straight and 2 + 2 resumed from the step-2 checkpoint: the optimizer's state_dict carries the
    moments, the seed and the step count, so the resumed run draws the same masks and ends bit-identical."""
    def fused(model):
        return ChildTuningAdamW(model.parameters(), ChildTuningConfig(mode="F", reserve_p=0.3), lr=1e-3, seed=0)

    straight, opt, _ = trainer_run(tmp_path / "a", fused, 4, 2)
    resumed, opt2, _ = trainer_run(tmp_path / "b", fused, 4, 2, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert opt.selection.steps == opt2.selection.steps == 4
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_state_dict_round_trip_keeps_fp32_moments_and_the_stream_of_masks():
    def run(steps, resume_after=None):
        model = tiny_mlp().to(torch.float16)
        opt = ChildTuningAdamW(model.parameters(), ChildTuningConfig(mode="F", reserve_p=0.5), lr=1e-2, seed=3)
        for i, (x, y) in enumerate(mlp_batches(steps)):
            if i == resume_after:
                sd = opt.state_dict()
                opt = ChildTuningAdamW(model.parameters(), ChildTuningConfig(mode="F", reserve_p=0.5), lr=1e-2)
                opt.load_state_dict(sd)
                assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
            opt.zero_grad()
            mlp_loss(model, (x.half(), y)).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(3), run(3, resume_after=2)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="X"), r"ChildTuningConfig.mode must be one of \('F', 'D'\), got 'X'"),
    (dict(mode="f"), r"ChildTuningConfig.mode"),
    (dict(reserve_p=0.0), r"ChildTuningConfig.reserve_p must be a finite number in \(0.0, 1.0\], got 0.0"),
    (dict(reserve_p=1.5), r"ChildTuningConfig.reserve_p .* got 1.5"),
    (dict(reserve_p=float("nan")), r"ChildTuningConfig.reserve_p"),
    (dict(reserve_p="0.3"), r"ChildTuningConfig.reserve_p"),
    (dict(reserve_p=True), r"ChildTuningConfig.reserve_p"),
    (dict(mode="D", mask_every=0), r"ChildTuningConfig.mask_every must be None or an integer >= 1, got 0"),
    (dict(mode="D", mask_every=2.0), r"ChildTuningConfig.mask_every"),
    (dict(mode="F", mask_every=5), r"ChildTuningConfig.mask_every must be None for mode='F'"),
    (dict(target_modules=[""]), r"ChildTuningConfig.target_modules"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChildTuningConfig(**kwargs)


def test_optimizer_errors_come_before_any_change():
    model = tiny_mlp()
    params = list(model.parameters())
    d = ChildTuningConfig(mode="D", reserve_p=0.3)
    with pytest.raises(ValueError, match="mode 'D' needs its child"):
        ChildTuningAdamW(params, d)
    with pytest.raises(ValueError, match="mask_every=2 re-estimates the mask: pass mask_fn"):
        mask = child_mask_from_data(model, mlp_batches(), 0.3, loss_fn=mlp_loss)
        ChildTuningAdamW(params, ChildTuningConfig(mode="D", reserve_p=0.3, mask_every=2), mask=mask)
    with pytest.raises(ValueError, match="mask and mask_fn are for mode 'D'"):
        ChildTuningAdamW(params, ChildTuningConfig(mode="F"), mask=mask)
    with pytest.raises(ValueError, match="mask covers none of the optimizer's parameters"):
        ChildTuningAdamW(tiny_mlp(1).parameters(), d, mask=mask)
    with pytest.raises(ValueError, match=r"ChildTuningAdamW: lr must be a finite number >= 0.0, got -1"):
        ChildTuningAdamW(params, ChildTuningConfig(), lr=-1)
    with pytest.raises(ValueError, match=r"ChildTuningAdamW: betas\[1\] must be a finite number in \[0.0, 1.0\)"):
        ChildTuningAdamW(params, ChildTuningConfig(), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="config must be a ChildTuningConfig, got dict"):
        ChildTuningAdamW(params, {"mode": "F"})
    with pytest.raises(TypeError, match="base must be a torch.optim.Optimizer, got list"):
        ChildTuningOptimizer(params, ChildTuningConfig())
    with pytest.raises(ValueError, match=r"reserve_p must be a finite number in \(0.0, 1.0\]"):
        fisher_mask(estimate_fisher(model, mlp_batches(), mlp_loss), 0.0)
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_fisher(model, [], mlp_loss)
    with pytest.raises(TypeError, match="mask must be a ChildMask"):
        ChildTuningAdamW(params, d, mask={})
    # a bad gradient among good ones: refused before any parameter moves
    opt = ChildTuningAdamW(params, ChildTuningConfig(), lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    before = [p.detach().clone() for p in params]
    params[-1].grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    assert isinstance(mask, ChildMask)


# ----------------------------------------------------------------------------------------------
# the registry: apply / restore / report / checkpoints
# ----------------------------------------------------------------------------------------------

def test_apply_then_restore_gives_back_the_flags_and_values(tmp_path):
    model = tiny_gpt2()
    for n, p in model.named_parameters():
        p.requires_grad_("ln_" not in n)  # some flags off before
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ptune_rt.apply(model, ChildTuningConfig(mode="D", reserve_p=0.2))
    assert all(p.requires_grad for p in model.parameters())  # full fine-tuning
    text = ptune_rt.format_report(ptune_rt.report(model))
    assert "Child-tuning_D" in text and "child_tuning" in text
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ptune_rt.save_adapter(model, tmp_path / "ct", format="ptune")  # PEFT has no Child-tuning
    fresh = tiny_gpt2()
    ptune_rt.load_adapter(fresh, tmp_path / "ct")
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    ptune_rt.restore(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_target_modules_choose_the_trained_parameters():
    model = tiny_gpt2()
    ptune_rt.apply(model, ChildTuningConfig(target_modules=["c_attn", "c_fc"]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".c_attn." in n or ".c_fc." in n for n in trained)
    ptune_rt.restore(model)
    with pytest.raises(ValueError, match="no parameter in modules matching"):
        ptune_rt.apply(model, ChildTuningConfig(target_modules=["nothing_here"]))
    assert all(p.requires_grad for p in model.parameters())


def test_environment_runs_the_kernels_through_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_compile_report_covers_every_shipped_config_dtype_and_mode():
    """Every config the step can launch is built ahead of time in each dtype and mode (the compile itself runs
    in test_compile_report)."""
    from ptune_rt.compile_report import collect_variants
    from ptune_rt.kernels import child_adamw as CA

    keys = {v.key for v in collect_variants(["_child_"])}
    for cfg in CA.CONFIGS:
        for dtype in ("fp32", "fp16", "bf16"):
            for mode in ("plain", "F", "D"):
                assert f"_child_adamw_kernel | {cfg} | {dtype} mode {mode}" in keys
        assert f"_child_keep_mask_kernel | {cfg} | keep mask" in keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_d_step_equals_the_reference_bit_for_bit(dtype, torch_path):
    """Mode D on the torch path steps the child's entries alone (gathered, stepped, written back): the
    same bits as the reference, which steps every entry and keeps the child's."""
    from ptune_rt.methods.child_tuning.optim import _child_entries_step
    from ptune_rt.reference.child_tuning import child_adamw_reference

    g = torch.Generator().manual_seed(3)
    shape = (37, 41)
    p = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    keep = torch.rand(shape, generator=g) < 0.3
    m, v = torch.randn(shape, generator=g) * keep, torch.rand(shape, generator=g) * keep
    hyper = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    ref = [t.clone() for t in (p, m, v)]
    child_adamw_reference(ref[0], grad, ref[1], ref[2], **hyper, mode="D", reserve_p=0.3, keep=keep)
    ours = [t.clone() for t in (p, m, v)]
    _child_entries_step(ours[0], grad, ours[1], ours[2], keep, hyper)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], p)
