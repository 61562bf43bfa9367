"""pytest fixtures of the diffsteer fixture kit (see :mod:`diffsteer.testing`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x-like model folder (epsilon, 32x32 images)."""
    from . import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny"), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 2.x-like model folder (v-prediction, zero terminal SNR, linear projections)."""
    from . import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny"), "sd2")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd1: Path) -> Any:
    """A diffsteer Pipeline on ``tiny_sd1`` with DDIM."""
    from diffsteer.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")


@functools.lru_cache(maxsize=1)
def _shipped_pipeline() -> Any:
    from diffsteer.pipeline import Pipeline

    return Pipeline.from_pretrained("shapes")  # the model folder's own sampler and guidance interval


@functools.lru_cache(maxsize=1)
def _shapes_pipeline() -> Any:
    return _shipped_pipeline().with_scheduler("ddim")


@pytest.fixture(scope="session")
def shapes_pipe() -> Any:
    """The shipped shapes model with DDIM: deterministic, the sampler every plugin figure was calibrated with."""
    return _shapes_pipeline()


@pytest.fixture(scope="session")
def shapes_pipe_shipped() -> Any:
    """The shapes model as a user gets it: its own sampler (Euler ancestral) and guidance interval, sharing
    ``shapes_pipe``'s weights."""
    return _shipped_pipeline()


@pytest.fixture(scope="session")
def shapes_pipe_every_step() -> Any:
    """The shapes model guided at every step (``guidance_interval=(0, 1)``), sharing ``shapes_pipe``'s weights.

    The plugins' semantic figures were calibrated so, before the model recommended its guidance interval (no
    guidance above t = 600), under which effects that steer the layout act on fewer seeds (docs/shapes-model.md).
    """
    # Not built on the shapes_pipe fixture: a test module may override that name with this fixture.
    pipe = _shapes_pipeline().with_scheduler("ddim")
    pipe.guidance_interval = (0.0, 1.0)
    return pipe


def pytest_configure(config: pytest.Config) -> None:
    # Plugin suites mark their long semantic tests; registered here so a suite run from its own folder knows it.
    config.addinivalue_line("markers", "slow: long-running semantic or training tests")
