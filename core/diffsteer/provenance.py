"""The files a generation reads (control images, embeddings, model folders), recorded so ``--from`` can
tell when one has moved or changed: an absolute path and a SHA-256 of its content.

A folder's hash covers every file under it: each relative path and its content, in sorted order. Small
image inputs (control images) are also embedded, so an image made elsewhere can be re-run without them.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import InputFileError

_CHUNK = 1 << 20
#: image inputs up to this size are embedded in the output's metadata
EMBED_LIMIT = 64 * 1024
_EMBEDDABLE = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cache_dir() -> Path:
    """``$DIFFSTEER_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffsteer``, else ``~/.cache/diffsteer``."""
    root = os.environ.get("DIFFSTEER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffsteer"


def _update_with_file(digest: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)


def content_hash(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a folder's relative paths and file contents."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _update_with_file(digest, file)
            digest.update(b"\0")
    else:
        _update_with_file(digest, path)
    return "sha256:" + digest.hexdigest()


def looks_like_path(value: str) -> bool:
    """Whether a setting's text names an existing file or folder.

    Only text with a folder separator or a file suffix counts, so a word such as ``red`` never turns into a
    file that happens to be called ``red``.
    """
    if not value or "\n" in value or len(value) > 4096:
        return False
    shaped = os.sep in value or "/" in value or bool(Path(value).suffix)
    return shaped and Path(value).expanduser().exists()


def absolutise(value: Any, files: dict[str, str]) -> Any:
    """``value`` with every string that names an existing file made absolute; each such file's hash goes
    into ``files`` (``{absolute path: hash}``). Lists and mappings are walked."""
    if isinstance(value, str) and looks_like_path(value):
        path = Path(value).expanduser().resolve()
        files[str(path)] = content_hash(path)
        return str(path)
    if isinstance(value, Mapping):
        return {k: absolutise(v, files) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [absolutise(v, files) for v in value]
    return value


def strings_in(value: Any) -> set[str]:
    """Every string inside ``value`` (walking lists and mappings)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, Mapping):
        return {s for v in value.values() for s in strings_in(v)}
    if isinstance(value, (list, tuple)):
        return {s for v in value for s in strings_in(v)}
    return set()


def verify_inputs(recorded: Mapping[str, str], current: Mapping[str, str], used: set[str], source: str) -> None:
    """Refuse a re-run whose inputs differ from the recorded ones.

    ``recorded`` and ``current`` map absolute paths to :func:`content_hash`; ``used`` holds the strings the
    re-run's parameters contain, so a recorded file that an override replaced is not checked. A recorded file
    still used but missing, or with other content, raises :class:`InputFileError` naming it (and both hashes).
    """
    for name, old in recorded.items():
        if name not in used:
            continue
        new = current.get(name)
        if new is None:
            raise InputFileError(name, f"recorded in {source} but missing; restore it to reproduce the image")
        if new != old:
            raise InputFileError(
                name, f"changed since {source} was made (recorded {old}, now {new}); restore the recorded file "
                "to reproduce the image"
            )


def embed_small_images(files: Mapping[str, str]) -> dict[str, str]:
    """``{path: base64 bytes}`` of each recorded image file no larger than :data:`EMBED_LIMIT`."""
    out = {}
    for name in files:
        path = Path(name)
        if path.suffix.lower() in _EMBEDDABLE and path.is_file() and path.stat().st_size <= EMBED_LIMIT:
            out[name] = base64.b64encode(path.read_bytes()).decode("ascii")
    return out


def restore_embedded(recorded: Mapping[str, str], embedded: Mapping[str, str]) -> dict[str, str]:
    """For each recorded file that is gone but embedded with the recorded content, write the embedded copy to
    the cache (``cache_dir()/inputs``) and return ``{recorded path: restored path}``."""
    moved = {}
    for name, data in embedded.items():
        if name not in recorded or Path(name).exists():
            continue
        content = base64.b64decode(data)
        if "sha256:" + hashlib.sha256(content).hexdigest() != recorded[name]:
            continue  # not the recorded file: verify_inputs reports it missing
        target = cache_dir() / "inputs" / f"{recorded[name].removeprefix('sha256:')}{Path(name).suffix}"
        if not target.is_file():
            from .atomic import atomic_file

            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                tmp.write_bytes(content)
        moved[name] = str(target)
    return moved


def replace_strings(value: Any, mapping: Mapping[str, str]) -> Any:
    """``value`` with every string that is a key of ``mapping`` replaced by its value (lists and mappings walked)."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, Mapping):
        return {k: replace_strings(v, mapping) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [replace_strings(v, mapping) for v in value]
    return value
