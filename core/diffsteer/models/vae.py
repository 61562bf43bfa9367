"""The KL autoencoder (SD's VAE): images to a diagonal-Gaussian latent and latents back to images."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import torch
from pydantic import field_validator, model_validator
from torch import nn

from .attention import name_attention_layers
from .configured import ConfiguredModel
from .config_utils import DiffusersConfig, reject_unsupported
from .random import Generators, randn_tensor
from .vae_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D


class AutoencoderKLConfig(DiffusersConfig):
    """The diffusers ``vae/config.json`` of an ``AutoencoderKL``."""

    diffusers_class_name = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, int]] = 32
    #: Latents enter the UNet as ``(z - shift_factor) * scaling_factor``.
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    #: A hint for pipelines: this VAE overflows in fp16 and should run in float32.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        reject_unsupported(cls.diffusers_class_name or cls.__name__, data, {"act_fn": ("silu", "swish")})
        return data

    @field_validator("down_block_types", "up_block_types")
    @classmethod
    def _known_blocks(cls, value: Tuple[str, ...], info: Any) -> Tuple[str, ...]:
        known = "DownEncoderBlock2D" if info.field_name == "down_block_types" else "UpDecoderBlock2D"
        for i, block_type in enumerate(value):
            if block_type != known:
                raise ValueError(f"{info.field_name}[{i}]={block_type!r} is not supported (supported: {known})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "AutoencoderKLConfig":
        n = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries but block_out_channels has {n}")
        return self


class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))`` per latent element.

    ``logvar`` is clamped to ``[-30, 20]`` so ``std`` neither underflows nor overflows.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps`` from :func:`~diffsteer.models.random.randn_tensor`."""
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class Encoder(nn.Module):
    """Image to posterior parameters ``(B, 2 * latent_channels, H / 2**(n-1), W / 2**(n-1))``."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block,
                    groups,
                    add_downsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, add_attention=config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latent to image; up blocks have one more resnet than the encoder's down blocks."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        reversed_channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, reversed_channels[0], kernel_size=3, padding=1)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    config.layers_per_block + 1,
                    groups,
                    add_upsample=i < len(reversed_channels) - 1,
                )
                for i in range(len(reversed_channels))
            ]
        )
        # Built after up_blocks, as diffusers registers them, so state-dict key order matches.
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, add_attention=config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, reversed_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(reversed_channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class AutoencoderKL(ConfiguredModel[AutoencoderKLConfig]):
    """SD's VAE with diffusers' module names (``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``).

    ``encode`` and ``decode`` work on unscaled latents; scaling by ``config.scaling_factor`` (and
    ``shift_factor``) is the caller's job, as in diffusers.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: Union[AutoencoderKLConfig, Mapping[str, Any]]) -> None:
        super().__init__(config)
        config = self.config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if config.use_post_quant_conv else None
        self._attention_layers = name_attention_layers(self)

    def attention_layers(self) -> list[str]:
        """Module paths of the (mid-block) attention layers."""
        return list(self._attention_layers)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents for ``images`` in ``[-1, 1]``, shape ``(B, in_channels, H, W)``."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (roughly ``[-1, 1]``) for unscaled ``latents`` ``(B, latent_channels, h, w)``."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(
        self, images: torch.Tensor, sample_posterior: bool = False, generator: Generators = None
    ) -> torch.Tensor:
        """Reconstruct ``images`` through the posterior mode (or a sample of it)."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents)
