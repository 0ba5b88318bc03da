"""Training on torch's own distributed engines, DDP and FSDP2 (``fully_shard``), with gloo on CPU:
two processes train LoRA, prefix tuning, prompt tuning and LN tuning (the model's own norm weights,
sharded with the layers) on a tiny Llama for a few steps, each on its half of a batch. The adapters
must come out identical on both ranks and equal (fp32 rounding) to one process training on the
whole batch; ``ptune_rt.save_adapter`` called on every rank of the FSDP2 model must gather the
shards and write, on rank 0, the checkpoint the single process writes.

One spawn of two workers runs every case (starting a process costs seconds: imports of torch and
transformers); the single-process references are computed here meanwhile. Each rank writes its
adapter (gathered) to a file per case, the tests compare the files. A worker's exception fails
every test whose result it did not write, with the worker's traceback.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import ptune_rt
from ptune_rt.errors import AdapterError
from ptune_rt.io.adapters import FILES
from ptune_rt.testing.tolerances import assert_fp32_end_to_end_close

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
ROWS_PER_RANK, SEQ = 2, 8
STEPS = 3
LR, MOMENTUM = 0.5, 0.9
METHODS = ("lora", "prefix", "prompt_tuning", "ln_tuning")
ENGINES = ("ddp", "fsdp2")
FORMATS = {method: ("peft", "ptune") for method in METHODS}
#: the whole spawn (start, imports, every case, saves); a stuck collective fails after PG_TIMEOUT_S
SPAWN_TIMEOUT_S = 240
PG_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ----------------------------------------------------------------------------------------------
# what both sides run
# ----------------------------------------------------------------------------------------------

def _config(method: str):
    if method == "lora":
        return ptune_rt.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    if method == "prefix":  # with the MLP: the PEFT checkpoint holds its output, computed at save
        return ptune_rt.PrefixConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32)
    if method == "prompt_tuning":
        return ptune_rt.PromptTuningConfig(num_virtual_tokens=4)
    return ptune_rt.LNTuningConfig()  # a method that trains the model's own (sharded) parameters


def _model(method: str):
    """The same adapted tiny Llama in every process: seeded base weights and adapter init."""
    from helpers_models import tiny_llama

    base = tiny_llama(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = ptune_rt.apply(base, _config(method))
    if method == "lora":  # B starts at 0: give it values so the first steps move A as well
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(2)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05)
    return model.train()


def _batch() -> torch.Tensor:
    """The whole batch [WORLD * ROWS_PER_RANK, SEQ]; rank r trains on rows [r*ROWS_PER_RANK, ...)."""
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 128, (WORLD * ROWS_PER_RANK, SEQ), generator=g)


def _train(model: torch.nn.Module, params, ids: torch.Tensor) -> None:
    """STEPS SGD steps on the mean token loss of ``ids``. The engines average the ranks' gradients,
    so with equal shards the ranks' mean losses make the gradient of the whole batch's mean loss."""
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, whole (a DTensor shard is gathered: a collective)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[n] = t.to("cpu", copy=True).contiguous()
    return out


def _case(engine: str, method: str) -> str:
    return f"{engine}-{method}"


# ----------------------------------------------------------------------------------------------
# the workers
# ----------------------------------------------------------------------------------------------

def _worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, TESTS_DIR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        ids = _batch()[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]
        mesh = init_device_mesh("cpu", (WORLD,))
        for method in METHODS:
            for engine in ENGINES:
                case = _case(engine, method)
                model = _model(method)
                if engine == "ddp":
                    wrapped = DistributedDataParallel(model)
                    _train(wrapped, [p for p in wrapped.parameters() if p.requires_grad], ids)
                else:
                    for layer in model.model.layers:
                        fully_shard(layer, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                    _train(model, [p for p in model.parameters() if p.requires_grad], ids)
                save_file(_adapter(model), os.path.join(out, f"{case}-rank{rank}.safetensors"))
                if engine == "fsdp2":
                    for fmt in FORMATS[method]:
                        path = os.path.join(out, f"{case}-{fmt}")
                        assert ptune_rt.save_adapter(model, path, format=fmt) == path
                        # every rank returns once rank 0 has written
                        assert sorted(os.listdir(path)) == sorted(FILES[fmt]), os.listdir(path)
                    if method == "lora":
                        _save_fails_on_rank0(model, rank, out)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _save_fails_on_rank0(model, rank: int, out: str) -> None:
    """rank 0 cannot write (the path is a file): it raises the error, the other ranks an AdapterError
    saying so, instead of waiting forever or returning as if saved."""
    path = os.path.join(out, "a-file")
    if rank == 0:
        open(path, "w").close()
    with pytest.raises(NotADirectoryError if rank == 0 else AdapterError,
                       match="is not a directory") as e:
        ptune_rt.save_adapter(model, path)
    assert rank == 0 or "rank 0 failed" in str(e.value)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(ctx, timeout: float):
    """None when every worker finished, else why not (a worker's traceback, or the timeout)."""
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(10)
                return f"the workers did not finish within {timeout} s"
    except mp.ProcessRaisedException as e:  # its message ends with the worker's traceback
        return str(e)
    except mp.ProcessExitedException as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------
# the single-process references and the run
# ----------------------------------------------------------------------------------------------

def _reference(method: str, out: str) -> dict[str, torch.Tensor]:
    model = _model(method)
    before = _adapter(model)
    _train(model, [p for p in model.parameters() if p.requires_grad], _batch())
    after = _adapter(model)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-3, f"{method}: training barely moved the adapter ({moved:.2e}); the comparison would be void"
    for fmt in FORMATS[method]:
        ptune_rt.save_adapter(model, os.path.join(out, f"single-{method}-{fmt}"), format=fmt)
    return after


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distributed"))
    start = time.monotonic()
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    try:
        refs = {method: _reference(method, out) for method in METHODS}
    finally:
        failure = _join(ctx, SPAWN_TIMEOUT_S - (time.monotonic() - start))
    return out, refs, failure


def _rank_files(run, engine: str, method: str) -> list[dict[str, torch.Tensor]]:
    out, _, failure = run
    files = [os.path.join(out, f"{_case(engine, method)}-rank{r}.safetensors") for r in range(WORLD)]
    if not all(os.path.exists(f) for f in files):
        pytest.fail(f"{_case(engine, method)}: the workers wrote no result:\n{failure}")
    return [load_file(f) for f in files]


def _assert_same_adapter(got: dict, ref: dict, what: str) -> None:
    assert sorted(got) == sorted(ref), what
    for k in ref:
        assert got[k].dtype == ref[k].dtype, f"{what}: {k}"
        assert_fp32_end_to_end_close(got[k], ref[k], f"{what}: {k}")


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_ranks_hold_the_same_adapter(run, engine, method):
    rank0, rank1 = _rank_files(run, engine, method)
    assert sorted(rank0) == sorted(rank1)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between the ranks"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_equals_single_process_run(run, engine, method):
    rank0, _ = _rank_files(run, engine, method)
    _assert_same_adapter(rank0, run[1][method], f"{engine} {method} vs one process")


def _save_cases():
    for method in METHODS:
        for fmt in FORMATS[method]:
            yield pytest.param(method, fmt, id=f"{method}-{fmt}")


@pytest.mark.parametrize("method, fmt", list(_save_cases()))
def test_save_adapter_on_fsdp2_model(run, method, fmt):
    out, _, failure = run
    _rank_files(run, "fsdp2", method)  # the training ran
    got, ref = (os.path.join(out, f"{who}-{method}-{fmt}") for who in ("fsdp2", "single"))
    if not os.path.isdir(got):
        pytest.fail(f"save_adapter wrote no {fmt} checkpoint of the FSDP2 {method} model:\n{failure}")
    config_name, weights_name = FILES[fmt]
    assert sorted(os.listdir(got)) == sorted(os.listdir(ref)) == sorted((config_name, weights_name))
    _assert_same_adapter(load_file(os.path.join(got, weights_name)), load_file(os.path.join(ref, weights_name)),
                         f"{method} {fmt} checkpoint of the FSDP2 model vs one process")
    with open(os.path.join(got, config_name)) as f, open(os.path.join(ref, config_name)) as g:
        assert json.load(f) == json.load(g), f"{fmt} config of the FSDP2 {method} model"
