"""diffsteer plugin ``textual-inversion``: new tokens from learned embeddings (Gal et al., arXiv 2208.01618).

Loads diffusers (``learned_embeds.safetensors`` / ``.bin``) and A1111 (``.pt`` / ``.safetensors``) embeddings and
adds their tokens to one call's vocabulary (or a pipeline's, with :func:`load_textual_inversion`); trains new
ones with ``diffsteer train textual-inversion`` (:mod:`diffsteer_textual_inversion.train`).

>>> from diffsteer import Pipeline                                                       # doctest: +SKIP
>>> from diffsteer_textual_inversion import TextualInversion                             # doctest: +SKIP
>>> pipe = Pipeline.from_pretrained("shapes", scheduler="ddim")                          # doctest: +SKIP
>>> ti = TextualInversion(embeddings=["wedge"])     # the shipped <wedge>; or a file    # doctest: +SKIP
>>> pipe("a red <wedge>", plugins=[ti], seed=0)                                          # doctest: +SKIP

The tokens never touch the pipeline's shared tokenizer or text encoder: the core gives each call a token table
(``call.add_tokens``) that its tokenizer and encoder views read, so concurrent calls with different embeddings
are safe, and prompt encoders of other plugins (prompt weighting) see the tokens too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffsteer import Plugin, PluginError, SettingsError, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffsteer import GenerationCall
    from diffsteer.commands import TrainCommand

from .formats import SHIPPED, read_embedding, shipped_embedding, write_embedding

__all__ = ["SHIPPED", "Embedding", "TextualInversion", "TextualInversionSettings", "load_textual_inversion",
           "read_embedding", "shipped_embedding", "write_embedding"]
__version__ = "0.1.0"


class Embedding(BaseModel):
    """One embedding file and, optionally, the token to use for it instead of the one the file names."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="a diffusers or A1111 embedding file, a folder holding learned_embeds.*, or the "
                                   "name of a shipped embedding ('wedge')")
    token: Optional[str] = Field(None, min_length=1, description="the prompt token; None: the file's own")


class TextualInversionSettings(BaseModel):
    """Settings of :class:`TextualInversion`."""

    model_config = ConfigDict(extra="forbid")

    embeddings: list[Embedding] = Field(
        default_factory=list, description="embedding files to add; a plain string or path is a file with its own token"
    )

    @field_validator("embeddings", mode="before")
    @classmethod
    def _paths_are_files(cls, value: Any) -> Any:
        if isinstance(value, (str, Path, dict)):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [{"path": v} if isinstance(v, (str, Path)) else v for v in value]
        return value


class TextualInversion(Plugin):
    """Adds learned tokens to each call it takes part in.

    Args:
        settings: a :class:`TextualInversionSettings` or a mapping of its fields (or give them as keywords).
        tensors: embeddings already in memory, ``{token: (hidden,) or (n, hidden)}``, added after the files
            (not recorded in the image metadata, which holds the settings only).

    Every file is read when the plugin is made, so a bad file fails before any generation. An ``n``-vector token
    ``<x>`` stands for ``<x> <x>_1 ... <x>_{n-1}`` in prompts, as in diffusers.

    Example:
        >>> import torch
        >>> ti = TextualInversion(tensors={"<dot>": torch.zeros(2, 128)})
        >>> ti.tokens
        {'<dot>': 2}

    Raises:
        diffsteer.SettingsError: a setting is malformed (names ``textual-inversion.<field>``).
        diffsteer.PluginError: a file is missing, unsafe or not an embedding; two embeddings share a token.
    """

    name = "textual-inversion"
    contract = "1.1"
    Settings = TextualInversionSettings
    settings: TextualInversionSettings

    def __init__(
        self,
        settings: Union[BaseModel, Mapping[str, Any], None] = None,
        *,
        tensors: Optional[Mapping[str, torch.Tensor]] = None,
        **fields: Any,
    ) -> None:
        super().__init__(settings, **fields)
        loaded: dict[str, torch.Tensor] = {}
        for e in self.settings.embeddings:
            token, vectors = read_embedding(e.path, e.token)
            self._put(loaded, token, vectors, str(e.path))
        for token, vectors in (tensors or {}).items():
            if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
                raise SettingsError(self.name, [("tensors", f"{token!r} must map to a (hidden,) or (n, hidden) tensor")])
            self._put(loaded, token, vectors.detach().float().cpu(), "tensors")
        if not loaded:  # enabled with nothing to add, the plugin would run and change nothing
            raise SettingsError(self.name, [("embeddings", "is empty: give at least one embedding file, e.g. "
                                             "--set textual-inversion.embeddings=learned_embeds.safetensors")])
        #: token -> vectors ``(n, hidden)``, read once; calls only read them.
        self.embeddings = loaded

    def _put(self, loaded: dict[str, torch.Tensor], token: str, vectors: torch.Tensor, source: str) -> None:
        if token in loaded:
            raise PluginError(self.name, f"{source}: token {token!r} is given by two embeddings; pass token=... for one")
        loaded[token] = vectors[None] if vectors.ndim == 1 else vectors

    @property
    def tokens(self) -> dict[str, int]:
        """Each token and its number of vectors."""
        return {t: int(v.shape[0]) for t, v in self.embeddings.items()}

    # tryfirst: before any plugin's setup, whatever the list order, since some (prompt weighting) tokenize the
    # call's prompts in their own setup.
    @hookimpl(tryfirst=True)
    def diffsteer_setup(self, call: "GenerationCall") -> None:
        # Per-call vocabulary: the shared tokenizer and encoder stay as they are (thread-safe), and every prompt
        # encoder of the call (the core's, prompt weighting's) reads these tokens through call.text.
        call.add_tokens(self.name, self.embeddings)

    @staticmethod
    @hookimpl
    def diffsteer_train_commands(register: Callable[["TrainCommand"], None]) -> None:
        from diffsteer.commands import TrainCommand

        from .train import add_arguments, run

        register(TrainCommand("textual-inversion", "learn a new token's embedding from a few images", add_arguments, run))


def load_textual_inversion(pipe: Any, path: Union[str, Path, Mapping[str, torch.Tensor]], token: Optional[str] = None) -> list[str]:
    """Add an embedding to ``pipe`` for good: every later call knows its token, with no plugin.

    ``path`` is a file or folder (any supported layout) or a ``{token: tensor}`` dict; ``token`` overrides the
    file's. The pipeline's models are not changed (the token lives in ``pipe.tokens``). Returns the tokens added.

    Example:
        >>> load_textual_inversion(pipe, "runs/star", token="<star>")   # doctest: +SKIP
        ['<star>']
    """
    if isinstance(path, Mapping):
        items = dict(path) if token is None else {token: v for v in path.values()}
    else:
        found, vectors = read_embedding(path, token)
        items = {found: vectors}
    pipe.add_tokens(items, owner=TextualInversion.name)
    return list(items)

