"""The VAE's latent space: its downscale factor and encoding/decoding with the scaling and shift factors.

One place for what the pipeline, the generation call (``call.encode_images``), plugins and the training
commands would otherwise each recompute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .models.vae import AutoencoderKL


def vae_scale_factor(vae: "AutoencoderKL") -> int:
    """How many pixels one latent cell spans per side (8 for SD): each VAE block but the last halves."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae: "AutoencoderKL") -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def to_latent_space(vae: "AutoencoderKL", z: torch.Tensor) -> torch.Tensor:
    """Scale raw VAE latents ``z`` into the space the UNet denoises: ``(z - shift) * scaling``."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def encode_images(
    vae: "AutoencoderKL", pixels: torch.Tensor, *, generator: Optional[torch.Generator] = None, sample: bool = True
) -> torch.Tensor:
    """Float32 scaled latents of ``[-1, 1]`` images ``(batch, 3, H, W)``.

    ``sample=True`` draws from the VAE posterior with ``generator`` (img2img, as diffusers does);
    ``sample=False`` takes its mean (training data, control images).
    """
    dist = vae.encode(pixels.to(vae.device, vae.dtype))
    z = dist.sample(generator=generator) if sample else dist.mean
    return to_latent_space(vae, z.float())


def decode_latents(vae: "AutoencoderKL", latents: torch.Tensor) -> torch.Tensor:
    """Float32 ``[-1, 1]`` images from scaled latents."""
    z = latents / vae.config.scaling_factor + _shift(vae)
    return vae.decode(z.to(vae.device, vae.dtype)).float()
