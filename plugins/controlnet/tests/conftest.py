"""Test settings of the controlnet plugin and tiny random ControlNets made by diffusers (fixture ``tiny_controlnets``).

The model fixtures (tiny_sd1, tiny_sd2, shapes_pipe) come from diffsteer.testing.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch

# Small tests; one thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: Control-encoder widths for the tiny SD folders, whose VAE downsamples by 2.
TINY_EMBEDDING = (8, 16)


def build_tiny_controlnet(sd_folder: Path, out: Path, seed: int, embedding: tuple = TINY_EMBEDDING) -> Path:
    """A diffusers ControlNetModel for the tiny UNet of ``sd_folder``, saved with ``save_pretrained``.

    Its zero convolutions are perturbed away from zero: a fresh ControlNet adds exactly nothing, which
    would make every comparison pass trivially.
    """
    from diffusers import ControlNetModel as DiffusersControlNet

    unet_config = json.loads((sd_folder / "unet" / "config.json").read_text())
    keep = set(inspect.signature(DiffusersControlNet.__init__).parameters)
    config = {k: v for k, v in unet_config.items() if k in keep and not k.startswith("_")}
    torch.manual_seed(seed)
    net = DiffusersControlNet(**config, conditioning_embedding_out_channels=embedding)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_sd1, tiny_sd2, tmp_path_factory) -> dict:
    """``{("sd1", 0): folder, ("sd1", 1): folder, ("sd2", 0): folder}`` of tiny diffusers ControlNets."""
    root = tmp_path_factory.mktemp("controlnets")
    folders = {"sd1": Path(tiny_sd1), "sd2": Path(tiny_sd2)}
    return {
        (kind, seed): build_tiny_controlnet(folders[kind], root / f"{kind}-{seed}", seed=10 + seed)
        for kind, seed in (("sd1", 0), ("sd1", 1), ("sd2", 0))
    }


def control_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random control images in [0, 1], ``(n, 3, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(scope="session")
def make_control():
    """The :func:`control_images` helper, as a fixture (test modules import nothing from each other)."""
    return control_images


@pytest.fixture(scope="session")
def controlnet_for(tiny_sd1, tmp_path_factory):
    """``controlnet_for(embedding, seed)``: a tiny diffusers ControlNet folder for tiny_sd1 (cached)."""
    root = tmp_path_factory.mktemp("more-controlnets")
    made: dict = {}

    def make(embedding: tuple = TINY_EMBEDDING, seed: int = 0) -> Path:
        key = (tuple(embedding), seed)
        if key not in made:
            made[key] = build_tiny_controlnet(Path(tiny_sd1), root / f"{'-'.join(map(str, embedding))}-{seed}", seed, embedding)
        return made[key]

    return make
