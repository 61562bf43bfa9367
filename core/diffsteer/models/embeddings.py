"""Sinusoidal timestep features and the MLP that turns them into the UNet's time embedding."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .context import ForwardContext, linear

TimestepLike = Union[int, float, torch.Tensor]

_NO_64BIT_DEVICES = frozenset({"mps", "npu", "neuron"})


def broadcast_timestep(timestep: TimestepLike, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn a scalar, 0-d or 1-d ``timestep`` into a 1-d tensor of ``batch_size`` on ``device``.

    Python floats become float64 and ints int64 (32-bit on backends without 64-bit types), so the
    sinusoid sees the same value a diffusers UNet sees.
    """
    if not torch.is_tensor(timestep):
        is_float = isinstance(timestep, float)
        if device.type in _NO_64BIT_DEVICES:
            dtype = torch.float32 if is_float else torch.int32
        else:
            dtype = torch.float64 if is_float else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(device)
    if timestep.ndim != 1:
        raise ValueError(f"timestep must be a scalar or a 1-d tensor, got shape {tuple(timestep.shape)}")
    return timestep.expand(batch_size)


def timestep_features(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """DDPM sinusoidal features ``(N, dim)`` of 1-d ``timesteps``, always float32.

    Frequencies are ``max_period ** (-i / (dim/2 - freq_shift))``; ``flip_sin_to_cos`` puts the cosines first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    features = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        features = nn.functional.pad(features, (0, 1))
    return features


class Timesteps(nn.Module):
    """Parameter-free module wrapper of :func:`timestep_features`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_features(timesteps, self.num_channels, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2``: sinusoidal features to the embedding every resnet receives."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, features: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        return linear(self.linear_2, self.act(linear(self.linear_1, features, context)), context)
