"""Text encoder: single-file layouts <-> transformers ``CLIPTextModel`` names.

Diffusers-side keys are the canonical file form ``text_model.*`` (as in a diffusers folder's
``text_encoder/model.safetensors``). transformers >= 5.6 flattened ``CLIPTextModel`` and dropped the
``text_model.`` prefix from its own state dict; :func:`align_text_encoder_keys` bridges the two.

* SD 1.x (``cond_stage_model.transformer.*``) is a transformers CLIPTextModel under a prefix.
* SD 2.x (``cond_stage_model.model.*``) is OpenCLIP: fused ``in_proj`` q/k/v, ``resblocks``.
  SD 2.x conditions on the penultimate layer, so the last resblock is dropped on reading and the
  diffusers model has one layer fewer than the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from diffsteer.loading.errors import WeightsError
from diffsteer.loading.single_file_common import KeyMap, Rule, indices, require, show_keys

CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TextEncoderLayout = Literal["clip", "open_clip"]

_TM = "text_model."
_POSITION_IDS = "text_model.embeddings.position_ids"

# OpenCLIP residual block <-> CLIPEncoderLayer (the fused in_proj is handled separately).
_OPEN_CLIP_LAYER: Mapping[str, str] = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
# Parts of an OpenCLIP text tower that a CLIPTextModel has no place for (the pooled projection
# and the contrastive temperature): SD never uses them.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def canonical_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix keys with ``text_model.`` where missing (state dicts of flattened CLIPTextModels)."""
    return {k if k.startswith(_TM) else _TM + k: v for k, v in state_dict.items()}


