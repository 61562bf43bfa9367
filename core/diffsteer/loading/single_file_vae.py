"""VAE: original ``first_stage_model.*`` layout <-> diffusers ``AutoencoderKL`` names.

Two structural differences besides names: the decoder's up blocks are numbered in the opposite
order (LDM counts from the highest resolution), and the mid-block attention's q/k/v/proj_out are
1x1 convs in LDM but linear layers in diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffsteer.loading.errors import WeightsError
from diffsteer.loading.single_file_common import DIRECT, KeyMap, Rule, indices, require

VAE_PREFIX = "first_stage_model."

RESNET: Mapping[str, str] = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
ATTENTION: Mapping[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_ATTN_WEIGHTS = tuple(f".{leaf}.weight" for leaf in ATTENTION if leaf != "group_norm")

_TOP = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.conv_norm_out", "encoder.norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_norm_out", "decoder.norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
]


def vae_keymap(config: Mapping[str, Any]) -> KeyMap:
    """The rename table for an AutoencoderKL config (``block_out_channels``, ``layers_per_block``)."""
    n = len(config["block_out_channels"])
    layers = int(config.get("layers_per_block", 2))
    rules = [Rule(d, o, DIRECT) for d, o in _TOP]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", RESNET),
            Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", ATTENTION),
            Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", RESNET),
        ]
    for i in range(n):
        for j in range(layers):
            rules.append(Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", RESNET))
        if i < n - 1:
            down = Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", DIRECT)
            rules.append(down)
        level = n - 1 - i  # diffusers' up_blocks[0] is LDM's up[n-1]
        for j in range(layers + 1):
            rules.append(Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", RESNET))
        if i < n - 1:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", DIRECT))
    return KeyMap(rules)


def _is_attention_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions." in diffusers_key and diffusers_key.endswith(_ATTN_WEIGHTS)


def vae_to_diffusers(
    original: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename an unprefixed LDM VAE state dict to AutoencoderKL names; 1x1-conv attention weights become linear."""
    out = vae_keymap(config).convert(original, "to_diffusers", source=source, in_prefix=VAE_PREFIX)
    for key, w in out.items():
        if _is_attention_weight(key) and w.ndim == 4:
            out[key] = w[:, :, 0, 0]
    return out


def vae_to_original(
    diffusers: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename an AutoencoderKL state dict to the prefixed LDM layout; linear attention weights become 1x1 convs."""
    out = {}
    for key, w in diffusers.items():
        out[key] = w[:, :, None, None] if _is_attention_weight(key) and w.ndim == 2 else w
    return vae_keymap(config).convert(out, "to_original", source=source, out_prefix=VAE_PREFIX)


def infer_vae_structure(original: Mapping[str, torch.Tensor], *, source: str) -> dict[str, Any]:
    """Read AutoencoderKL's structural config from an unprefixed LDM VAE state dict's shapes."""
    p = VAE_PREFIX
    levels = indices(original, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise WeightsError(f"cannot read the VAE block layout from {p}encoder.down.*", source=source)
    channels = [
        int(require(original, f"encoder.down.{i}.block.0.conv2.weight", source=source, prefix=p).shape[0])
        for i in levels
    ]
    return {
        "in_channels": int(require(original, "encoder.conv_in.weight", source=source, prefix=p).shape[1]),
        "out_channels": int(require(original, "decoder.conv_out.weight", source=source, prefix=p).shape[0]),
        "latent_channels": int(require(original, "post_quant_conv.weight", source=source, prefix=p).shape[0]),
        "block_out_channels": channels,
        "layers_per_block": len(indices(original, "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }
