"""What ``diffsteer plugins`` lists: each installed plugin's distribution, version, hook contract and hooks.

Finding a plugin's hooks means importing it, and with it torch: seconds per listing. The hooks are
cached per plugin under a fingerprint of its entry point, distribution and source files (paths, sizes,
modification times), so a listing imports only plugins that are new or changed. A plugin that fails to
load is never cached: it is retried, and its error shown, every time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional

from . import __version__

ENTRY_POINT_GROUP = "diffsteer"
_FORMAT = 2  # 2: entries carry the plugin's hook contract


def cache_file() -> Path:
    """``plugins.json`` in the diffsteer cache folder (:func:`~diffsteer.provenance.cache_dir`)."""
    from .provenance import cache_dir

    return cache_dir() / "plugins.json"


def _source_files(module: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(module.split(".")[0])  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin and os.path.exists(spec.origin) else []


def fingerprint(ep: md.EntryPoint) -> str:
    """Changes whenever the plugin's entry point, distribution version or any of its source files does."""
    dist = ep.dist
    digest = hashlib.sha256(f"{_FORMAT}|{__version__}|{ep.value}|{dist.name if dist else ''}|"
                            f"{dist.version if dist else ''}".encode())
    for path in _source_files(ep.module):
        st = path.stat()
        digest.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _load_hooks(ep: md.EntryPoint) -> tuple[list[str], str]:
    """The plugin's hooks (without the ``diffsteer_`` prefix) and the contract version it declares."""
    from .plugins import implemented_hooks

    cls = ep.load()
    return [h.removeprefix("diffsteer_") for h in implemented_hooks(cls)], str(getattr(cls, "contract", "1.0"))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    from .atomic import atomic_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs speed


def plugin_rows(cache: Optional[Path] = None) -> list[dict[str, Any]]:
    """One row per installed plugin, by name: ``name``, ``distribution``, ``version``, ``contract``, ``hooks``,
    ``error``."""
    cache = cache_file() if cache is None else cache
    known = _read_cache(cache)
    fresh: dict[str, Any] = {}
    rows = []
    for name, ep in sorted({ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}.items()):
        dist = ep.dist
        stamp = fingerprint(ep)
        entry = known.get(name)
        if (isinstance(entry, dict) and entry.get("fingerprint") == stamp and isinstance(entry.get("hooks"), list)
                and isinstance(entry.get("contract"), str)):
            hooks, contract, problem = entry["hooks"], entry["contract"], ""
        else:
            try:
                (hooks, contract), problem = _load_hooks(ep), ""
            except Exception as exc:  # a broken plugin must not hide the others
                hooks, contract, problem = [], "?", f"{type(exc).__name__}: {exc}"
        if not problem:
            fresh[name] = {"fingerprint": stamp, "hooks": hooks, "contract": contract}
        rows.append({"name": name, "distribution": dist.name if dist else "?",
                     "version": dist.version if dist else "?", "contract": contract, "hooks": hooks,
                     "error": problem})
    if fresh != {k: v for k, v in known.items() if k in fresh} or set(known) != set(fresh):
        _write_cache(cache, fresh)
    return rows
