"""The ControlNet model: a trainable copy of the UNet's encoder half that turns a control image into
residuals for the UNet's skip connections and mid block (Zhang et al., arXiv 2302.05543).

It is assembled from the core's UNet building blocks (time embedding, down blocks, mid block), so any
SD 1.x/2.x-family UNet config gives a matching ControlNet; its parameter names are diffusers'
``ControlNetModel`` state-dict keys, so a diffusers ControlNet folder loads without a key map.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence, Tuple, Union

import torch
from pydantic import field_validator
from torch import nn
from torch.nn import functional as F

from diffsteer.models import (
    ConfiguredModel,
    UNet2DConditionModel,
    UNetBackboneConfig,
    build_down_blocks,
    build_mid_block,
    build_time_embedding,
    embed_timestep,
)
from diffsteer.models.embeddings import TimestepLike

__all__ = ["ConditioningEmbedding", "ControlNetConfig", "ControlNetModel", "ControlNetOutput"]

#: (down residuals, mid residual), as the UNet takes them.
ControlNetOutput = Tuple[Tuple[torch.Tensor, ...], torch.Tensor]


class ControlNetConfig(UNetBackboneConfig):
    """A diffusers ``ControlNetModel`` ``config.json``: the UNet backbone plus the control-image encoder.

    The backbone fields must equal those of the UNet it steers (see :meth:`ControlNetModel.check_fits`).
    """

    diffusers_class_name = "ControlNetModel"

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: Literal["rgb", "bgr"] = "rgb"
    #: Widths of the control-image encoder; it downsamples by ``2 ** (len - 1)`` (8 for SD's VAE).
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    #: Average every residual over space (diffusers' shuffle ControlNets); implies guess mode.
    global_pool_conditions: bool = False

    @field_validator("conditioning_embedding_out_channels")
    @classmethod
    def _not_empty(cls, value: Tuple[int, ...]) -> Tuple[int, ...]:
        if not value or any(c < 1 for c in value):
            raise ValueError(f"conditioning_embedding_out_channels must be positive widths, got {value}")
        return value

    @property
    def downscale(self) -> int:
        """Pixels of control image per latent pixel."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet_config: UNetBackboneConfig, **overrides: Any) -> "ControlNetConfig":
        """The ControlNet config that matches ``unet_config`` (overrides set the control-encoder fields)."""
        shared = {name: getattr(unet_config, name) for name in UNetBackboneConfig.model_fields}
        return cls.model_validate({**shared, **overrides})


class ConditioningEmbedding(nn.Module):
    """The small conv encoder that brings a control image to latent resolution (``controlnet_cond_embedding``).

    Per width after the first: a 3x3 conv, then a stride-2 3x3 conv to the next width; SiLU after every
    conv but the last, which starts at zero so a new ControlNet changes nothing.
    """

    def __init__(self, out_channels: int, conditioning_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], kernel_size=3, padding=1)
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.Conv2d(w_in, w_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def _zero_conv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=1)


class ControlNetModel(ConfiguredModel[ControlNetConfig]):
    """ControlNet for SD 1.x/2.x UNets, with diffusers' module names.

    Example:
        >>> from diffsteer.models import UNet2DConditionModel
        >>> unet = UNet2DConditionModel({"block_out_channels": [32, 64], "norm_num_groups": 16,
        ...     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types":
        ...     ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "layers_per_block": 1})
        >>> net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        >>> down, mid = net(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 32), torch.rand(1, 3, 16, 16))
        >>> len(down), float(mid.abs().sum())  # the zero convolutions: a new ControlNet adds nothing
        (4, 0.0)
    """

    config_class = ControlNetConfig

    def __init__(self, config: Union[ControlNetConfig, Mapping[str, Any]]) -> None:
        super().__init__(config)
        config = self.config
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(
            config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        self.time_proj, self.time_embedding = build_time_embedding(config)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = build_down_blocks(config)
        # One zero convolution per UNet skip connection: conv_in's output, each resnet, each downsampler.
        zero = [_zero_conv(channels[0])]
        for i, width in enumerate(channels):
            zero += [_zero_conv(width) for _ in range(config.layers()[i])]
            if i < config.num_blocks - 1:
                zero.append(_zero_conv(width))
        self.controlnet_down_blocks = nn.ModuleList(zero)
        self.controlnet_mid_block = _zero_conv(channels[-1])
        self.mid_block = build_mid_block(config)
        self.zero_init_()

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, *, load_weights_from_unet: bool = True, **config_overrides: Any
    ) -> "ControlNetModel":
        """A new ControlNet for ``unet``: its encoder half copied, the zero convolutions at zero (the paper's init).

        ``config_overrides`` set the control-encoder fields (``conditioning_embedding_out_channels``,
        ``conditioning_channels``, ...).
        """
        net = cls(ControlNetConfig.from_unet(unet.config, **config_overrides))
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net.to(device=unet.device, dtype=unet.dtype)

    @torch.no_grad()
    def zero_init_(self) -> "ControlNetModel":
        """Set every output convolution (and the control encoder's last conv) to zero."""
        for conv in [*self.controlnet_down_blocks, self.controlnet_mid_block, self.controlnet_cond_embedding.conv_out]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        return self

    def fit_problems(self, unet_config: UNetBackboneConfig) -> list[str]:
        """Why this ControlNet cannot steer a UNet of ``unet_config`` (empty when it can)."""
        mine, theirs = self._config, unet_config
        problems = []
        for field in ("in_channels", "block_out_channels"):
            if getattr(mine, field) != getattr(theirs, field):
                problems.append(f"{field} {getattr(mine, field)} but the UNet has {getattr(theirs, field)}")
        if mine.layers() != theirs.layers():
            problems.append(f"layers_per_block {mine.layers()} but the UNet has {theirs.layers()}")
        if mine.cross_attention_dims() != theirs.cross_attention_dims():
            problems.append(
                f"cross_attention_dim {mine.cross_attention_dim} but the UNet has {theirs.cross_attention_dim}"
            )
        return problems

    def forward(
        self,
        sample: torch.Tensor,
        timestep: TimestepLike,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
    ) -> ControlNetOutput:
        """Residuals for the UNet pass on ``sample`` ``(B, 4, h, w)``.

        Args:
            controlnet_cond: control images ``(B, conditioning_channels, h * downscale, w * downscale)``
                in ``[0, 1]``, RGB order.
            conditioning_scale: multiplies every residual.
            guess_mode: scale the residuals from 0.1 (first skip) up to 1 (mid block) on a log scale, as
                the reference implementation's guess mode does.

        Returns:
            ``(down, mid)``: one tensor per UNet skip connection and one for the mid block.
        """
        config = self._config
        if config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = embed_timestep(self.time_proj, self.time_embedding, timestep, sample)
        hint = self.controlnet_cond_embedding(controlnet_cond)
        h = self.conv_in(sample)
        if hint.shape != h.shape:
            raise ValueError(
                f"control image {tuple(controlnet_cond.shape[-2:])} encodes to {tuple(hint.shape[-2:])} but the "
                f"latents are {tuple(h.shape[-2:])}: the control image must be {config.downscale}x the latent size"
            )
        h = h + hint

        skips: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips += block_skips
        h = self.mid_block(h, emb, encoder_hidden_states)

        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)

        if guess_mode and not config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=h.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if config.global_pool_conditions:
            # Expanded back to full size: the UNet refuses to broadcast a residual (see add_residual).
            down = [d.mean(dim=(2, 3), keepdim=True).expand_as(d) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True).expand_as(mid)
        return tuple(down), mid

