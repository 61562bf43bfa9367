"""Single-file Stable Diffusion checkpoints (the original LDM / A1111 / civitai layout), SD 1.x and 2.x.

Reading: :func:`load_single_file` (or :func:`detect_single_file` + :func:`split_single_file`) turns
one ``model.diffusion_model.* / first_stage_model.* / cond_stage_model.*`` dict into diffusers-named
UNet, VAE and text-encoder state dicts plus configs read from the tensor shapes.
Writing: :func:`to_single_file` / :func:`write_single_file` do the reverse.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffsteer.loading.errors import WeightsError
from diffsteer.loading.single_file_clip import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    TextEncoderLayout,
    clip_to_diffusers,
    clip_to_original,
    open_clip_to_diffusers,
    open_clip_to_original,
    text_encoder_config,
)
from diffsteer.loading.single_file_common import indices, require, show_keys, strip_prefix
from diffsteer.loading.single_file_unet import UNET_PREFIX, infer_unet_structure, unet_to_diffusers, unet_to_original
from diffsteer.loading.single_file_vae import VAE_PREFIX, infer_vae_structure, vae_to_diffusers, vae_to_original
from diffsteer.loading.weights import load_state_dict, save_state_dict

__all__ = [
    "COMPONENTS",
    "SingleFileInfo",
    "detect_single_file",
    "load_single_file",
    "split_single_file",
    "to_single_file",
    "write_single_file",
]

Component = Literal["unet", "vae", "text_encoder"]
COMPONENTS: tuple[Component, ...] = ("unet", "vae", "text_encoder")
PredictionType = Literal["epsilon", "v_prediction"]

_MEMORY = "<single-file state dict>"

# Training-time entries of LDM checkpoints that no inference component uses: the noise-schedule
# buffers of LatentDiffusion (recomputed by our schedulers), EMA copies and the VAE's GAN loss.
_IGNORED_KEYS = frozenset(
    {
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "betas",
        "log_one_minus_alphas_cumprod",
        "logvar",
        "lvlb_weights",
        "model_ema.decay",
        "model_ema.num_updates",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_variance",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    }
)
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": (UNET_PREFIX,),
    "vae": (VAE_PREFIX,),
    "text_encoder": (CLIP_PREFIX, OPEN_CLIP_PREFIX),
}


@dataclass(frozen=True)
class SingleFileInfo:
    """What a single-file checkpoint is, and the diffusers-style configs to build its models.

    ``prediction_type_known`` is False when the prediction type is a default rather than a fact:
    an SD 2.x 768 checkpoint (v-prediction) and a 512 base one (epsilon) have identical shapes.
    """

    version: Literal["sd1", "sd2"]
    in_channels: int
    prediction_type: PredictionType
    prediction_type_known: bool
    image_size: int
    text_encoder_layout: TextEncoderLayout | None
    unet_config: dict[str, Any]
    vae_config: dict[str, Any] | None
    text_encoder_config: dict[str, Any] | None
    components: tuple[Component, ...] = field(default=COMPONENTS)

    @property
    def is_inpainting(self) -> bool:
        """The 9-channel inpainting UNet (latents + mask + masked-image latents)."""
        return self.in_channels == 9


def detect_single_file(
    state_dict: Mapping[str, torch.Tensor],
    *,
    prediction_type: PredictionType | None = None,
    image_size: int | None = None,
    source: str = _MEMORY,
) -> SingleFileInfo:
    """Infer SD version, channels and the UNet / VAE / text-encoder configs from tensor shapes.

    SD 1.x vs 2.x comes from the text encoder (CLIP vs OpenCLIP), or without one from the UNet's
    cross-attention width. ``prediction_type`` cannot be read from an SD 2.x file: pass it
    (``"v_prediction"`` for the 768 models); otherwise ``"epsilon"`` is assumed and
    ``prediction_type_known`` is False. ``image_size`` defaults to 512 (768 for SD 2.x v-prediction).
    """
    _refuse_unsupported(state_dict, source)
    unet_sd = strip_prefix(state_dict, UNET_PREFIX)
    if not unet_sd:
        raise WeightsError(f"no UNet weights (no {UNET_PREFIX}* keys): not an SD single-file checkpoint", source=source)
    structure = infer_unet_structure(unet_sd, source=source)

    layout: TextEncoderLayout | None = None
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict):
        layout = "open_clip"
    elif any(k.startswith(CLIP_PREFIX) for k in state_dict):
        layout = "clip"
    if layout is not None:
        version: Literal["sd1", "sd2"] = "sd2" if layout == "open_clip" else "sd1"
    else:
        version = "sd2" if structure["cross_attention_dim"] == 1024 or structure["use_linear_projection"] else "sd1"

    known = prediction_type is not None or version == "sd1"
    prediction: PredictionType = prediction_type or "epsilon"
    if prediction not in ("epsilon", "v_prediction"):
        raise WeightsError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction!r}", source=source)
    size = image_size or (768 if version == "sd2" and prediction == "v_prediction" else 512)

    vae_sd = strip_prefix({k: v for k, v in state_dict.items() if _owner(k) == "vae"}, VAE_PREFIX)
    vae_config = None
    vae_scale = 8
    if vae_sd:
        vae_config = infer_vae_structure(vae_sd, source=source)
        vae_config.update(sample_size=size, scaling_factor=0.18215)
        vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)

    channels = structure["block_out_channels"]
    # Head counts are not in the shapes: SD 1.x uses 8 heads everywhere, SD 2.x 64-wide heads
    # (diffusers' config calls the head count "attention_head_dim").
    heads: int | list[int] = 8 if version == "sd1" else [max(1, c // 64) for c in channels]
    unet_config = {
        "sample_size": size // vae_scale,
        **structure,
        "attention_head_dim": heads,
        # SD 2.1-v computes attention in fp32 (diffusers' stable-diffusion-2-1 config).
        "upcast_attention": version == "sd2" and prediction == "v_prediction",
    }

    te_config = None
    if layout is not None:
        te_sd = _convert_text_encoder(state_dict, layout, source)
        te_config = text_encoder_config(te_sd, layout)

    present = tuple(
        c for c, ok in zip(COMPONENTS, (True, vae_config is not None, layout is not None), strict=True) if ok
    )
    return SingleFileInfo(
        version=version,
        in_channels=structure["in_channels"],
        prediction_type=prediction,
        prediction_type_known=known,
        image_size=size,
        text_encoder_layout=layout,
        unet_config=unet_config,
        vae_config=vae_config,
        text_encoder_config=te_config,
        components=present,
    )


def split_single_file(
    state_dict: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    components: Sequence[Component] = COMPONENTS,
    source: str = _MEMORY,
    strict: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an original-layout checkpoint into diffusers-named state dicts, keyed by component.

    Configs default to those read from the shapes (only the structural fields are used).
    Every requested component must be present. With ``strict`` any key that belongs to no
    component and is not known training bookkeeping (noise-schedule buffers, EMA, VAE loss)
    raises :class:`WeightsError` naming ``source`` and the keys.
    """
    _refuse_unsupported(state_dict, source)
    wanted = set(components)
    if not wanted <= set(COMPONENTS):
        unknown = sorted(wanted - set(COMPONENTS))
        raise WeightsError(f"unknown components {unknown}; choose from {COMPONENTS}", source=source)
    if strict:
        stray = [k for k in state_dict if _owner(k) is None]
        if stray:
            raise WeightsError(f"unknown keys (not UNet, VAE or text encoder): {show_keys(stray)}", source=source)

    out: dict[str, dict[str, torch.Tensor]] = {}
    if "unet" in wanted:
        unet_sd = _component(state_dict, "unet", source)
        config = unet_config if unet_config is not None else infer_unet_structure(unet_sd, source=source)
        out["unet"] = unet_to_diffusers(unet_sd, config, source=source)
    if "vae" in wanted:
        vae_sd = _component(state_dict, "vae", source)
        config = vae_config if vae_config is not None else infer_vae_structure(vae_sd, source=source)
        out["vae"] = vae_to_diffusers(vae_sd, config, source=source)
    if "text_encoder" in wanted:
        _component(state_dict, "text_encoder", source)  # presence check with a clear message
        layout: TextEncoderLayout = (
            "open_clip" if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict) else "clip"
        )
        out["text_encoder"] = _convert_text_encoder(state_dict, layout, source)
    return out


