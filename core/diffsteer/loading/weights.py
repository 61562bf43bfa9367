"""Reading, checking and writing weight files.

safetensors is the preferred format. Pickled ``.bin``/``.pt``/``.ckpt`` files are read only with
``torch.load(weights_only=True)``: a pickle that would import or call anything beyond plain tensors
is refused, never executed. Every failure is a :class:`WeightsError` that names the file and the reason.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffsteer.atomic import atomic_file
from diffsteer.loading.errors import WeightsError

__all__ = ["PICKLE_SUFFIXES", "SAFETENSORS_SUFFIX", "apply_state_dict", "load_state_dict", "save_state_dict"]

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# How many keys an error message lists before summarising the rest as a count.
_SHOW = 5


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` is read with safetensors; ``.bin``/``.pt``/``.pth``/``.ckpt`` with
    ``torch.load(weights_only=True)``. A top-level ``"state_dict"`` entry (as in original LDM
    checkpoints) is unwrapped. Raises :class:`WeightsError` for a missing, corrupt, unsafe or
    non-weights file.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError("file not found" if not p.exists() else "not a regular file", source=p)
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            loaded: object = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"not a readable safetensors file (corrupt or truncated?): {exc}", source=p) from None
    elif suffix in PICKLE_SUFFIXES:
        loaded = _load_pickle(p)
    else:
        raise WeightsError(
            f"unsupported weights file type {suffix!r}; "
            f"expected {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}",
            source=p,
        )
    return _as_state_dict(loaded, p)


def load_pickle(path: str | os.PathLike[str]) -> object:
    """Read a ``torch.save`` file with ``weights_only=True`` (tensors, dicts, lists, strings, numbers).

    For pickles that hold more than a flat state dict (A1111 embeddings); a malicious or corrupt file
    raises :class:`WeightsError` naming it, and nothing in it is executed.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError("file not found" if not p.exists() else "not a regular file", source=p)
    return _load_pickle(p)


def _load_pickle(p: Path) -> object:
    with p.open("rb") as f:
        head = f.read(2)
    # A torch.save file is a zip archive ("PK"); a legacy one is a raw pickle (PROTO opcode 0x80).
    if head != b"PK" and not head.startswith(b"\x80"):
        raise WeightsError("not a PyTorch checkpoint (neither a zip archive nor a pickle)", source=p)
    try:
        with warnings.catch_warnings():
            # torch warns about newer pickle protocols before deciding; our error (if any) says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise WeightsError(f"not a readable PyTorch checkpoint: {_first_line(text)}", source=p) from None
        glob = re.search(r"GLOBAL (\S+)", text)
        what = f"it references {glob.group(1)}" if glob else _weights_only_detail(text)
        raise WeightsError(
            "refused to load: the pickle is not plain tensors "
            f"({what}); nothing in it was executed. Convert trusted files to .safetensors.",
            source=p,
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = _first_line(str(exc))
        raise WeightsError(f"not a readable PyTorch checkpoint (corrupt or truncated?): {reason}", source=p) from None


def _weights_only_detail(text: str) -> str:
    op = re.search(r"Unsupported operand (\d+)", text)
    if op:
        return f"it uses pickle opcode {op.group(1)}, which the weights-only loader does not allow"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return m.group(1).strip() if m else "unsupported content"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _as_state_dict(loaded: object, p: Path) -> dict[str, torch.Tensor]:
    # Original LDM/Lightning checkpoints wrap the weights with bookkeeping (global_step, epoch).
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"does not hold a state dict (found {type(loaded).__name__})", source=p)
    bad = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"is not a flat dict of tensors: {_list(bad)} hold non-tensor values "
            f"(e.g. {type(loaded[bad[0]]).__name__})",
            source=p,
        )
    return dict(loaded)


def apply_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, casting floating tensors to the model's dtypes.

    Missing keys, unexpected keys and shape mismatches are all reported in one
    :class:`WeightsError` that names ``source`` (the file), the keys and the shapes.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if mismatched:
        shown = "; ".join(
            f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}" for k in mismatched[:_SHOW]
        )
        more = f" (and {len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        problems.append(f"{len(mismatched)} shape mismatch(es): {shown}{more}")
    if problems:
        raise WeightsError(
            f"weights do not fit {type(model).__name__}: " + "; ".join(problems), source=source
        )
    # Integer buffers (e.g. position ids) keep their dtype; floating weights follow the model.
    cast = {
        k: v.to(expected[k].dtype) if v.is_floating_point() and expected[k].is_floating_point() else v
        for k, v in state_dict.items()
    }
    # A model built on the meta device (no memory, no random init) takes the loaded tensors as they are.
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(cast, strict=True, assign=on_meta)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` as safetensors, atomically.

    The data goes to a temporary file in the target directory which then replaces ``path`` with
    ``os.replace``, so a failed write leaves neither a half-written file nor a stray temp file,
    and an existing file at ``path`` stays intact.
    """
    p = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError("safetensors metadata must map str to str", source=p)
    tensors = _independent(state_dict, p)
    try:
        with atomic_file(p) as tmp:
            save_file(tensors, str(tmp), metadata=dict(metadata) if metadata is not None else None)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"could not write weights: {exc}", source=p) from None


def _independent(state_dict: Mapping[str, torch.Tensor], p: Path) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (e.g. q/k/v slices of one fused matrix)
    # and non-contiguous ones; give each entry its own contiguous CPU memory.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsError(f"cannot save entry {k!r}: not a str -> Tensor pair", source=p)
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def _list(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return f"{shown} (and {len(keys) - _SHOW} more, {len(keys)} in all)" if len(keys) > _SHOW else shown