def align_text_encoder_keys(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a ``text_model.*`` state dict to ``model``'s own key form (with or without the prefix).

    Also reconciles ``position_ids``: a persistent buffer in older transformers, absent in newer ones.
    """
    expected = model.state_dict()
    prefixed = any(k.startswith(_TM) for k in expected)
    sd = canonical_text_encoder_keys(state_dict)
    if not prefixed:
        sd = {k[len(_TM):]: v for k, v in sd.items()}
    ids = _POSITION_IDS if prefixed else _POSITION_IDS[len(_TM):]
    if ids in expected and ids not in sd:
        sd[ids] = expected[ids].clone()  # a deterministic arange, not a learned weight
    elif ids not in expected:
        sd.pop(ids, None)
    return sd


def clip_to_diffusers(original: Mapping[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """SD 1.x: unprefixed ``cond_stage_model.transformer.*`` entries -> ``text_model.*``."""
    out = {k: v for k, v in original.items() if k != _POSITION_IDS}
    unknown = [CLIP_PREFIX + k for k in out if not k.startswith(_TM)]
    if unknown:
        raise WeightsError(f"unknown keys: {show_keys(unknown)}", source=source)
    _check_clip_complete(out, source=source, prefix=CLIP_PREFIX)
    return out


def clip_to_original(diffusers: Mapping[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """SD 1.x: CLIPTextModel state dict -> ``cond_stage_model.transformer.*``."""
    sd = canonical_text_encoder_keys(diffusers)
    sd.pop(_POSITION_IDS, None)
    _check_clip_complete(sd, source=source, prefix="")
    return {CLIP_PREFIX + k: v for k, v in sd.items()}


def _check_clip_complete(sd: Mapping[str, torch.Tensor], *, source: str, prefix: str) -> None:
    for key in (
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
    ):
        require(sd, key, source=source, prefix=prefix)
    layers = indices(sd, "text_model.encoder.layers.")
    if not layers or layers != list(range(len(layers))):
        raise WeightsError(
            f"missing keys: {prefix}text_model.encoder.layers.* are absent or not numbered 0..N-1", source=source
        )


def _open_clip_keymap(num_layers: int) -> KeyMap:
    rules = [
        Rule("text_model.embeddings.token_embedding", "token_embedding", {"": ""}),
        Rule("text_model.final_layer_norm", "ln_final", {"": ""}),
    ]
    rules += [
        Rule(f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}", _OPEN_CLIP_LAYER)
        for n in range(num_layers)
    ]
    return KeyMap(rules)


def open_clip_to_diffusers(original: Mapping[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """SD 2.x: unprefixed ``cond_stage_model.model.*`` entries -> ``text_model.*``, last resblock dropped."""
    p = OPEN_CLIP_PREFIX
    blocks = indices(original, "transformer.resblocks.")
    if len(blocks) < 2 or blocks != list(range(len(blocks))):
        raise WeightsError(f"missing keys: {p}transformer.resblocks.* are absent or not numbered 0..N-1", source=source)
    kept = len(blocks) - 1  # penultimate-layer conditioning: the final block never runs
    dropped = f"transformer.resblocks.{kept}."
    rest: dict[str, torch.Tensor] = {}
    positions = require(original, "positional_embedding", source=source, prefix=p)
    out: dict[str, torch.Tensor] = {"text_model.embeddings.position_embedding.weight": positions}
    for key, w in original.items():
        if key == "positional_embedding" or key.startswith(dropped) or key in _OPEN_CLIP_UNUSED:
            continue
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            layer = key.split(".")[2]
            kind = key.rsplit("_", 1)[1]  # "weight" / "bias"
            for name, part in zip(_QKV, w.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part
            continue
        rest[key] = w
    out.update(_open_clip_keymap(kept).convert(rest, "to_diffusers", source=source, in_prefix=p))
    _check_clip_complete(out, source=source, prefix=p)
    return out


def open_clip_to_original(
    diffusers: Mapping[str, torch.Tensor], *, source: str, pad: bool = True
) -> dict[str, torch.Tensor]:
    """SD 2.x: CLIPTextModel state dict -> ``cond_stage_model.model.*`` (OpenCLIP layout).

    With ``pad`` the resblock that diffusers dropped is written back as an identity block (zero
    output projections), plus an identity ``text_projection`` and the default ``logit_scale``, so
    loaders that expect the full OpenCLIP tower load the file strictly. Penultimate-layer
    conditioning never runs that block, so outputs are unchanged. Without ``pad`` the file has one
    block fewer than a real SD 2.x file, and a reader that drops the last block (this module's, or
    an SD 2.x loader) loses a real layer: only use it for files that are not read back as SD 2.x.
    """
    sd = canonical_text_encoder_keys(diffusers)
    sd.pop(_POSITION_IDS, None)
    _check_clip_complete(sd, source=source, prefix="")
    layers = indices(sd, "text_model.encoder.layers.")
    fused: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    qkv = tuple(f".self_attn.{name}." for name in _QKV)
    for key, w in sd.items():
        if key == "text_model.embeddings.position_embedding.weight":
            fused["positional_embedding"] = w
        elif any(s in key for s in qkv):
            continue  # fused below
        else:
            rest[key] = w
    for n in layers:
        for kind in ("weight", "bias"):
            attn = f"text_model.encoder.layers.{n}.self_attn"
            parts = [require(sd, f"{attn}.{name}.{kind}", source=source) for name in _QKV]
            fused[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    out = _open_clip_keymap(len(layers)).convert(rest, "to_original", source=source)
    out.update(fused)
    if pad:
        out.update(_identity_block(sd, len(layers)))
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def _identity_block(sd: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    first = "text_model.encoder.layers.0."
    like = {k[len(first):]: v for k, v in sd.items() if k.startswith(first)}
    width = like["layer_norm1.weight"].shape[0]
    inner = like["mlp.fc1.weight"].shape[0]
    dtype = like["layer_norm1.weight"].dtype
    z = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    b = f"transformer.resblocks.{index}."
    return {
        b + "ln_1.weight": torch.ones(width, dtype=dtype),
        b + "ln_1.bias": z(width),
        b + "attn.in_proj_weight": z(3 * width, width),
        b + "attn.in_proj_bias": z(3 * width),
        b + "attn.out_proj.weight": z(width, width),
        b + "attn.out_proj.bias": z(width),
        b + "ln_2.weight": torch.ones(width, dtype=dtype),
        b + "ln_2.bias": z(width),
        b + "mlp.c_fc.weight": z(inner, width),
        b + "mlp.c_fc.bias": z(inner),
        b + "mlp.c_proj.weight": z(width, inner),
        b + "mlp.c_proj.bias": z(width),
        "text_projection": torch.eye(width, dtype=dtype),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=dtype),
    }


def text_encoder_config(diffusers: Mapping[str, torch.Tensor], layout: TextEncoderLayout) -> dict[str, Any]:
    """A CLIPTextConfig dict for a ``text_model.*`` state dict, matching the SD 1.5 / SD 2.1 configs.

    Head count is not in the shapes: both CLIP ViT-L and OpenCLIP ViT-H use 64-wide heads.
    """
    tok = diffusers["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    return {
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(diffusers["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(indices(diffusers, "text_model.encoder.layers.")),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": int(diffusers["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "quick_gelu" if layout == "clip" else "gelu",
        "projection_dim": 768 if layout == "clip" else 512,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
