"""The UNet's spatial transformer: self-attention, cross-attention to the text, and a GEGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from typing import Optional

from .attention import Attention
from .context import ForwardContext, conv, linear


class GEGLU(nn.Module):
    """One projection to twice the width, split into a value half and a GELU-gated half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        value, gate = linear(self.proj, hidden_states, context).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU, Dropout, Linear]`` with a 4x inner width."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        geglu, dropout, out = self.net
        return linear(out, dropout(geglu(hidden_states, context)), context)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``attn1`` (self), ``attn2`` (cross, to ``encoder_hidden_states``), ``ff``."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(
            dim, heads=num_attention_heads, dim_head=attention_head_dim, upcast_attention=upcast_attention
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(
            dim,
            cross_attention_dim=cross_attention_dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            upcast_attention=upcast_attention,
        )
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, context: Optional[ForwardContext] = None
    ) -> torch.Tensor:
        hidden_states = self.attn1(self.norm1(hidden_states), None, context) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states, context) + hidden_states
        return self.ff(self.norm3(hidden_states), context) + hidden_states


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a ``(B, C, H, W)`` map and adds the result back.

    ``use_linear_projection`` (SD 2.x) swaps the 1x1-conv ``proj_in``/``proj_out`` for linears, applied on
    the token side of the reshape instead of the image side.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        # eps is fixed at 1e-6 in every SD checkpoint, independent of the UNet's norm_eps.
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in: nn.Module = (
            nn.Linear(in_channels, inner_dim)
            if use_linear_projection
            else nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        )
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    dropout=dropout,
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out: nn.Module = (
            nn.Linear(inner_dim, in_channels)
            if use_linear_projection
            else nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        )

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, context: Optional[ForwardContext] = None
    ) -> torch.Tensor:
        residual = hidden_states
        height, width = hidden_states.shape[-2:]
        hidden_states = self.norm(hidden_states)
        if self.use_linear_projection:
            tokens = linear(self.proj_in, rearrange(hidden_states, "b c h w -> b (h w) c"), context)
        else:
            tokens = rearrange(conv(self.proj_in, hidden_states, context), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states, context)
        # The map goes back in the layout it came in (NCHW, or channels-last for a model moved to it): a
        # sum in the other layout would switch every later conv to it.
        layout = _layout(residual)
        if self.use_linear_projection:
            out = self._to_map(linear(self.proj_out, tokens, context), height, width, layout)
        else:
            out = conv(self.proj_out, self._to_map(tokens, height, width, layout), context)
        return out + residual

    @staticmethod
    def _to_map(tokens: torch.Tensor, height: int, width: int, layout: torch.memory_format) -> torch.Tensor:
        return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width).contiguous(memory_format=layout)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d map stored that way, else the default contiguous format."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
