"""Residual conv block and the 2x down/up-samplers shared by the UNet, the VAE and ControlNet."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .context import ForwardContext, conv, linear


class ResnetBlock2D(nn.Module):
    """``GroupNorm -> SiLU -> conv`` twice, with the time embedding added between, plus a skip path.

    ``temb_channels=None`` builds the time-free variant the VAE uses. The skip is a 1x1 ``conv_shortcut``
    only when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        temb_channels: Optional[int] = 512,
        groups: int = 32,
        groups_out: Optional[int] = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(
        self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None, context: Optional[ForwardContext] = None
    ) -> torch.Tensor:
        hidden = conv(self.conv1, self.nonlinearity(self.norm1(input_tensor)), context)
        if self.time_emb_proj is not None and temb is not None:
            hidden = hidden + linear(self.time_emb_proj, self.nonlinearity(temb), context)[:, :, None, None]
        hidden = conv(self.conv2, self.dropout(self.nonlinearity(self.norm2(hidden))), context)
        skip = input_tensor if self.conv_shortcut is None else conv(self.conv_shortcut, input_tensor, context)
        out = skip + hidden
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (``conv``).

    ``padding=0`` is the VAE encoder's asymmetric variant: pad one pixel right and bottom, then convolve.
    """

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return conv(self.conv, hidden_states, context)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to ``output_size``) followed by a 3x3 ``conv``."""

    def __init__(self, channels: int, out_channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_size: Optional[Sequence[int]] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        # PyTorch's nearest-upsample kernels fail on non-contiguous inputs with a batch >= 64 or > 2**31 outputs.
        if hidden_states.shape[0] >= 64 or hidden_states.numel() * 4 > 2**31:
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        return conv(self.conv, hidden_states, context)
