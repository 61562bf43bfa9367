"""Load and save ControlNets: shipped short names, diffusers folders and original single files.

* A **diffusers folder** (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``) loads
  with the core loader: our parameter names are diffusers' keys.
* An **original single file** (lllyasviel's ``control_*.safetensors``/``.pth``, keys ``control_model.*``
  or unprefixed) is renamed with the core's UNet table for the shared trunk plus the ControlNet-only
  modules below. Such files carry no config: the trunk comes from the UNet the ControlNet is for, the
  control encoder's widths from the file's own tensors.
* A **short name** (``"shapes-outline"``) is a folder shipped as package data (``SHIPPED``).
* A **diffusers ``ControlNetModel`` object** converts with :func:`as_controlnet_model` (its config and state
  dict; the module names are the same).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from diffsteer.atomic import atomic_directory
from diffsteer.loading.errors import ModelLoadError, WeightsError
from diffsteer.loading.pipeline_loader import build_model, load_model
from diffsteer.loading.single_file_common import DIRECT, KeyMap, Rule, indices, strip_prefix
from diffsteer.loading.single_file_unet import fit_transformer_projections, unet_keymap
from diffsteer.loading.weights import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_state_dict, save_state_dict
from diffsteer.models import UNetBackboneConfig

from .model import ControlNetConfig, ControlNetModel

__all__ = [
    "SHIPPED",
    "as_controlnet_model",
    "controlnet_keymap",
    "load_controlnet",
    "original_to_diffusers",
    "save_controlnet",
    "shipped_controlnet_dir",
]

DATA = Path(__file__).resolve().parent / "data"
#: ControlNets shipped with the plugin, by short name (each a diffusers folder under ``data/``).
SHIPPED = ("shapes-outline",)
ORIGINAL_PREFIX = "control_model."
WEIGHTS = "diffusion_pytorch_model.safetensors"
#: The trainer's export holds the ControlNet in this subfolder.
EXPORT_SUBFOLDER = "controlnet"

ModelRef = Union[str, "os.PathLike[str]"]


def shipped_controlnet_dir(name: str) -> Path:
    """Folder of a shipped ControlNet; a :class:`ModelLoadError` lists the names for an unknown one."""
    folder = DATA / name
    if name not in SHIPPED or not (folder / "config.json").is_file():
        have = [n for n in SHIPPED if (DATA / n / "config.json").is_file()]
        raise ModelLoadError(
            f"no shipped ControlNet named {name!r} (shipped: {', '.join(have) or 'none'}); "
            "pass a diffusers ControlNet folder or a single .safetensors file instead"
        )
    return folder


def load_controlnet(
    ref: ModelRef,
    *,
    unet_config: Optional[UNetBackboneConfig] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> ControlNetModel:
    """Load a ControlNet from a short name, a diffusers folder or an original single file.

    Args:
        ref: ``"shapes-outline"``, a folder with ``config.json`` (or a trainer export holding
            ``controlnet/``), or a ``.safetensors``/``.pth``/``.ckpt``/``.bin`` single file.
        unet_config: the UNet the ControlNet is for; required for original single files, which have no config.

    Raises:
        ModelLoadError: (or its :class:`WeightsError`) naming the file and the reason: missing, corrupt,
        unsafe pickle, unknown keys, wrong shapes.
    """
    path = Path(ref)
    if not path.exists() and isinstance(ref, str) and os.sep not in ref and not path.suffix:
        path = shipped_controlnet_dir(ref)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / EXPORT_SUBFOLDER / "config.json").is_file():
            path = path / EXPORT_SUBFOLDER
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a ControlNet folder (no config.json)")
        _check_class(path / "config.json")
        return load_model(ControlNetModel, path, dtype, device)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such ControlNet file or folder")
    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: not a ControlNet weights file (expected .safetensors or .pth/.ckpt/.bin)")
    state = load_state_dict(path)
    source = str(path)
    if unet_config is None:
        raise ModelLoadError(
            f"{path}: a single-file ControlNet has no config; load it for a UNet (the plugin does) or "
            "pass unet_config"
        )
    if _is_diffusers_layout(state):
        config = _config_from_diffusers_keys(state, unet_config, source)
    else:
        state = original_to_diffusers(state, unet_config, source=source)
        config = _config_from_diffusers_keys(state, unet_config, source)
    return build_model(
        ControlNetModel, config, state, config_source=f"{source} (config inferred from the UNet and the file)",
        weights_source=source, dtype=dtype, device=device,
    )


def as_controlnet_model(net: Any) -> ControlNetModel:
    """``net`` as our :class:`ControlNetModel`: ours is returned as it is, a diffusers ``ControlNetModel`` is
    converted (same config, a copy of its weights, same dtype and device).

    Raises:
        ModelLoadError: for any other object, saying what to pass instead.
    """
    if isinstance(net, ControlNetModel):
        return net
    kind = type(net)
    # diffusers is not a dependency: recognise its class by module and name, without importing it.
    if kind.__module__.split(".")[0] == "diffusers" and kind.__name__ == "ControlNetModel":
        source = "the diffusers ControlNetModel"
        config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return build_model(
            ControlNetModel, config, state, config_source=f"{source}'s config", weights_source=source,
            dtype=net.dtype, device=net.device,
        )
    if kind.__module__.split(".")[0] == "diffusers" and kind.__name__ == "MultiControlNetModel":
        raise ModelLoadError(
            "a diffusers MultiControlNetModel holds several ControlNets: pass each as its own controlnet plugin "
            "(one ControlNet(...) per net, each with its image and scale); their residuals sum as diffusers' do"
        )
    raise ModelLoadError(
        f"got a {kind.__module__}.{kind.__name__}; pass a diffsteer_controlnet.ControlNetModel or a diffusers "
        "ControlNetModel object, or give model= a short name, a diffusers ControlNet folder or a single file"
    )


def save_controlnet(model: ControlNetModel, folder: ModelRef, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as a diffusers ControlNet folder, atomically.

    ``dtype`` sets the storage type (``torch.float16`` halves the file; loading casts back to the model's
    dtype, so fp32 weights then equal the fp16 values exactly).
    """
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_diffusers_dict(), indent=2) + "\n")
        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_state_dict(state, tmp / WEIGHTS)
    return folder


