"""Crash consistency of ``save_adapter``: a forked saver is killed at every call that changes the
file system (mkdir, creating open, write, fsync, rename / replace, unlink, rmdir), one kill point
per test; after each kill the directory must load as exactly the old or exactly the new
checkpoint (tensors and scaling compared), the user's other files must be intact, and the next
save must leave no temporary behind.

``KILL_POINTS`` is the number of such calls a full save makes in each scenario; a test asserts it
against a traced save, so a change of the protocol cannot shrink the coverage unnoticed.
"""
import multiprocessing
import os
import tempfile
from pathlib import Path

import pytest
import torch

import ptune_rt
from ptune_rt import LoRAConfig, load_adapter, save_adapter
from ptune_rt.io import durable
from ptune_rt.methods.lora.inject import lora_modules

from helpers_models import tiny_llama

KILLED = 86  # exit status of a saver killed at its kill point
#: scenario -> calls that change the file system in one full save (each one is a kill point)
KILL_POINTS = {"fresh": 16, "replace": 24, "beside-other-format": 22, "after-a-kill": 29}
#: The user's own files in the checkpoint directory, which every save must leave alone.
USER_FILES = {"README.md": b"# my adapter\n", "notes/eval.txt": b"accuracy 0.9\n"}
LEGACY_TMP = ".adapter_model.safetensors.0123456789abcdef0123456789abcdef.tmp"
_WRAPPED = ("mkdir", "open", "write", "fsync", "replace", "rename", "unlink", "rmdir", "close")


