"""Configs of the SD 1.x/2.x UNet, read from the diffusers ``unet/config.json`` field names.

:class:`UNetBackboneConfig` holds what the encoder half needs (time embedding, down blocks, mid block), so a
ControlNet, which copies that half, can share it; :class:`UNetConfig` adds the decoder half.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

from pydantic import field_validator, model_validator

from .config_utils import DiffusersConfig, per_block, reject_unsupported

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

IntOrPerBlock = Union[int, Tuple[int, ...]]

# diffusers features whose default is the only value implemented here (field -> accepted values).
UNSUPPORTED_UNET_FIELDS: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "cross_attention_norm": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu", "swish"),
}


class UNetBackboneConfig(DiffusersConfig):
    """Time embedding, down blocks and mid block of an SD UNet (also the whole of a ControlNet's trunk)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrPerBlock = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrPerBlock = 1280
    transformer_layers_per_block: IntOrPerBlock = 1
    #: diffusers' historical misnomer: for SD configs this is the number of heads per block (see :meth:`heads`).
    attention_head_dim: IntOrPerBlock = 8
    num_attention_heads: Optional[IntOrPerBlock] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    time_embedding_dim: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        reject_unsupported(cls.diffusers_class_name or cls.__name__, data, UNSUPPORTED_UNET_FIELDS)
        return data

    @field_validator("down_block_types")
    @classmethod
    def _known_down_blocks(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        return _check_block_types("down_block_types", value, DOWN_BLOCK_TYPES)

    @field_validator("mid_block_type")
    @classmethod
    def _known_mid_block(cls, value: str) -> str:
        if value not in MID_BLOCK_TYPES:
            raise ValueError(f"mid_block_type={value!r} is not supported (supported: {', '.join(MID_BLOCK_TYPES)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "UNetBackboneConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ValueError(
                f"down_block_types has {len(self.down_block_types)} entries but block_out_channels has {n}"
            )
        for field in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            per_block(getattr(self, field), n, field)
        heads = self.heads()
        for i, (channels, h) in enumerate(zip(self.block_out_channels, heads)):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{i}]={channels} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
            if channels % h:
                raise ValueError(f"block_out_channels[{i}]={channels} is not divisible by its {h} attention heads")
        return self

    # -- per-block values, as the blocks are built ----------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def heads(self) -> Tuple[int, ...]:
        """Attention heads per down block.

        ``num_attention_heads`` when given, otherwise ``attention_head_dim`` (which SD configs use to mean
        the head count); each head then has ``channels // heads`` dimensions.
        """
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        field = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        return per_block(value, self.num_blocks, field)

    def layers(self) -> Tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    def cross_attention_dims(self) -> Tuple[int, ...]:
        return per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    def transformer_layers(self) -> Tuple[int, ...]:
        return per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


class UNetConfig(UNetBackboneConfig):
    """The full ``UNet2DConditionModel`` config (SD 1.x / 2.x, including inpainting and depth variants)."""

    diffusers_class_name = "UNet2DConditionModel"

    sample_size: Optional[Union[int, Tuple[int, int]]] = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    conv_out_kernel: int = 3

    @field_validator("up_block_types")
    @classmethod
    def _known_up_blocks(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        return _check_block_types("up_block_types", value, UP_BLOCK_TYPES)

    @model_validator(mode="after")
    def _up_matches_down(self) -> "UNetConfig":
        if len(self.up_block_types) != self.num_blocks:
            raise ValueError(
                f"up_block_types has {len(self.up_block_types)} entries but block_out_channels has {self.num_blocks}"
            )
        return self


def _check_block_types(field: str, value: Tuple[str, ...], known: Tuple[str, ...]) -> Tuple[str, ...]:
    for i, block_type in enumerate(value):
        if block_type not in known:
            raise ValueError(f"{field}[{i}]={block_type!r} is not supported (supported: {', '.join(known)})")
    return value
