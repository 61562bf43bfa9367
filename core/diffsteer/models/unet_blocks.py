"""The UNet's down, mid and up blocks, and builders that make them from a :class:`UNetBackboneConfig`.

All down blocks share one call signature, and so do all up blocks, so the UNet and a ControlNet trunk can
loop over them without caring which kind each is:

* down: ``block(hidden_states, temb, encoder_hidden_states, additional_residual=None, context=None) -> (out, skips)``
* up: ``block(hidden_states, skips, temb, encoder_hidden_states, upsample_size=None, context=None) -> out``

``context`` (a :class:`~diffsteer.models.context.ForwardContext`) carries the pass's attention processors and
weight patches to every layer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .context import ForwardContext
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import SpatialTransformer
from .unet_config import UNetBackboneConfig, UNetConfig

Skips = Tuple[torch.Tensor, ...]


def add_residual(hidden_states: torch.Tensor, residual: torch.Tensor, what: str) -> torch.Tensor:
    """``hidden_states + residual``, refusing to broadcast: a residual built for another batch layout (say
    for two guidance branches when the UNet runs three) must fail loudly, not be silently spread."""
    if residual.shape != hidden_states.shape:
        raise ValueError(f"{what} has shape {tuple(residual.shape)}, expected {tuple(hidden_states.shape)}")
    return hidden_states + residual


class DownBlock2D(nn.Module):
    """Resnets, then an optional stride-2 ``downsamplers.0``; every intermediate output is a skip."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    groups=groups,
                    eps=eps,
                    dropout=dropout,
                )
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        additional_residual: Optional[torch.Tensor] = None,
        context: Optional[ForwardContext] = None,
    ) -> Tuple[torch.Tensor, Skips]:
        """``additional_residual`` (T2I-Adapter) is added to the block's final output, after downsampling,
        and that sum is also the last skip: the placement diffusers gives resnet-only blocks."""
        skips: Skips = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb, context)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, context)
            skips += (hidden_states,)
        if additional_residual is not None:
            hidden_states = add_residual(hidden_states, additional_residual, "down-block additional residual")
            skips = skips[:-1] + (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(nn.Module):
    """(resnet, spatial transformer) pairs, then an optional ``downsamplers.0``."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        transformer_layers: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    groups=groups,
                    eps=eps,
                    dropout=dropout,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    num_attention_heads,
                    out_channels // num_attention_heads,
                    out_channels,
                    cross_attention_dim,
                    num_layers=transformer_layers,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                    dropout=dropout,
                )
                for _ in range(num_layers)
            ]
        )
        # Registered after the attentions so state dicts list keys in the order diffusers' files do.
        self.resnets = resnets
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        additional_residual: Optional[torch.Tensor] = None,
        context: Optional[ForwardContext] = None,
    ) -> Tuple[torch.Tensor, Skips]:
        """``additional_residual`` (T2I-Adapter) is added after the last (resnet, attention) pair, before
        downsampling, so both that skip and the downsampler see it."""
        skips: Skips = ()
        last = len(self.resnets) - 1
        for i, (resnet, attention) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = attention(resnet(hidden_states, temb, context), encoder_hidden_states, context)
            if i == last and additional_residual is not None:
                hidden_states = add_residual(hidden_states, additional_residual, "down-block additional residual")
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, context)
            skips += (hidden_states,)
        return hidden_states, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnets.0 -> attentions.0 -> resnets.1`` at the lowest resolution."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        transformer_layers: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels,
                    in_channels,
                    temb_channels,
                    groups=groups,
                    eps=eps,
                    dropout=dropout,
                    output_scale_factor=output_scale_factor,
                )
                for _ in range(2)
            ]
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    num_attention_heads,
                    in_channels // num_attention_heads,
                    in_channels,
                    cross_attention_dim,
                    num_layers=transformer_layers,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                    dropout=dropout,
                )
            ]
        )
        # Registered after the attentions so state dicts list keys in the order diffusers' files do.
        self.resnets = resnets

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor],
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb, context)
        hidden_states = self.attentions[0](hidden_states, encoder_hidden_states, context)
        return self.resnets[1](hidden_states, temb, context)


def _up_resnets(
    in_channels: int,
    prev_output_channel: int,
    out_channels: int,
    temb_channels: int,
    num_layers: int,
    groups: int,
    eps: float,
    dropout: float,
) -> nn.ModuleList:
    # Resnet i sees the running features concatenated with one skip; the last skip comes from the block
    # one level further down the encoder, hence the in_channels width.
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        running_channels = prev_output_channel if i == 0 else out_channels
        resnets.append(
            ResnetBlock2D(
                running_channels + skip_channels, out_channels, temb_channels, groups=groups, eps=eps, dropout=dropout
            )
        )
    return nn.ModuleList(resnets)


class UpBlock2D(nn.Module):
    """Resnets over (features ++ skip), then an optional nearest-2x ``upsamplers.0``."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        add_upsample: bool = True,
    ) -> None:
        super().__init__()
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps, dropout
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: Sequence[torch.Tensor],
        temb: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        upsample_size: Optional[Sequence[int]] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        """``skips`` are consumed last-first, one per resnet."""
        for resnet, skip in zip(self.resnets, reversed(skips)):
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb, context)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size, context)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """(resnet over features ++ skip, spatial transformer) pairs, then an optional ``upsamplers.0``."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        transformer_layers: int = 1,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps, dropout
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    num_attention_heads,
                    out_channels // num_attention_heads,
                    out_channels,
                    cross_attention_dim,
                    num_layers=transformer_layers,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                    dropout=dropout,
                )
                for _ in range(num_layers)
            ]
        )
        # Registered after the attentions so state dicts list keys in the order diffusers' files do.
        self.resnets = resnets
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: Sequence[torch.Tensor],
        temb: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        upsample_size: Optional[Sequence[int]] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        """``skips`` are consumed last-first, one per resnet."""
        for resnet, attention, skip in zip(self.resnets, self.attentions, reversed(skips)):
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb, context)
            hidden_states = attention(hidden_states, encoder_hidden_states, context)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size, context)
        return hidden_states


# -- builders ------------------------------------------------------------------------------------------


def build_down_block(config: UNetBackboneConfig, index: int) -> nn.Module:
    """Down block ``index`` of the UNet (or ControlNet trunk) that ``config`` describes."""
    channels = config.block_out_channels
    in_channels = channels[max(index - 1, 0)]
    common = dict(
        in_channels=in_channels,
        out_channels=channels[index],
        temb_channels=config.time_embed_dim,
        num_layers=config.layers()[index],
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        add_downsample=index < config.num_blocks - 1,
        downsample_padding=config.downsample_padding,
    )
    if config.down_block_types[index] == "DownBlock2D":
        return DownBlock2D(**common)  # type: ignore[arg-type]
    return CrossAttnDownBlock2D(
        **common,  # type: ignore[arg-type]
        num_attention_heads=config.heads()[index],
        cross_attention_dim=config.cross_attention_dims()[index],
        transformer_layers=config.transformer_layers()[index],
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
    )


def build_down_blocks(config: UNetBackboneConfig) -> nn.ModuleList:
    """All down blocks, as ``down_blocks``."""
    return nn.ModuleList([build_down_block(config, i) for i in range(config.num_blocks)])


def build_mid_block(config: UNetBackboneConfig) -> UNetMidBlock2DCrossAttn:
    """The mid block, as ``mid_block``; it takes the last down block's heads, width and text dim."""
    return UNetMidBlock2DCrossAttn(
        in_channels=config.block_out_channels[-1],
        temb_channels=config.time_embed_dim,
        num_attention_heads=config.heads()[-1],
        cross_attention_dim=config.cross_attention_dims()[-1],
        transformer_layers=config.transformer_layers()[-1],
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        output_scale_factor=config.mid_block_scale_factor,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
    )


def build_up_block(config: UNetConfig, index: int) -> nn.Module:
    """Up block ``index``: mirrors down block ``n-1-index`` with one extra resnet for its extra skip."""
    n = config.num_blocks
    mirror = n - 1 - index
    channels = config.block_out_channels
    common = dict(
        in_channels=channels[max(mirror - 1, 0)],
        prev_output_channel=channels[min(mirror + 1, n - 1)],
        out_channels=channels[mirror],
        temb_channels=config.time_embed_dim,
        num_layers=config.layers()[mirror] + 1,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        add_upsample=index < n - 1,
    )
    if config.up_block_types[index] == "UpBlock2D":
        return UpBlock2D(**common)  # type: ignore[arg-type]
    return CrossAttnUpBlock2D(
        **common,  # type: ignore[arg-type]
        num_attention_heads=config.heads()[mirror],
        cross_attention_dim=config.cross_attention_dims()[mirror],
        transformer_layers=config.transformer_layers()[mirror],
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
    )


def build_up_blocks(config: UNetConfig) -> nn.ModuleList:
    """All up blocks, as ``up_blocks`` (lowest resolution first)."""
    return nn.ModuleList([build_up_block(config, i) for i in range(config.num_blocks)])
