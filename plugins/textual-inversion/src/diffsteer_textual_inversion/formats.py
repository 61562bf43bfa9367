"""Embedding files: diffusers (``learned_embeds.safetensors`` / ``.bin``) and A1111 (``.pt`` / ``.safetensors``).

Layouts read:

* diffusers: one entry ``{token: (hidden,) or (n, hidden)}`` (safetensors, or a ``torch.save`` pickle);
* A1111 ``.pt``: ``{"string_to_param": {"*": (n, hidden)}, "name": token, ...}`` (read with ``weights_only=True``);
* A1111 ``.safetensors``: ``{"emb_params": (n, hidden)}``; the token is the file name without its suffix,
  as A1111 uses it.

A folder stands for the ``learned_embeds.safetensors`` (else ``learned_embeds.bin``) inside it; a bare name
with no suffix that is not a file here (``"wedge"``) is an embedding shipped with the plugin (``SHIPPED``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from diffsteer import PluginError
from diffsteer.loading.errors import WeightsError
from diffsteer.loading.weights import load_pickle, load_state_dict, save_state_dict

PLUGIN = "textual-inversion"
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
PathLike = Union[str, "os.PathLike[str]"]
DATA = Path(__file__).resolve().parent / "data"
#: Embeddings shipped with the plugin, by short name (``data/<name>.safetensors``, diffusers layout):
#: ``"wedge"`` is the token ``<wedge>``, learned on the shipped shapes model (data/README.md says how).
SHIPPED = ("wedge",)


def shipped_embedding(name: str) -> Path:
    """File of a shipped embedding; a :class:`diffsteer.PluginError` lists the names for an unknown one."""
    path = DATA / f"{name}.safetensors"
    if name not in SHIPPED or not path.is_file():
        have = [n for n in SHIPPED if (DATA / f"{n}.safetensors").is_file()]
        raise PluginError(PLUGIN, f"{name}: embedding file not found, and no shipped embedding has that name "
                                  f"(shipped: {', '.join(have) or 'none'})")
    return path


def embedding_file(path: PathLike) -> Path:
    """The embedding file ``path`` names (a folder gives its ``learned_embeds.*``, a shipped name its file)."""
    p = Path(path)
    if len(p.parts) == 1 and not p.suffix and not p.exists():
        return shipped_embedding(p.name)
    if p.is_dir():
        for name in DIFFUSERS_FILES:
            if (p / name).is_file():
                return p / name
        raise PluginError(PLUGIN, f"{p}: folder has no {' or '.join(DIFFUSERS_FILES)}")
    if not p.is_file():
        raise PluginError(PLUGIN, f"{p}: embedding file not found")
    return p


def _read(p: Path) -> object:
    try:
        if p.suffix.lower() == ".safetensors":
            return load_state_dict(p)
        return load_pickle(p)
    except WeightsError as exc:
        raise PluginError(PLUGIN, str(exc)) from None


def read_embedding(path: PathLike, token: Optional[str] = None) -> tuple[str, torch.Tensor]:
    """``(token, vectors (n, hidden))`` of an embedding file in any supported layout.

    ``token`` overrides the token the file names. Raises :class:`diffsteer.PluginError` naming the file
    for an unreadable, unsafe or unrecognised file.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> write_embedding(folder + "/learned_embeds.safetensors", "<cat>", torch.ones(2, 8))
        >>> name, vectors = read_embedding(folder)
        >>> name, tuple(vectors.shape)
        ('<cat>', (2, 8))
    """
    p = embedding_file(path)
    data = _read(p)
    if not isinstance(data, Mapping):
        if isinstance(data, torch.Tensor) and token is not None:
            found, vectors = token, data  # a bare tensor (diffusers accepts it too when given a token)
        else:
            raise PluginError(PLUGIN, f"{p}: holds a {type(data).__name__}, not an embedding dict")
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise PluginError(PLUGIN, f"{p}: A1111 embedding without string_to_param['*']")
        vectors = params["*"]
        name = data.get("name")
        found = name if isinstance(name, str) and name else p.stem
    elif "emb_params" in data and len(data) == 1:
        found, vectors = p.stem, data["emb_params"]
    elif len(data) == 1:
        found, vectors = next(iter(data.items()))
    else:
        keys = ", ".join(sorted(map(str, data))[:6])
        raise PluginError(
            PLUGIN,
            f"{p}: not an embedding file: expected one {{token: tensor}} entry (diffusers), string_to_param "
            f"(A1111 .pt) or emb_params (A1111 .safetensors), found keys {keys}",
        )
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        what = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise PluginError(PLUGIN, f"{p}: the embedding must be a float (hidden,) or (n, hidden) tensor, got {what}")
    vectors = vectors.detach().float().cpu()
    return (token or str(found)), (vectors[None] if vectors.ndim == 1 else vectors)


def write_embedding(path: PathLike, token: str, vectors: torch.Tensor) -> None:
    """Write ``{token: (n, hidden)}`` as diffusers does (safetensors, atomically)."""
    vectors = vectors.detach().float().cpu().contiguous()
    save_state_dict({token: vectors[None] if vectors.ndim == 1 else vectors}, path)
