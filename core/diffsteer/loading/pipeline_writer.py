"""Write a pipeline in the diffusers folder layout, atomically (a temp folder renamed into place)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..atomic import atomic_directory
from .weights import save_state_dict

DIFFSTEER_VERSION_KEY = "_diffsteer_version"
#: The model's recommended ``guidance_interval`` (:meth:`diffsteer.Pipeline.__call__`). Keys starting with "_"
#: are metadata to diffusers, so the folder still loads there (diffusers has no such setting and ignores it).
GUIDANCE_INTERVAL_KEY = "_diffsteer_guidance_interval"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` for one of our models."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", model.config.to_diffusers_dict())  # type: ignore[attr-defined]
    save_state_dict(model.state_dict(), folder / "diffusion_pytorch_model.safetensors")


def save_pipeline(
    target: Union[str, os.PathLike],
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict[str, Any],
    guidance_interval: Optional[tuple[float, float]] = None,
) -> Path:
    """Write every part under ``target``; an existing ``target`` is replaced only once all is written.

    ``guidance_interval``, when given, is recorded as the model's recommended one (what calls use by default).
    """
    from .. import __version__

    target = Path(target)
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", DIFFSTEER_VERSION_KEY: __version__}
    if guidance_interval is not None:
        index[GUIDANCE_INTERVAL_KEY] = [float(v) for v in guidance_interval]
    with atomic_directory(target) as tmp:
        write_json(
            tmp / "model_index.json",
            {
                **index,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
        )
        save_model(unet, tmp / "unet")
        save_model(vae, tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A fast tokenizer keeps the truncation/padding of its last call in its state and would write it
            # into tokenizer.json, so the same tokenizer saved before and after use gave different files.
            # Every call sets both again, so clearing them changes no encoding.
            backend.no_truncation()
            backend.no_padding()
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
    return target
