"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything diffsteer writes (weights, pipelines, checkpoints, tokenizers, PNGs) goes through here, so
an interrupted or failing write never leaves a half-written file behind.

A process killed mid-write (``kill -9``, power loss) cannot delete its temporaries, so they all share one
naming scheme, ``.<target name>.diffsteer-<tmp|old>-<pid>-<random>`` next to the target, and
:func:`remove_stale_temporaries` deletes the ones whose writer is gone. Every training run calls it on
its output folder when it starts.

Test seam: with ``DIFFSTEER_TEST_STOP_AT=<path>:<point>`` in the environment, the process stops itself
(``SIGSTOP``) when a writer of a target whose path ends with ``<path>`` (``final``, ``run/final``)
reaches ``point``: ``ready`` (the temporary is complete, not yet renamed into place) or ``swapped``
(folders only: the old target has been moved aside, the new one is not yet in place). A test then
kills it by its PID at exactly that point. Unset, it costs one environment lookup per write.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Names of every temporary :func:`atomic_file` and :func:`atomic_directory` create: group 1 is the
#: writer's PID. (``tempfile``'s random part is lowercase letters, digits and ``_``.)
TEMPORARY_NAME = re.compile(r"^\..+\.diffsteer-(?:tmp|old)-(\d+)-[a-z0-9_]+$")
STOP_ENV = "DIFFSTEER_TEST_STOP_AT"

# Temporaries this process is writing now: never stale, whatever their PID says.
_open: set[Path] = set()


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.diffsteer-{kind}-{os.getpid()}-"


def _fsync(path: Path) -> None:
    # Data must reach the disk before the rename publishes it, or a power loss could publish a
    # complete-looking file with nothing in it.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _plain_mode(path: Path, full: int) -> None:
    # mkstemp/mkdtemp make owner-only entries; give them the mode a plain open()/mkdir() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)


def _test_stop(target: Path, point: str) -> None:
    """The test seam (see the module docstring)."""
    where, _, when = os.environ.get(STOP_ENV, "").rpartition(":")
    if when == point and where:
        parts = Path(where).parts
        if target.absolute().parts[-len(parts):] == parts:
            os.kill(os.getpid(), signal.SIGSTOP)


@contextmanager
def atomic_file(target: PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``target`` that replaces ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=_prefix(target, "tmp"))
    os.close(fd)
    tmp = Path(name)
    _open.add(tmp.resolve())
    try:
        yield tmp
        _fsync(tmp)
        _plain_mode(tmp, 0o666)
        _test_stop(target, "ready")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _open.discard(tmp.resolve())


@contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield a temp folder that becomes ``target`` when the block succeeds, and vanishes if it fails.

    The temp folder lives next to ``target`` (same filesystem, so the rename is atomic). An existing
    ``target`` is replaced only once the new one is complete (``os.replace`` cannot overwrite a
    non-empty folder, so the old one is moved aside first; a kill between the two renames leaves
    no ``target``, and the old one as a temporary that :func:`remove_stale_temporaries` deletes).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target, "tmp")))
    old = target.with_name(_prefix(target, "old") + secrets.token_hex(4))
    _open.update((tmp.resolve(), old.resolve()))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _plain_mode(tmp, 0o777)
        _test_stop(target, "ready")
        if target.exists():
            os.replace(target, old)
            _test_stop(target, "swapped")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _open.difference_update((tmp.resolve(), old.resolve()))


@contextmanager
def scratch_directory(parent: PathLike, name: str) -> Iterator[Path]:
    """Yield a throw-away folder in ``parent``, deleted when the block ends; named like the temporaries above,
    so a run killed inside the block leaves nothing that :func:`remove_stale_temporaries` would not delete."""
    target = Path(parent) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target, "tmp")))
    _open.add(tmp.resolve())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _open.discard(tmp.resolve())


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        # Our own open temporaries are in _open; anything else of ours is from an earlier process that had
        # our PID (containers reuse them). Elsewhere, no cheap liveness test: taken as gone.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary of this module's writers whose writer has died."""
    m = TEMPORARY_NAME.match(path.name)
    if m is None:
        return False
    return path.resolve() not in _open and not _writer_alive(int(m.group(1)))


def remove_stale_temporaries(root: PathLike) -> list[Path]:
    """Delete every stale temporary under ``root`` (recursively; links are not followed); returns them.

    A killed writer's temporaries are never valid results, and nothing else is named like them. Those
    of a writer that is still running (this process, or another live PID on this machine) are kept.
    """
    removed: list[Path] = []
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            path = Path(entry.path)
            if is_stale_temporary(path):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(path)
    return sorted(removed)
