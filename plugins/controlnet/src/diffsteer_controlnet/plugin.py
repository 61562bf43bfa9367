"""The ``controlnet`` generation plugin: runs a ControlNet before every UNet pass and adds its residuals."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_serializer, field_validator

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.branches import UNCONDITIONAL
from diffsteer.loading.errors import ModelLoadError

from .loading import as_controlnet_model, load_controlnet
from .model import ControlNetModel

if TYPE_CHECKING:  # pragma: no cover
    from diffsteer.call import GenerationCall, StepState, UNetInputs
    from diffsteer.commands import TrainCommand

__all__ = ["ControlNet", "ControlNetSettings", "control_image_tensor"]

NAME = "controlnet"
ImageLike = Union[str, "os.PathLike[str]", Image.Image, torch.Tensor, np.ndarray]


class ControlNetSettings(BaseModel):
    """Settings of one ControlNet; the names are diffusers' ``StableDiffusionControlNetPipeline`` arguments.

    ``image`` is one control image for every image of the call, or a list with one per prompt (or one
    per generated image): paths, PIL images, or ``[0, 1]`` tensors/arrays ``(C, H, W)`` / ``(B, C, H, W)``.
    diffusers' ``control_guidance_start``/``control_guidance_end`` are accepted as the names of the core's
    step window (``window_start``/``window_end``, which every plugin has; see :mod:`diffsteer.scope`).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)

    model: Optional[str] = Field(
        None, description="shipped short name ('shapes-outline'), a diffusers ControlNet folder or a single file"
    )
    image: Any = Field(description="the control image(s)")
    conditioning_scale: float = Field(
        1.0, description="multiplies the residuals (diffusers' name, controlnet_conditioning_scale, works too)",
        validation_alias=AliasChoices("conditioning_scale", "controlnet_conditioning_scale"),
    )
    guess_mode: bool = Field(
        False, description="give the uncond branch no residuals and scale them 0.1..1 from shallow to deep"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else value

    @field_validator("image")
    @classmethod
    def _image_types(cls, value: Any) -> Any:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError("needs at least one control image")
        for item in items:
            if not isinstance(item, (str, os.PathLike, Image.Image, torch.Tensor, np.ndarray)):
                raise ValueError(f"a control image must be a path, PIL image, tensor or array, not {type(item).__name__}")
            if isinstance(item, (str, os.PathLike)) and not Path(item).is_file():
                raise ValueError(f"control image file {str(item)!r} does not exist")
        return value

    @field_serializer("image")
    def _describe_image(self, value: Any) -> Any:
        # Metadata records paths as they are and in-memory images by shape (they cannot be stored as JSON).
        def one(x: Any) -> str:
            if isinstance(x, (str, os.PathLike)):
                return str(x)
            if isinstance(x, Image.Image):
                return f"<PIL {x.mode} {x.width}x{x.height}>"
            return f"<{type(x).__name__} {'x'.join(str(s) for s in x.shape)}>"

        return [one(x) for x in value] if isinstance(value, (list, tuple)) else one(value)


def control_image_tensor(image: ImageLike, height: int, width: int, channels: int) -> torch.Tensor:
    """One control image as float32 ``(n, channels, height, width)`` in ``[0, 1]``.

    PIL images (and files) are converted to RGB (or L for one channel) and resized with Lanczos as
    diffusers' image processor does; tensors and arrays must already have the call's size. A
    one-channel tensor is repeated for a three-channel ControlNet.

    Example:
        >>> control_image_tensor(Image.new("L", (8, 8), 255), 8, 8, 3).shape
        torch.Size([1, 3, 8, 8])
    """
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            image = img.copy()
    if isinstance(image, Image.Image):
        img = image.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), resample=Image.LANCZOS)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1)[None]
        return t.contiguous()
    t = torch.as_tensor(image).float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"a control image tensor must be (C, H, W) or (B, C, H, W), got shape {tuple(t.shape)}")
    if tuple(t.shape[-2:]) != (height, width):
        raise ValueError(f"a control image tensor is {t.shape[-2]}x{t.shape[-1]} but the call makes {height}x{width} images")
    if t.shape[1] == 1 and channels == 3:
        t = t.repeat(1, 3, 1, 1)
    if t.shape[1] != channels:
        raise ValueError(f"a control image has {t.shape[1]} channels, the ControlNet takes {channels}")
    if float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"control image values must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]")
    return t


