"""Crash-consistent replacement of one checkpoint (a config file plus a weights file) in a directory.

A checkpoint is committed by its config file: wherever a config sits, the weights beside it belong
to it. A save of the pair (``config``, ``weights``) into directory ``D``:

1. finishes or undoes a killed earlier save (see :func:`recover`) and removes stale temporaries;
2. writes both files into a fresh hidden staging folder ``D/.ptune-rt-staging-<uuid>/`` and
   fsyncs them and the folder;
3. moves the old checkpoint aside into ``D/.ptune-rt-previous/``: config first, then weights
   (from the first rename until step 4 ends, ``D`` holds no config and the loader reads the old
   checkpoint from there; a stray weights file without its config is removed);
4. renames the new weights into ``D``, then the new config (the commit point), fsyncing ``D``
   after each;
5. removes the old copy and the staging folder.

At every instant either ``D`` holds the old or the new checkpoint complete, or ``D`` holds no
config and ``D/.ptune-rt-previous/`` holds the old one (its weights there, or still in ``D`` for
the moment between the two renames of step 3). :func:`locate` applies exactly this rule for the
loader, which therefore sees the old or the new checkpoint, never a mix; a reader outside
ptune-rt (PEFT) sees the old one, the new one, or none. Other files in ``D`` are never touched.
Every file-system change goes through ``os`` calls (``mkdir``, ``open``, ``write``, ``fsync``,
``rename`` / ``replace``, ``unlink``, ``rmdir``) so a test can kill the writer at each of them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

STAGING_PREFIX = ".ptune-rt-staging-"
PREVIOUS = ".ptune-rt-previous"
#: Temporaries of ptune-rt versions that wrote each file beside its final name.
_LEGACY_TMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# primitive steps (each one os call that changes the file system, plus fsyncs)
# ----------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path, first: Sequence[str] = ()) -> None:
    """Delete ``path`` and everything in it, the names in ``first`` before the rest (a folder
    losing its config first never looks like a complete checkpoint on the way)."""
    entries = sorted(os.scandir(path), key=lambda e: (e.name not in first, e.name))
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _remove_tree(Path(e.path))
        else:
            os.unlink(e.path)
    os.rmdir(path)


# ----------------------------------------------------------------------------------------------
# where a loader reads a checkpoint
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Located:
    """The files of one checkpoint: ``config`` (None: there is none) and ``weights``."""

    config: Optional[Path]
    weights: Path

    def stamp(self) -> tuple:
        """What identifies these files' contents now (a save in between changes it)."""
        return tuple((str(p), _stat_key(p)) for p in (self.config, self.weights) if p is not None)


def _stat_key(p: Path):
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def locate(directory: Path, config: str, weights: str) -> Located:
    """The checkpoint ``(config, weights)`` of ``directory`` as a loader must read it: the one in
    ``directory`` when its config is there, else the old one a killed save moved aside."""
    if (directory / config).is_file():
        return Located(directory / config, directory / weights)
    previous = directory / PREVIOUS
    if (previous / config).is_file():
        w = previous / weights
        return Located(previous / config, w if w.is_file() else directory / weights)
    return Located(None, directory / weights)


def read_consistent(directory: Path, config: str, weights: str, read: Callable[[Located], T],
                    attempts: int = 3) -> T:
    """``read(locate(...))``, repeated while a concurrent save changes the files under it, so
    the config and the weights returned belong to one checkpoint."""
    for _ in range(attempts - 1):
        where = locate(directory, config, weights)
        before = where.stamp()
        try:
            result = read(where)
        except FileNotFoundError:
            if locate(directory, config, weights).stamp() != before:
                continue
            raise
        if locate(directory, config, weights).stamp() == before:
            return result
    return read(locate(directory, config, weights))


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def replace_checkpoint(directory: Path, config: tuple[str, bytes], weights: tuple[str, bytes],
                       pairs: Sequence[tuple[str, str]]) -> None:
    """Write ``config`` and ``weights`` (name, bytes) into ``directory`` (created if missing),
    replacing the checkpoint of that name pair crash-consistently (module docstring). ``pairs``:
    every (config, weights) name pair a checkpoint can have, so a killed save of any is recovered.
    If a step raises, the old checkpoint is put back before the error propagates."""
    if not directory.is_dir():
        directory.mkdir(parents=True)
        _fsync_dir(directory.parent)
    recover(directory, pairs)
    try:
        stage = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        os.mkdir(stage)
        _write_file(stage / weights[0], weights[1])
        _write_file(stage / config[0], config[1])
        _fsync_dir(stage)
        _move_aside(directory, config[0], weights[0])
        os.replace(stage / weights[0], directory / weights[0])
        _fsync_dir(directory)
        os.replace(stage / config[0], directory / config[0])  # the commit point
        _fsync_dir(directory)
    except BaseException:
        try:
            recover(directory, pairs)
        except OSError:  # pragma: no cover - the original error says more
            pass
        raise
    recover(directory, pairs)


def _move_aside(directory: Path, config: str, weights: str) -> None:
    """Step 3: the old checkpoint into ``PREVIOUS`` (config first), a config-less weights file away."""
    old_config, old_weights = directory / config, directory / weights
    if not old_config.is_file():
        if old_weights.is_file():
            os.unlink(old_weights)
        return
    previous = directory / PREVIOUS
    os.mkdir(previous)
    os.rename(old_config, previous / config)
    if old_weights.is_file():
        os.rename(old_weights, previous / weights)
    _fsync_dir(previous)
    _fsync_dir(directory)


def recover(directory: Path, pairs: Sequence[tuple[str, str]]) -> None:
    """Undo a save that was killed before its commit (the old checkpoint goes back where it was),
    then remove what killed saves left: the old copy, staging folders, legacy ``.<name>.<hex>.tmp``
    files. Leaves ``directory`` holding exactly its committed checkpoints and the user's files."""
    previous = directory / PREVIOUS
    changed = False
    if previous.is_dir():
        for config, weights in pairs:
            if not (directory / config).is_file() and (previous / config).is_file():
                _restore(directory, previous, config, weights)
        _remove_tree(previous, first=[c for c, _ in pairs])
        changed = True
    names = {n for pair in pairs for n in pair}
    for e in os.scandir(directory):
        if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False):
            _remove_tree(Path(e.path))
            changed = True
        elif _LEGACY_TMP.match(e.name) and e.name[1:].rsplit(".", 2)[0] in names:
            os.unlink(e.path)
            changed = True
    if changed:
        _fsync_dir(directory)


def _restore(directory: Path, previous: Path, config: str, weights: str) -> None:
    """Put the old checkpoint back: weights first (over uncommitted new ones, if any), then its
    config (``rename``: nothing may be at its destination)."""
    if (previous / weights).is_file():
        os.replace(previous / weights, directory / weights)
        _fsync_dir(directory)
    os.rename(previous / config, directory / config)
    _fsync_dir(directory)
