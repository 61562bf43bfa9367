"""Resolve a model reference (folder, hub id, ``"shapes"``) and load its parts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import ValidationError
from transformers import CLIPTextModel, CLIPTokenizer

from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from .errors import ModelLoadError
from .weights import apply_state_dict, load_state_dict

#: Name of the model shipped inside the package (see docs/shapes-model.md).
SHAPES = "shapes"
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HUB_PATTERNS = [
    "model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


@dataclass
class PipelineParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    name: str
    #: the model's recommended guidance interval (``model_index.json``), else guidance at every step.
    guidance_interval: tuple[float, float] = (0.0, 1.0)


def shipped_model_dir(name: str = SHAPES) -> Path:
    """Folder of a model shipped as package data."""
    return Path(__file__).resolve().parent.parent / "data" / name


def resolve_model(model: Union[str, os.PathLike]) -> Path:
    """A local folder for ``model``: an existing folder, the shipped shapes model, or a hub snapshot.

    A local folder named like the shipped model takes precedence over it. Hub ids resolve online, or
    from the local hub cache when offline (``HF_HUB_OFFLINE=1`` or no network).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise ModelLoadError(
            f"{path}: is a file; load single-file checkpoints with Pipeline.from_single_file"
        )
    if str(model) == SHAPES:
        shipped = shipped_model_dir()
        if (shipped / "model_index.json").is_file():
            return shipped
        raise ModelLoadError(f"the shapes model is not shipped in this install (looked in {shipped})")
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelLoadError(f"{text}: no such folder, and not a hub id of the form 'owner/name'")
    return _hub_snapshot(text)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as online:  # offline mode, no network or unknown repo: try the cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"{repo_id}: not in the local hub cache, and it could not be downloaded "
                f"({type(online).__name__}: {online})"
            ) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_NAMES)})")


def _config_problem(exc: ValueError) -> str:
    """One line per problem, without pydantic's boilerplate."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return str(exc)


def build_model(cls: Any, config: Any, state_dict: dict, *, config_source: str, weights_source: str,
                dtype: torch.dtype, device: Union[str, torch.device]) -> Any:
    """Build ``cls`` from ``config`` and load ``state_dict`` strictly."""
    try:
        # Built on the meta device: no memory and no random init (seconds at SD size) before loading.
        with torch.device("meta"):
            model = cls.from_config(config)
    except ValueError as exc:
        raise ModelLoadError(f"{config_source}: {_config_problem(exc)}") from None
    apply_state_dict(model, state_dict, source=weights_source)
    return model.to(device=device, dtype=dtype).eval()


def load_model(cls: Any, folder: Path, dtype: torch.dtype, device: Union[str, torch.device]) -> Any:
    """Build ``cls`` from ``folder/config.json`` and load its weights strictly."""
    config = _read_json(folder / "config.json")
    weights = _weights_file(folder)
    return build_model(
        cls, config, load_state_dict(weights), config_source=str(folder / "config.json"),
        weights_source=str(weights), dtype=dtype, device=device,
    )


def default_vae_dtype(torch_dtype: torch.dtype, vae_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The VAE's dtype for a pipeline loaded in ``torch_dtype``, unless ``vae_dtype`` says otherwise.

    float16 keeps the VAE in float32: SD's decoder activations overflow float16's range (NaN images).
    bfloat16 has float32's range, and its decode is visually identical: 54.4 dB PSNR against a float32
    decode of the same latents on the shapes model, no pixel off by more than 10/255. So the VAE
    follows bfloat16, as diffusers does, and keeps a bf16 call from paying for a float32 decode.
    """
    if vae_dtype is not None:
        return vae_dtype
    return torch.float32 if torch_dtype == torch.float16 else torch_dtype


def load_pipeline_parts(
    model: Union[str, os.PathLike], *, torch_dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu", vae_dtype: Optional[torch.dtype] = None,
) -> PipelineParts:
    """Load every part of a diffusers-format pipeline folder (or what ``model`` resolves to)."""
    root = resolve_model(model)
    interval = _guidance_interval(root / "model_index.json", _read_json(root / "model_index.json"))
    unet = load_model(UNet2DConditionModel, root / "unet", torch_dtype, device)
    vae = load_model(AutoencoderKL, root / "vae", default_vae_dtype(torch_dtype, vae_dtype), device)
    te_dir = root / "text_encoder"
    if not (te_dir / "config.json").is_file():
        raise ModelLoadError(f"{te_dir / 'config.json'}: missing")
    try:
        text_encoder = CLIPTextModel.from_pretrained(te_dir, dtype=torch_dtype).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{root}: cannot load the text encoder or tokenizer: {exc}") from None
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")
    name = SHAPES if root == shipped_model_dir() else str(model)
    return PipelineParts(unet, vae, text_encoder, tokenizer, scheduler_config, name, interval)


def _guidance_interval(path: Path, index: dict[str, Any]) -> tuple[float, float]:
    from ..errors import RequestError
    from ..request_checks import check_guidance_interval
    from .pipeline_writer import GUIDANCE_INTERVAL_KEY

    if GUIDANCE_INTERVAL_KEY not in index:
        return (0.0, 1.0)
    try:
        return check_guidance_interval(index[GUIDANCE_INTERVAL_KEY], GUIDANCE_INTERVAL_KEY)
    except RequestError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


#: The scheduler that SD 1.x/2.x checkpoints were trained with (what their diffusers folders ship).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}


def load_single_file_parts(
    path: Union[str, os.PathLike], *, tokenizer: Union[str, os.PathLike, CLIPTokenizer],
    prediction_type: Optional[str] = None, torch_dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu", vae_dtype: Optional[torch.dtype] = None,
) -> PipelineParts:
    """Load an original-layout (A1111/civitai) checkpoint; it carries no tokenizer, so one is passed."""
    from transformers import CLIPTextConfig

    from .single_file import load_single_file
    from .single_file_clip import align_text_encoder_keys

    if not isinstance(tokenizer, CLIPTokenizer):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{tokenizer}: cannot load a CLIP tokenizer ({exc})") from None
    source = str(path)
    info, parts = load_single_file(path, prediction_type=prediction_type)  # type: ignore[arg-type]
    unet = build_model(UNet2DConditionModel, info.unet_config, parts["unet"], config_source=source,
                       weights_source=source, dtype=torch_dtype, device=device)
    vae = build_model(AutoencoderKL, info.vae_config, parts["vae"], config_source=source,
                      weights_source=source, dtype=default_vae_dtype(torch_dtype, vae_dtype), device=device)
    # Not on the meta device: CLIP keeps non-persistent buffers (position ids) outside its state dict.
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # the file cannot say; the tokenizer can
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**(info.text_encoder_config or {}), **special}))
    apply_state_dict(text_encoder, align_text_encoder_keys(parts["text_encoder"], text_encoder), source=source)
    text_encoder = text_encoder.to(device=device, dtype=torch_dtype).eval()
    scheduler_config = {**SD_SCHEDULER_CONFIG, "prediction_type": info.prediction_type}
    return PipelineParts(unet, vae, text_encoder, tokenizer, scheduler_config, source)