@dataclass
class ControlNetCallState:
    """What one ControlNet instance keeps for one call (the plugin object may serve concurrent calls)."""

    image: torch.Tensor  # the control images, one row per image of the call, in the call's dtype and device


class ControlNet(Plugin):
    """ControlNet conditioning: the generated image follows a control image (outlines, masks, depth).

    The residuals follow every UNet pass of the call (``diffsteer_model_inputs``), so extra guidance
    branches (SEGA concepts) and extra passes (SAG's degraded pass) get them too, each row computed with
    its own branch's text embeddings. Several instances in one call sum their residuals, as diffusers'
    ``MultiControlNetModel`` does.

    Guess mode, as in diffusers, runs the ControlNet on every row *except* the branch whose role is
    unconditional (the core's ``uncond``), which gets no residual (zeros): the control then acts through
    the guidance directions. Conditional and extra branches (a SEGA concept, instruct-pix2pix's image-only
    branch) get residuals.

    Args:
        settings: :class:`ControlNetSettings` or a mapping of its fields.
        controlnet: an already loaded :class:`ControlNetModel` (instead of ``model``), or a diffusers
            ``ControlNetModel``, converted to ours once (its weights are copied).

    Example:
        >>> from diffsteer import Pipeline                                          # doctest: +SKIP
        >>> pipe = Pipeline.from_pretrained("shapes")                               # doctest: +SKIP
        >>> cn = ControlNet(model="shapes-outline", image="outline.png")            # doctest: +SKIP
        >>> pipe("a red circle", seed=0, plugins=[cn]).images[0]                    # doctest: +SKIP
    """

    name = NAME
    contract = "1.2"
    # diffusers' names for the core's step window, which every plugin has (diffsteer.scope).
    scope_aliases = {"control_guidance_start": "window_start", "control_guidance_end": "window_end"}
    Settings = ControlNetSettings

    def __init__(self, settings: Any = None, *, controlnet: Any = None, **fields: Any) -> None:
        super().__init__(settings, **fields)
        if controlnet is None and self.settings.model is None:
            raise PluginError(NAME, "needs a ControlNet: set model= (a short name, folder or file) or pass controlnet=")
        try:
            self.controlnet = None if controlnet is None else as_controlnet_model(controlnet)
        except ModelLoadError as exc:
            raise PluginError(NAME, f"controlnet=: {exc}") from None
        # Loaded models by (dtype, device, UNet config); read-only, so concurrent calls may share them.
        self._loaded: dict[tuple[str, str, str], ControlNetModel] = {}

    # -- train command (the CLI asks the class; see diffsteer.commands) -------------------------------

    @staticmethod
    @hookimpl
    def diffsteer_train_commands(register: Callable[["TrainCommand"], None]) -> None:
        from diffsteer.commands import TrainCommand

        from .train import add_arguments, run

        register(TrainCommand("controlnet", "train a ControlNet on a base model", add_arguments, run))

    # -- generation -----------------------------------------------------------------------------------

    def model_for(self, call: "GenerationCall") -> ControlNetModel:
        """The ControlNet in the call's dtype and device, checked against the call's UNet."""
        unet_config = call.unet.config
        key = (str(call.dtype), str(call.device), unet_config.model_dump_json())
        if key not in self._loaded:
            if self.controlnet is not None:
                net = self.controlnet
                if net.dtype != call.dtype or net.device != call.device:
                    # A copy: the caller's model stays as it was, and calls in other dtypes keep theirs.
                    net = copy.deepcopy(net).to(device=call.device, dtype=call.dtype)
                source = "the given controlnet"
            else:
                source = f"model={self.settings.model!r}"
                try:
                    net = load_controlnet(self.settings.model, unet_config=unet_config, dtype=call.dtype, device=call.device)
                except ModelLoadError as exc:
                    raise PluginError(NAME, f"cannot load {source}: {exc}") from None
            problems = net.fit_problems(unet_config)
            vae_factor = call.vae_scale_factor
            if net.config.downscale != vae_factor:
                widths = net.config.conditioning_embedding_out_channels
                problems.append(
                    f"its control-image encoder downsamples by {net.config.downscale} (conditioning_embedding_out_channels "
                    f"{widths}) but this model's VAE by {vae_factor}"
                )
            if problems:
                raise PluginError(NAME, f"{source} does not fit this UNet: " + "; ".join(problems))
            if net is not self.controlnet:
                # Our own copy is frozen: a gradient pass (call.gradients()) builds no graph into it. The
                # caller's own model is left as it is; its residuals are constants of such a pass anyway.
                net.requires_grad_(False)
            self._loaded[key] = net
        return self._loaded[key]

    @hookimpl
    def diffsteer_setup(self, call: "GenerationCall") -> None:
        net = self.model_for(call)
        req = call.request
        config = net.config
        if req.height % config.downscale or req.width % config.downscale:
            raise PluginError(NAME, f"height and width must be multiples of {config.downscale} for this ControlNet")
        image = self._images(call, net).to(device=call.device, dtype=call.dtype)
        call.state_for(self, lambda: ControlNetCallState(image))

    def _images(self, call: "GenerationCall", net: ControlNetModel) -> torch.Tensor:
        """Control images for every image of the call (diffusers' ``prepare_image`` order)."""
        req = call.request
        value = self.settings.image
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            tensors = torch.cat([control_image_tensor(x, req.height, req.width, net.config.conditioning_channels) for x in items])
        except (ValueError, OSError) as exc:
            raise PluginError(NAME, f"image: {exc}") from None
        n, prompts, total = tensors.shape[0], len(req.prompts), call.batch_size
        if n == 1:
            return tensors.repeat_interleave(total, dim=0)
        if n == prompts:
            return tensors.repeat_interleave(req.num_images_per_prompt, dim=0)
        if n == total:
            return tensors
        raise PluginError(
            NAME, f"image: got {n} control images; give 1, one per prompt ({prompts}) or one per image ({total})"
        )

    @hookimpl
    def diffsteer_model_inputs(self, call: "GenerationCall", step: Optional["StepState"], inputs: "UNetInputs") -> None:
        # Outside control_guidance_start/end (the core's step window) this hook is not called: the reference
        # adds 0 * residual there, the same sum without running the ControlNet.
        scale = self.settings.conditioning_scale
        if scale == 0.0:
            return
        net = self.model_for(call)
        image = call.state_for(self, ControlNetCallState).image
        layout = inputs.layout
        guess = self.settings.guess_mode or net.config.global_pool_conditions
        # Guess mode leaves the unconditional branch without control, whatever it is called (by role).
        skip = set(layout.with_role(UNCONDITIONAL)) if guess else set()
        names = [n for n in layout.names if n not in skip]
        if not names:
            return
        rows: Optional[torch.Tensor] = None
        sample, hidden = inputs.sample, inputs.encoder_hidden_states
        if len(names) < len(layout):
            rows = torch.cat([torch.arange(layout.rows(n).start, layout.rows(n).stop) for n in names]).to(sample.device)
            sample, hidden = sample[rows], hidden[rows]
        if inputs.view is not None:
            # A view plan's pass (diffsteer.views): each window takes its crop of the canvas-wide image.
            image = inputs.view.crop(NAME, image)
        cond = image.repeat(len(names), 1, 1, 1)
        down, mid = net(
            sample.to(net.dtype), inputs.timestep, hidden.to(net.dtype), cond.to(net.dtype),
            conditioning_scale=scale, guess_mode=guess,
        )
        if rows is not None:
            down = tuple(_scatter(d, rows, inputs.sample.shape[0]) for d in down)
            mid = _scatter(mid, rows, inputs.sample.shape[0])
        inputs.add_residuals(NAME, down=list(down), mid=mid)


def _scatter(t: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """``t`` at ``rows`` of a zero tensor with ``total`` rows (the branches that get no residual)."""
    out = t.new_zeros((total, *t.shape[1:]))
    out[rows] = t
    return out
