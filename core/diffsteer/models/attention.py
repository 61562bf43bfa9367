"""The attention module shared by the UNet, the VAE and ControlNet, and its per-call processor slot.

A layer's processor comes from the :class:`~diffsteer.models.context.ForwardContext` passed to its forward
(keyed by the layer's ``name``), not from the module: one loaded model serves concurrent calls from several
threads, each with its own plugin set, and ``torch.compile`` traces the look-up. A layer with no processor
takes the fused SDPA path.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .context import ForwardContext, linear


class AttentionProcessor(Protocol):
    """Computes one attention layer's output in place of the default SDPA path.

    It receives the :class:`Attention` module (for its projections and helpers), the layer input
    ``hidden_states`` of shape ``(batch, tokens, channels)``, ``encoder_hidden_states`` (``None`` for
    self-attention) and the pass's ``context`` (hand it to :meth:`Attention.project_qkv` and
    :meth:`Attention.project_out`, which apply its weight patches), and returns the projected output with
    the shape of ``hidden_states``.
    """

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor],
        context: Optional[ForwardContext],
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention with the diffusers parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    ``name`` is the module path inside its model; the owning model sets it so processors can be keyed
    by layer. ``residual_connection``/``group_norm`` serve the VAE's mid-block attention, which works on
    ``(B, C, H, W)`` feature maps.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: Optional[int] = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.upcast_attention = upcast_attention
        self.is_cross_attention = cross_attention_dim is not None
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.name: str = ""
        self.group_norm = (
            nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups else None
        )
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(0.0)])

    # -- pieces a processor can reuse -------------------------------------------------------------
    def project_qkv(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor],
        context: Optional[ForwardContext] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to per-head ``(batch, heads, tokens, dim_head)`` query, key and value."""
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = linear(self.to_q, hidden_states, context)
        k = linear(self.to_k, source, context)
        v = linear(self.to_v, source, context)
        return (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))  # type: ignore[return-value]

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Explicit softmax probabilities ``(batch, heads, q_tokens, k_tokens)``; only observers need them."""
        if self.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        return scores.softmax(dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fused SDPA; returns ``(batch, heads, tokens, dim_head)``."""
        if self.upcast_attention and q.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            return out.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    def project_out(self, heads_out: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        """Merge heads and apply the output projection."""
        return linear(self.to_out[0], rearrange(heads_out, "b h n d -> b n (h d)"), context)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        processor = context.processors.get(self.name) if context is not None and context.processors else None
        if processor is not None:
            out = processor(self, hidden_states, encoder_hidden_states, context)
        else:
            q, k, v = self.project_qkv(hidden_states, encoder_hidden_states, context)
            out = self.project_out(self.attend(q, k, v), context)

        if spatial:
            out = rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def name_attention_layers(model: nn.Module) -> list[str]:
    """Give every :class:`Attention` in ``model`` its module path as ``name``; return the names in order."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, Attention):
            module.name = path
            names.append(path)
    return names