def load_single_file(
    path: str | os.PathLike[str],
    *,
    prediction_type: PredictionType | None = None,
    image_size: int | None = None,
    components: Sequence[Component] = COMPONENTS,
    strict: bool = True,
) -> tuple[SingleFileInfo, dict[str, dict[str, torch.Tensor]]]:
    """Read a single-file checkpoint: its :class:`SingleFileInfo` and diffusers-named state dicts."""
    source = str(path)
    state_dict = load_state_dict(path)
    info = detect_single_file(state_dict, prediction_type=prediction_type, image_size=image_size, source=source)
    parts = split_single_file(
        state_dict,
        unet_config=info.unet_config,
        vae_config=info.vae_config,
        components=components,
        source=source,
        strict=strict,
    )
    return info, parts


def to_single_file(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor] | None,
    text_encoder_sd: Mapping[str, torch.Tensor] | None,
    unet_config: Mapping[str, Any],
    *,
    vae_config: Mapping[str, Any] | None = None,
    text_encoder_layout: TextEncoderLayout | None = None,
    pad_open_clip: bool = True,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Assemble diffusers-named state dicts into one original-layout (LDM) checkpoint dict.

    ``text_encoder_layout`` defaults to OpenCLIP for SD 2.x-style UNets (``use_linear_projection``)
    and CLIP otherwise. ``pad_open_clip`` writes back the final OpenCLIP block that SD 2.x never
    runs (as an identity block; see :func:`open_clip_to_original`). ``extra`` entries (e.g.
    schedule buffers) are copied verbatim and must not collide with converted keys.
    ``vae_config`` defaults to one read from ``vae_sd``'s keys.
    """
    out = unet_to_original(unet_sd, unet_config, source="UNet state dict")
    if vae_sd is not None:
        config = vae_config if vae_config is not None else _vae_structure_from_diffusers(vae_sd)
        out.update(vae_to_original(vae_sd, config, source="VAE state dict"))
    if text_encoder_sd is not None:
        layout = text_encoder_layout or ("open_clip" if unet_config.get("use_linear_projection") else "clip")
        if layout == "open_clip":
            out.update(open_clip_to_original(text_encoder_sd, source="text encoder state dict", pad=pad_open_clip))
        elif layout == "clip":
            out.update(clip_to_original(text_encoder_sd, source="text encoder state dict"))
        else:
            raise WeightsError(
                f"text_encoder_layout must be 'clip' or 'open_clip', got {layout!r}", source="to_single_file"
            )
    for key, value in (extra or {}).items():
        if key in out:
            raise WeightsError(f"extra key {key!r} collides with a converted weight", source="to_single_file")
        out[key] = value
    return out


def write_single_file(
    path: str | os.PathLike[str],
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor] | None,
    text_encoder_sd: Mapping[str, torch.Tensor] | None,
    unet_config: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
    **options: Any,
) -> None:
    """:func:`to_single_file`, then an atomic safetensors write to ``path`` (``options`` go to the former)."""
    if Path(path).suffix.lower() != ".safetensors":
        raise WeightsError("single files are written as .safetensors only", source=str(path))
    checkpoint = to_single_file(unet_sd, vae_sd, text_encoder_sd, unet_config, **options)
    save_state_dict(checkpoint, path, metadata=metadata)


def _convert_text_encoder(
    state_dict: Mapping[str, torch.Tensor], layout: TextEncoderLayout, source: str
) -> dict[str, torch.Tensor]:
    if layout == "open_clip":
        return open_clip_to_diffusers(strip_prefix(state_dict, OPEN_CLIP_PREFIX), source=source)
    return clip_to_diffusers(strip_prefix(state_dict, CLIP_PREFIX), source=source)


def _owner(key: str) -> str | None:
    if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
        return "ignored"
    for name, prefixes in _COMPONENT_PREFIXES.items():
        if key.startswith(prefixes):
            return name
    return None


def _component(state_dict: Mapping[str, torch.Tensor], name: Component, source: str) -> dict[str, torch.Tensor]:
    prefixes = _COMPONENT_PREFIXES[name]
    part = {k: v for k, v in state_dict.items() if k.startswith(prefixes) and _owner(k) == name}
    if not part:
        raise WeightsError(f"missing component {name}: no {' or '.join(p + '*' for p in prefixes)} keys", source=source)
    if name == "text_encoder":
        return part
    return strip_prefix(part, prefixes[0])


def _refuse_unsupported(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    # Give the families we know but do not handle a targeted message instead of a wall of unknown keys.
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise WeightsError("this is an SDXL checkpoint; only SD 1.x / 2.x single files are supported", source=source)
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in state_dict):
        raise WeightsError(
            "UNet has class/label embeddings (SDXL or upscaler); only SD 1.x / 2.x are supported", source=source
        )


def _vae_structure_from_diffusers(vae_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    levels = indices(vae_sd, "encoder.down_blocks.")
    if not levels:
        raise WeightsError("missing keys: no encoder.down_blocks.* entries", source="VAE state dict")
    channels = [
        int(require(vae_sd, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", source="VAE state dict").shape[0])
        for i in levels
    ]
    return {"block_out_channels": channels, "layers_per_block": len(indices(vae_sd, "encoder.down_blocks.0.resnets."))}
