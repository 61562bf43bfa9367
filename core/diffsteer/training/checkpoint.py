"""Checkpoints: atomic directories holding everything a run needs to continue bit for bit.

Layout of ``<out_dir>/checkpoints/step-00000100/``::

    trainable.safetensors   the trained parameters (frozen ones are rebuilt by the script, not saved)
    ema.safetensors         their EMA, when enabled
    optimizer.pt            AdamW state (tensors and numbers only: loaded with weights_only=True)
    rng.pt                  torch (CPU and CUDA), numpy and python global RNG states (seeded from the config's
                            seed when the run starts, so two runs of one config write identical files)
    trainer_state.json      step, loss history, config, parameter names

A checkpoint is written into a hidden temp directory next to its final place and renamed into place
only when complete (:func:`diffsteer.atomic.atomic_directory`), so a crash mid-write leaves either the
whole checkpoint or none of it, plus a temporary that the next run's cleaning removes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..atomic import atomic_directory
from ..loading.weights import load_state_dict, save_state_dict

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, keep: Optional[int]) -> None:
    """Keep the newest ``keep`` checkpoints (all when ``keep`` is None)."""
    if keep is None:
        return
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# -- RNG states ---------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Global RNG states, as tensors and plain values (loadable with weights_only=True).

    The trainer's own draws do not use them (see :mod:`.randomness`), and neither do the shipped
    models (their dropout is 0) or training plugins; they are saved so that a plugin or model that does
    draw from them (dropout > 0) also continues as it would have.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# -- writing and reading --------------------------------------------------------------------------------


@dataclass
class CheckpointData:
    """What a checkpoint holds, in memory."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    ema: Optional[dict[str, torch.Tensor]] = None


def write_checkpoint(root: Path, data: CheckpointData, keep: Optional[int] = None) -> Path:
    """Write ``data`` atomically as ``root/step-XXXXXXXX``; then prune to the newest ``keep``."""
    target = root / checkpoint_name(data.step)
    with atomic_directory(target) as tmp:
        save_state_dict(data.trainable, tmp / "trainable.safetensors")
        if data.ema is not None:
            save_state_dict(data.ema, tmp / "ema.safetensors")
        torch.save(data.optimizer, tmp / "optimizer.pt")
        torch.save(data.rng, tmp / "rng.pt")
        # Written last: its presence marks a complete checkpoint even on filesystems without atomic rename.
        (tmp / STATE_FILE).write_text(json.dumps({"step": data.step, **data.state}, indent=1) + "\n")
    prune_checkpoints(root, keep)
    return target


def read_checkpoint(path: Path, map_location: Union[str, torch.device] = "cpu") -> CheckpointData:
    state = json.loads((path / STATE_FILE).read_text())
    ema_file = path / "ema.safetensors"
    return CheckpointData(
        step=int(state.pop("step")),
        trainable=load_state_dict(path / "trainable.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        state=state,
        ema=load_state_dict(ema_file) if ema_file.is_file() else None,
    )
