"""Test settings of the sega plugin, and partner plugins for composition tests (fixture ``partners``).

The model fixtures (tiny_sd1, tiny_sd2, shapes_pipe) come from diffsteer.testing.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from diffsteer import Plugin, hookimpl
from diffsteer.testing import residual_shapes

# Small tests; one thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- partner plugins that stack with SEGA -------------------------------------------------------------------



class Hint(Plugin):
    """A ControlNet stand-in: fixed random per-image residuals on every skip connection and the mid block."""

    name = "hint"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        strength: float = 0.5
        seed: int = 0

    def __init__(self, log=None, **kw):
        super().__init__(**kw)
        self.log = log if log is not None else []

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        state = call.state_for(self)
        if "per_image" not in state:
            g = torch.Generator().manual_seed(self.settings.seed)
            shapes, _ = residual_shapes(call.unet.config, *inputs.sample.shape[-2:])
            state["per_image"] = [
                self.settings.strength * torch.randn(call.batch_size, *s, generator=g) for s in shapes
            ]
        self.log.append(list(inputs.layout.names))
        per_image = state["per_image"]
        residuals = [inputs.layout.repeat(r).to(call.device, call.dtype) for r in per_image]
        inputs.add_residuals(self.name, residuals)


class Push(Plugin):
    """Adds its own guidance branch (a concept push, like the docs' Concept plugin)."""

    name = "push"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str = "green"
        scale: float = 2.0

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        branches.add("push", call.encode_per_image([self.settings.text] * len(call.request.prompts)), owner=self.name)

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        return self.settings.scale * (predictions["push"] - predictions["uncond"])


@pytest.fixture(scope="session")
def partners() -> SimpleNamespace:
    """Plugins from other techniques' families, to stack with SEGA (tests import nothing from each other)."""
    return SimpleNamespace(Hint=Hint, Push=Push)
