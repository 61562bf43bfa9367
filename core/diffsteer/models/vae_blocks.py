"""Time-free blocks of the KL autoencoder's encoder and decoder."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


class DownEncoderBlock2D(nn.Module):
    """Resnets, then an optional asymmetric-padding stride-2 ``downsamplers.0``."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups, eps=1e-6)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, out_channels, padding=0)]) if add_downsample else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """Resnets, then an optional nearest-2x ``upsamplers.0``."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups, eps=1e-6)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """``resnets.0 -> attentions.0 -> resnets.1``; the attention is one full-width head over all pixels,
    with its own GroupNorm and a residual connection."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True) -> None:
        super().__init__()
        self.add_attention = add_attention
        resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, groups=groups, eps=1e-6) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [
                Attention(
                    channels,
                    heads=1,
                    dim_head=channels,
                    bias=True,
                    norm_num_groups=groups,
                    eps=1e-6,
                    residual_connection=True,
                )
            ]
            if add_attention
            else []
        )
        # Registered after the attentions so state dicts list keys in the order diffusers' files do.
        self.resnets = resnets

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        if self.add_attention:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states)
