"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything diffsteer writes (weights, pipelines, checkpoints, tokenizers, PNGs) goes through here, so
an interrupted or failing write never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _fsync(path: Path) -> None:
    # Data must reach the disk before the rename publishes it, or a power loss could publish a
    # complete-looking file with nothing in it.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(target: PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``target`` that replaces ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        # mkstemp makes the file owner-only; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield a temp folder that becomes ``target`` when the block succeeds, and vanishes if it fails.

    The temp folder lives next to ``target`` (same filesystem, so the rename is atomic). An existing
    ``target`` is replaced only once the new one is complete (``os.replace`` cannot overwrite a
    non-empty folder, so the old one is moved aside first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        # mkdtemp makes the folder owner-only; give it the mode a plain mkdir() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