def _check_class(config_file: Path) -> None:
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name not in (None, "ControlNetModel"):
        raise ModelLoadError(f"{config_file}: holds a {name}, not a ControlNetModel")


# -- original (ControlLDM) layout -------------------------------------------------------------------------


def _trunk_config(unet_config: UNetBackboneConfig) -> dict[str, Any]:
    """The UNet table needs up-block types; a ControlNet has none, so mirror the down types (unused)."""
    data = {name: getattr(unet_config, name) for name in UNetBackboneConfig.model_fields}
    data["up_block_types"] = [t.replace("Down", "Up") for t in reversed(data["down_block_types"])]
    return data


def controlnet_keymap(unet_config: UNetBackboneConfig, hint_convs: int) -> KeyMap:
    """Rename table diffusers <-> original ControlNet layout for a trunk like ``unet_config``.

    The trunk (time embedding, ``input_blocks``, ``middle_block``) uses the core UNet table; the
    ControlNet-only modules are ``zero_convs.N.0``, ``middle_block_out.0`` and the Sequential
    ``input_hint_block`` (convs at even indices, SiLUs between), ``hint_convs`` convs long.
    """
    decoder = ("up_blocks.", "conv_norm_out", "conv_out")
    rules = [r for r in unet_keymap(_trunk_config(unet_config)).rules if not r.diffusers.startswith(decoder)]
    n_skips = 1 + sum(unet_config.layers()) + unet_config.num_blocks - 1
    rules += [Rule(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", DIRECT) for i in range(n_skips)]
    rules.append(Rule("controlnet_mid_block", "middle_block_out.0", DIRECT))
    rules.append(Rule("controlnet_cond_embedding.conv_in", "input_hint_block.0", DIRECT))
    rules += [Rule(f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * (k + 1)}", DIRECT)
              for k in range(hint_convs - 2)]
    rules.append(Rule("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (hint_convs - 1)}", DIRECT))
    return KeyMap(rules)


def original_to_diffusers(
    state: Mapping[str, torch.Tensor], unet_config: UNetBackboneConfig, *, source: str
) -> dict[str, torch.Tensor]:
    """Rename an original-layout ControlNet state dict (``control_model.`` prefix optional) to our keys."""
    prefix = ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in state) else ""
    body = strip_prefix(state, prefix) if prefix else dict(state)
    if prefix and len(body) != len(state):
        others = [k for k in state if not k.startswith(prefix)]
        raise WeightsError(f"keys outside {prefix!r}: {others[:5]}; is this a full SD checkpoint?", source=source)
    hint = indices(body, "input_hint_block.")
    if not hint:
        raise WeightsError("no input_hint_block.* keys: not an original-layout ControlNet file", source=source)
    out = controlnet_keymap(unet_config, len(hint)).convert(body, "to_diffusers", source=source, in_prefix=prefix)
    return fit_transformer_projections(out, bool(unet_config.use_linear_projection))


def diffusers_to_original(model: ControlNetModel) -> dict[str, torch.Tensor]:
    """Our state dict in the original layout (``control_model.*``), e.g. to test single-file loading."""
    hint_convs = 2 + len(model.controlnet_cond_embedding.blocks)
    keymap = controlnet_keymap(model.config, hint_convs)
    return keymap.convert(model.state_dict(), "to_original", source="ControlNetModel", out_prefix=ORIGINAL_PREFIX)


def _is_diffusers_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("controlnet_cond_embedding.") for k in state)


def _config_from_diffusers_keys(
    state: Mapping[str, torch.Tensor], unet_config: UNetBackboneConfig, source: str
) -> ControlNetConfig:
    """The trunk from ``unet_config``; the control encoder's channels from its tensors' shapes."""
    try:
        conv_in = state["controlnet_cond_embedding.conv_in.weight"]
        blocks = indices(state, "controlnet_cond_embedding.blocks.")
        widths = [int(conv_in.shape[0])] + [
            int(state[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0]) for k in blocks if k % 2 == 1
        ]
    except KeyError as exc:
        raise WeightsError(f"missing key {exc.args[0]!r} of the control-image encoder", source=source) from None
    try:
        return ControlNetConfig.from_unet(
            unet_config, conditioning_channels=int(conv_in.shape[1]), conditioning_embedding_out_channels=tuple(widths)
        )
    except ValueError as exc:
        raise WeightsError(f"cannot make a ControlNet config from this file: {exc}", source=source) from None
