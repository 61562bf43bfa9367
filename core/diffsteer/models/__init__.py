"""diffsteer's own SD 1.x/2.x models; parameter names equal diffusers' state-dict keys."""

from .attention import Attention, AttentionProcessor, name_attention_layers
from .context import ForwardContext, LowRank, WeightPatch
from .configured import ConfiguredModel
from .embeddings import TimestepEmbedding, Timesteps, broadcast_timestep, timestep_features
from .random import randn_tensor
from .unet import UNet2DConditionModel, build_time_embedding, embed_timestep
from .unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    build_down_block,
    build_down_blocks,
    build_mid_block,
    build_up_block,
    build_up_blocks,
)
from .unet_config import UNetBackboneConfig, UNetConfig
from .vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "Attention",
    "AttentionProcessor",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "ConfiguredModel",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "DiagonalGaussian",
    "DownBlock2D",
    "ForwardContext",
    "LowRank",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DConditionModel",
    "UNetBackboneConfig",
    "UNetConfig",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "WeightPatch",
    "broadcast_timestep",
    "build_down_block",
    "build_down_blocks",
    "build_mid_block",
    "build_time_embedding",
    "build_up_block",
    "build_up_blocks",
    "embed_timestep",
    "name_attention_layers",
    "randn_tensor",
    "timestep_features",
]
