"""UNet: original LDM ``model.diffusion_model.*`` layout <-> diffusers ``UNet2DConditionModel`` names.

The LDM UNet numbers its modules flat (``input_blocks.K``, ``output_blocks.K``); diffusers nests
them (``down_blocks.I.resnets.J``). The flat index follows from the config alone, so the whole
table is generated from ``block_out_channels``/``layers_per_block``/block types.
Inside a spatial transformer both layouts use the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsteer.loading.errors import WeightsError
from diffsteer.loading.single_file_common import DIRECT, KeyMap, Rule, indices, require

UNET_PREFIX = "model.diffusion_model."

# ResnetBlock2D (diffusers) <-> ResBlock (LDM): Sequential indices skip the parameter-free SiLU/dropout.
RESNET: Mapping[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
]


def _per_block(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_keymap(config: Mapping[str, Any]) -> KeyMap:
    """The rename table for a UNet2DConditionModel config (SD 1.x / 2.x family)."""
    down: Sequence[str] = config["down_block_types"]
    up: Sequence[str] = config["up_block_types"]
    layers = _per_block(config["layers_per_block"], len(down))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise WeightsError(f"mid_block_type {mid!r} has no single-file layout here", source="unet config")
    rules = [Rule(d, o, DIRECT) for d, o in _TOP]

    k = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down):
        for j in range(layers[i]):
            rules.append(Rule(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", RESNET))
            if _has_attention(block_type):
                rules.append(Rule(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if i < len(down) - 1:
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op", DIRECT))
            k += 1

    rules += [
        Rule("mid_block.resnets.0", "middle_block.0", RESNET),
        Rule("mid_block.attentions.0", "middle_block.1"),
        Rule("mid_block.resnets.1", "middle_block.2", RESNET),
    ]

    k = 0
    for i, (block_type, n) in enumerate(zip(up, reversed(layers), strict=True)):
        attn = _has_attention(block_type)
        for j in range(n + 1):  # up blocks carry one extra resnet for the skip from the down sampler
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", RESNET))
            if attn:
                rules.append(Rule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
            if j == n and i < len(up) - 1:
                # The upsampler is the next entry of the same Sequential: after the attention if any.
                slot = 2 if attn else 1
                rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{slot}.conv", DIRECT))
            k += 1
    return KeyMap(rules)


def _is_transformer_proj(key: str) -> bool:
    # proj_in/proj_out directly under a spatial transformer (diffusers names).
    parts = key.split(".")
    return len(parts) >= 3 and parts[-2] in ("proj_in", "proj_out") and parts[-1] == "weight" and "attentions" in parts


def fit_transformer_projections(state: dict[str, torch.Tensor], linear: bool) -> dict[str, torch.Tensor]:
    """Reshape, in place, the spatial transformers' ``proj_in``/``proj_out`` weights (diffusers names) to the
    model's layout: linear (``use_linear_projection``, SD 2.x) or 1x1 conv (SD 1.x), whichever a file holds.

    Original-layout files of either family may store either form, so every single-file loader calls this.
    """
    for key, w in state.items():
        if _is_transformer_proj(key):
            if linear and w.ndim == 4:
                state[key] = w[:, :, 0, 0]
            elif not linear and w.ndim == 2:
                state[key] = w[:, :, None, None]
    return state


def unet_to_diffusers(
    original: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename an unprefixed LDM UNet state dict to diffusers names for ``config``.

    The transformer ``proj_in``/``proj_out`` weights are reshaped to the config's layout:
    1x1 convs (SD 1.x, ``use_linear_projection=False``) or linear (SD 2.x), whichever the file holds.
    """
    out = unet_keymap(config).convert(original, "to_diffusers", source=source, in_prefix=UNET_PREFIX)
    return fit_transformer_projections(out, bool(config.get("use_linear_projection", False)))


def unet_to_original(
    diffusers: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the prefixed LDM layout (``model.diffusion_model.*``).

    The LDM config of an SD 2.x model (``use_linear_in_transformer``) matches diffusers'
    ``use_linear_projection``, so projection shapes are written unchanged.
    """
    return unet_keymap(config).convert(diffusers, "to_original", source=source, out_prefix=UNET_PREFIX)


def infer_unet_structure(original: Mapping[str, torch.Tensor], *, source: str) -> dict[str, Any]:
    """Read the UNet's structural config from an unprefixed LDM UNet state dict's shapes.

    Returns ``in_channels``, ``out_channels``, ``block_out_channels``, ``layers_per_block``,
    ``down_block_types``, ``up_block_types``, ``cross_attention_dim``, ``use_linear_projection``
    and ``transformer_layers_per_block``. Head counts are not in the shapes; callers add them.
    """
    p = UNET_PREFIX

    def has(key: str) -> bool:
        return key in original

    conv_in = require(original, "input_blocks.0.0.weight", source=source, prefix=p)
    conv_out = require(original, "out.2.weight", source=source, prefix=p)

    # Walk the flat input blocks: resnets accumulate into the current level until a down sampler closes it.
    layers: list[int] = []
    channels: list[int] = []
    attention: list[bool] = []
    count = 0
    for k in indices(original, "input_blocks.")[1:]:
        if has(f"input_blocks.{k}.0.op.weight"):
            layers.append(count)
            count = 0
            continue
        conv2 = require(original, f"input_blocks.{k}.0.out_layers.3.weight", source=source, prefix=p)
        if count == 0:
            channels.append(int(conv2.shape[0]))
            attention.append(has(f"input_blocks.{k}.1.proj_in.weight"))
        count += 1
    layers.append(count)
    if not channels or len(layers) != len(channels):
        raise WeightsError(f"cannot read the UNet block layout from {p}input_blocks.*", source=source)

    up_attention: list[bool] = []
    k = 0
    for n in reversed(layers):
        up_attention.append(has(f"output_blocks.{k}.1.proj_in.weight"))
        k += n + 1
    if indices(original, "output_blocks.") != list(range(k)):
        raise WeightsError(f"{p}output_blocks.* do not mirror the input blocks", source=source)

    attn_keys = sorted(key for key in original if key.endswith("attn2.to_k.weight"))
    proj_in = [original[key] for key in original if key.endswith(".1.proj_in.weight")]
    if not attn_keys or not proj_in:
        raise WeightsError(f"no cross-attention found under {p} (not an SD 1.x/2.x UNet?)", source=source)
    first_attn = attn_keys[0].split(".transformer_blocks.")[0]
    depth = len(indices(original, f"{first_attn}.transformer_blocks."))

    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "cross_attention_dim": int(original[attn_keys[0]].shape[1]),
        "use_linear_projection": proj_in[0].ndim == 2,
        "transformer_layers_per_block": depth,
    }
