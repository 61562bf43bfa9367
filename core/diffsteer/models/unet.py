"""The SD 1.x/2.x conditional UNet, with diffusers' module names so its checkpoints load without a key map."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .attention import name_attention_layers
from .context import ForwardContext, conv, name_layers
from .configured import ConfiguredModel
from .embeddings import TimestepEmbedding, TimestepLike, Timesteps, broadcast_timestep
from .unet_blocks import add_residual, build_down_blocks, build_mid_block, build_up_blocks
from .unet_config import UNetBackboneConfig, UNetConfig


def build_time_embedding(config: UNetBackboneConfig) -> tuple[Timesteps, TimestepEmbedding]:
    """The parameter-free sinusoid (``time_proj``) and its MLP (``time_embedding``)."""
    features = config.block_out_channels[0]
    return (
        Timesteps(features, config.flip_sin_to_cos, config.freq_shift),
        TimestepEmbedding(features, config.time_embed_dim),
    )


def embed_timestep(
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    timestep: TimestepLike,
    sample: torch.Tensor,
    context: Optional[ForwardContext] = None,
) -> torch.Tensor:
    """The ``(batch, time_embed_dim)`` embedding of ``timestep`` broadcast to ``sample``'s batch.

    The sinusoid is computed in float32 and cast to ``sample.dtype`` before the MLP, as diffusers does.
    """
    timesteps = broadcast_timestep(timestep, sample.shape[0], sample.device)
    return time_embedding(time_proj(timesteps).to(dtype=sample.dtype), context)


class UNet2DConditionModel(ConfiguredModel[UNetConfig]):
    """Text-conditioned noise-prediction UNet of Stable Diffusion 1.x/2.x.

    Built from a :class:`UNetConfig` (or a diffusers ``config.json`` mapping); parameter names equal
    diffusers' state-dict keys. Every :class:`~diffsteer.models.attention.Attention` is named by its module
    path (self-attention ``...attn1``, cross-attention ``...attn2``).
    """

    config_class = UNetConfig

    def __init__(self, config: Union[UNetConfig, Mapping[str, Any]]) -> None:
        super().__init__(config)
        config = self.config
        channels = config.block_out_channels

        self.conv_in = nn.Conv2d(
            config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        self.time_proj, self.time_embedding = build_time_embedding(config)
        # diffusers registers up_blocks before mid_block; keeping that order keeps saved files key-for-key alike.
        self.down_blocks = build_down_blocks(config)
        self.up_blocks = build_up_blocks(config)
        self.mid_block = build_mid_block(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(
            channels[0], config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2
        )
        # Listed in forward order (down, mid, up), not registration order.
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        self._attention_layers = sorted(name_attention_layers(self), key=lambda name: stage[name.split(".")[0]])
        self._weight_layers = name_layers(self)

    # -- introspection ----------------------------------------------------------------------------------
    def attention_layers(self) -> list[str]:
        """Module paths of all attention layers in forward order: down blocks, mid block, up blocks."""
        return list(self._attention_layers)

    def weight_layers(self) -> list[str]:
        """Module paths of the linears and convolutions that a :class:`ForwardContext` can patch."""
        return list(self._weight_layers)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: TimestepLike,
        encoder_hidden_states: torch.Tensor,
        *,
        down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
        down_intrablock_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        """Predict the model output (noise or v) for ``sample`` ``(B, in_channels, H, W)``.

        Args:
            timestep: a number, a 0-d tensor or a 1-d tensor of length 1 or ``B``.
            encoder_hidden_states: text embeddings ``(B, tokens, cross_attention_dim)``.
            down_block_additional_residuals: ControlNet residuals, one per skip connection (``conv_in``
                output first), each added to its skip.
            mid_block_additional_residual: ControlNet residual added to the mid-block output.
            down_intrablock_additional_residuals: T2I-Adapter features, one per down block from the first
                (a remaining one whose shape matches is added to the mid-block output, as for SDXL adapters).
                The sequence is not modified.
            context: this pass's attention processors and weight patches (see
                :mod:`diffsteer.models.context`); ``None`` runs the plain model.
        """
        config = self._config
        # Sizes that don't divide by the total upsampling factor need the encoder's sizes forwarded to the
        # upsamplers, or the decoder would come out a pixel short of its skips.
        up_factor = 2 ** (config.num_blocks - 1)
        forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])

        if config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = embed_timestep(self.time_proj, self.time_embedding, timestep, sample, context)
        sample = conv(self.conv_in, sample, context)

        adapter = _Residuals(down_intrablock_additional_residuals)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            residual = adapter.take() if adapter.remaining else None
            sample, block_skips = block(
                sample, emb, encoder_hidden_states, additional_residual=residual, context=context
            )
            skips += block_skips

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} tensors; "
                    f"this UNet has {len(skips)} skip connections"
                )
            skips = tuple(
                add_residual(skip, extra, f"down_block_additional_residuals[{i}]")
                for i, (skip, extra) in enumerate(zip(skips, down_block_additional_residuals))
            )

        sample = self.mid_block(sample, emb, encoder_hidden_states, context)
        if adapter.remaining and adapter.peek().shape == sample.shape:
            sample = sample + adapter.take()
        if adapter.remaining:
            raise ValueError(
                f"down_intrablock_additional_residuals has {adapter.remaining} more tensor(s) than this UNet's "
                f"{config.num_blocks} down blocks (and mid block) can take"
            )
        if mid_block_additional_residual is not None:
            sample = add_residual(sample, mid_block_additional_residual, "mid_block_additional_residual")

        for i, block in enumerate(self.up_blocks):
            n_skips = len(block.resnets)
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            is_last = i == len(self.up_blocks) - 1
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and not is_last else None
            sample = block(
                sample, block_skips, emb, encoder_hidden_states, upsample_size=upsample_size, context=context
            )

        return conv(self.conv_out, self.conv_act(self.conv_norm_out(sample)), context)


class _Residuals:
    """A read-only cursor over an optional sequence of residual tensors."""

    def __init__(self, tensors: Optional[Sequence[torch.Tensor]]) -> None:
        self._tensors: Sequence[torch.Tensor] = tensors if tensors is not None else ()
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._tensors) - self._next

    def peek(self) -> torch.Tensor:
        return self._tensors[self._next]

    def take(self) -> torch.Tensor:
        tensor = self._tensors[self._next]
        self._next += 1
        return tensor
