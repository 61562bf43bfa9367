"""Errors raised while reading, converting or applying model weights."""

from __future__ import annotations

import os

from diffsteer.errors import DiffsteerError

__all__ = ["ModelLoadError", "WeightsError"]


class ModelLoadError(DiffsteerError, ValueError):
    """Base class for every error diffsteer raises while loading a model."""


class WeightsError(ModelLoadError):
    """A weights file or state dict cannot be used: unreadable, unsafe, or not matching the model.

    ``source`` is the file (or a description of the in-memory state dict) the problem is about;
    the message always names it, so a user with several checkpoints knows which one is bad.
    """

    def __init__(self, message: str, *, source: str | os.PathLike[str] | None = None) -> None:
        self.source = None if source is None else str(source)
        if self.source is not None and self.source not in message:
            message = f"{self.source}: {message}"
        super().__init__(message)