class IOTrace:
    """Wraps the ``os`` calls that change the file system under ``root``: records each one and,
    with ``kill_at=n``, ends the process at the n-th (1-based) one, a write after writing half of
    its bytes (a torn write), any other call before it runs."""

    def __init__(self, root: Path, kill_at=None):
        self.root, self.kill_at = os.path.abspath(root), kill_at
        self.calls: list[tuple[str, str]] = []
        self.fds: dict[int, str] = {}
        self.real = {name: getattr(os, name) for name in _WRAPPED}

    def _inside(self, path) -> bool:
        """In the checkpoint directory, or the directory itself or its parent (created, fsynced)."""
        p = os.path.abspath(os.fspath(path))
        return p in (self.root, os.path.dirname(self.root)) or p.startswith(self.root + os.sep)

    def _point(self, kind: str, where: str, torn=None) -> None:
        self.calls.append((kind, os.path.relpath(where, self.root)))
        if len(self.calls) == self.kill_at:
            if torn is not None:
                torn()
            os._exit(KILLED)

    def install(self) -> None:
        real = self.real

        def mkdir(path, *a, **k):
            if self._inside(path):
                self._point("mkdir", path)
            return real["mkdir"](path, *a, **k)

        def open_(path, flags, *a, **k):
            if self._inside(path) and flags & os.O_CREAT:
                self._point("create", path)
            fd = real["open"](path, flags, *a, **k)
            if self._inside(path):
                self.fds[fd] = os.fspath(path)
            return fd

        def write(fd, data):
            if fd in self.fds:
                self._point("write", self.fds[fd], torn=lambda: real["write"](fd, bytes(data)[:len(data) // 2]))
            return real["write"](fd, data)

        def fsync(fd):
            if fd in self.fds:
                self._point("fsync", self.fds[fd])
            return real["fsync"](fd)

        def close(fd):
            self.fds.pop(fd, None)
            return real["close"](fd)

        def two_paths(kind):
            def move(src, dst, *a, **k):
                if self._inside(src) or self._inside(dst):
                    self._point(kind, dst)
                return real[kind](src, dst, *a, **k)
            return move

        def one_path(kind):
            def remove(path, *a, **k):
                if self._inside(path):
                    self._point(kind, path)
                return real[kind](path, *a, **k)
            return remove

        wrappers = {"mkdir": mkdir, "open": open_, "write": write, "fsync": fsync, "close": close,
                    "replace": two_paths("replace"), "rename": two_paths("rename"),
                    "unlink": one_path("unlink"), "rmdir": one_path("rmdir")}
        for name, fn in wrappers.items():
            setattr(os, name, fn)


# ----------------------------------------------------------------------------------------------
# checkpoints and scenarios
# ----------------------------------------------------------------------------------------------

def lora_model(alpha: float, seed: int):
    """One-layer tiny Llama with LoRA on q/v, rank 4 (every checkpoint here has the same rank, so
    only the values and alpha tell them apart: a mix would load without error)."""
    model = ptune_rt.apply(tiny_llama(layers=1), LoRAConfig(r=4, alpha=alpha, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def fingerprint(model) -> dict:
    """Every LoRA tensor and scaling of ``model``."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    mods = lora_modules(model)
    out.update({f"{n}.scaling": torch.tensor(m.scaling["default"]) for n, m in mods.items()})
    return out


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: The checkpoint in the directory before, the one the killed save writes, the one of the next save.
OLD, NEW, NEXT = lora_model(8.0, 1), lora_model(16.0, 2), lora_model(32.0, 3)


def loaded(directory: Path, fmt: str):
    """What ``directory`` loads as: "none" (no checkpoint), or the fingerprint of the loaded model."""
    try:
        return fingerprint(load_adapter(tiny_llama(layers=1), directory, format=fmt))
    except FileNotFoundError:
        return "none"


def write_user_files(d: Path) -> None:
    for name, data in USER_FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)


def run_saver(d: Path, model, fmt: str, kill_at: int) -> int:
    """Exit status of a forked process saving ``model`` into ``d``, killed at call ``kill_at``."""
    def child():
        IOTrace(d, kill_at).install()
        save_adapter(model, d, format=fmt)
        os._exit(0)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    return p.exitcode


def setup(scenario: str, d: Path):
    """Build the scenario's directory; returns (format of the new save, what it loads as before)."""
    if scenario == "fresh":
        return "peft", "none"
    d.mkdir()
    write_user_files(d)
    if scenario == "beside-other-format":
        save_adapter(OLD, d, format="peft")  # must survive untouched: the save is of the own format
        save_adapter(OLD, d, format="ptune")
        return "ptune", fingerprint(OLD)
    save_adapter(OLD, d, format="peft")
    if scenario == "replace":
        (d / LEGACY_TMP).write_bytes(b"half a file")  # left by an older version's killed save
    if scenario == "after-a-kill":  # killed between moving the old config aside and moving its weights
        assert run_saver(d, NEXT, "peft", _first_rename(d) + 1) == KILLED
        assert not (d / "adapter_config.json").exists() and (d / durable.PREVIOUS / "adapter_config.json").exists()
    return "peft", fingerprint(OLD)


def _first_rename(d: Path) -> int:
    """1-based index of the first rename of a save into ``d`` (traced on a copy)."""
    import shutil
    copy = d.parent / (d.name + "-trace")
    shutil.copytree(d, copy)
    calls = trace_save(copy, NEXT, "peft")
    shutil.rmtree(copy)
    return [k for k, _ in calls].index("rename") + 1


def trace_save(d: Path, model, fmt: str) -> list:
    """The file-system changes of saving ``model`` into ``d``, as (kind, path relative to d)."""
    trace = IOTrace(d)
    saved = dict(trace.real)
    trace.install()
    try:
        save_adapter(model, d, format=fmt)
    finally:
        for name, fn in saved.items():
            setattr(os, name, fn)
    return trace.calls


def listing(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def expected_listing(scenario: str) -> set:
    files = {"adapter_config.json", "adapter_model.safetensors"}
    if scenario != "fresh":
        files |= set(USER_FILES) | {"notes"}
    if scenario == "beside-other-format":
        files |= {"ptune_config.json", "adapter.safetensors"}
    return files


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", list(KILL_POINTS))
def test_kill_points_cover_every_io_call(scenario, tmp_path):
    """A traced full save makes exactly KILL_POINTS[scenario] file-system changes, and the kill
    tests below cover each; the save also keeps the user's files and leaves no temporary."""
    d = tmp_path / "ckpt"
    fmt, _ = setup(scenario, d)
    calls = trace_save(d, NEW, fmt)
    kinds = {k for k, _ in calls}
    print(f"{scenario}: {len(calls)} kill points: " + ", ".join(f"{k} {w}" for k, w in calls))
    assert len(calls) == KILL_POINTS[scenario], calls
    assert {"mkdir", "create", "write", "fsync", "replace", "rmdir"} <= kinds
    if scenario != "fresh":
        assert {"rename", "unlink"} <= kinds
    assert listing(d) == expected_listing(scenario)
    assert same(loaded(d, fmt), fingerprint(NEW))


_COMMITS: dict = {}


def commit_index(scenario: str) -> int:
    """1-based index of the commit (the new config's rename into place) in a full save."""
    if scenario not in _COMMITS:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "ckpt"
            fmt, _ = setup(scenario, d)
            config = "adapter_config.json" if fmt == "peft" else "ptune_config.json"
            _COMMITS[scenario] = trace_save(d, NEW, fmt).index(("replace", config)) + 1
    return _COMMITS[scenario]


CASES = [(s, k) for s, n in KILL_POINTS.items() for k in range(1, n + 1)]


@pytest.mark.parametrize("scenario,kill_at", CASES,
                         ids=[f"{s}-kill-{k:02d}-of-{KILL_POINTS[s]}" for s, k in CASES])
def test_killed_save_loads_old_or_new_and_next_save_cleans_up(scenario, kill_at, tmp_path):
    d = tmp_path / "ckpt"
    fmt, old = setup(scenario, d)
    commit = commit_index(scenario)
    assert run_saver(d, NEW, fmt, kill_at) == KILLED

    got = loaded(d, fmt)
    want = old if kill_at <= commit else fingerprint(NEW)  # the commit point decides, nothing else
    assert (got == "none") if isinstance(want, str) else same(got, want), \
        f"killed at call {kill_at} (commit at {commit}): loads as neither the old nor the new checkpoint"
    if scenario == "beside-other-format":  # the other format's checkpoint is untouched
        assert same(loaded(d, "peft"), fingerprint(OLD))
    for name, data in USER_FILES.items() if scenario != "fresh" else ():
        assert (d / name).read_bytes() == data

    save_adapter(NEXT, d, format=fmt)  # the next save cleans up after the killed one
    assert listing(d) == expected_listing(scenario)
    assert same(loaded(d, fmt), fingerprint(NEXT))


def test_failed_save_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """An exception at the commit (not a kill) restores the old checkpoint before it propagates."""
    d = tmp_path / "ckpt"
    setup("replace", d)
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("injected: disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(NEW, d, format="peft")
    monkeypatch.undo()
    assert same(loaded(d, "peft"), fingerprint(OLD))
    assert listing(d) == expected_listing("replace")


def test_load_during_a_save_reads_one_checkpoint(tmp_path, monkeypatch):
    """A save that runs between the loader's reads of the config and of the weights (another
    process saving into the directory) makes the loader read again, not mix the two."""
    import ptune_rt.io.adapters as adapters

    d = tmp_path / "ckpt"
    setup("replace", d)
    real_read_json, saves = adapters._read_json, []

    def read_json_then_save(file):
        d_ = real_read_json(file)
        if not saves:
            saves.append(save_adapter(NEW, d, format="peft"))
        return d_

    monkeypatch.setattr(adapters, "_read_json", read_json_then_save)
    assert same(loaded(d, "peft"), fingerprint(NEW))
    assert saves
