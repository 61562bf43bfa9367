"""Errors of the training loop."""

from __future__ import annotations

from ..errors import DiffsteerError


class TrainingError(DiffsteerError, RuntimeError):
    """Training cannot go on: bad data, a non-finite loss, a checkpoint that does not fit this run."""
