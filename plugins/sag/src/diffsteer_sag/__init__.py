"""diffsteer plugin ``sag``: Self-Attention Guidance (Hong et al., arXiv 2210.00939).

SAG finds the regions the UNet's mid-block self-attention concentrates on, blurs the model's clean
estimate there, noises the blurred estimate back to the current step and asks the UNet again. The
difference between the first and the degraded prediction points away from the blurred version,
and is added to the guided prediction with weight ``sag_scale``:

    prediction = cfg(uncond, cond) + sag_scale * (branch - degraded(branch))

where ``branch`` is ``uncond`` with classifier-free guidance (eq. 25 of the paper) and ``cond``
without it.

>>> from diffsteer import Pipeline                                          # doctest: +SKIP
>>> from diffsteer_sag import Sag                                           # doctest: +SKIP
>>> pipe = Pipeline.from_pretrained("shapes", scheduler="ddim")             # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20, seed=0, plugins=[Sag(sag_scale=0.75)])  # doctest: +SKIP

The math follows diffusers' ``StableDiffusionSAGPipeline`` (0.42.1) step for step; ``docs/sag.md``
says where this plugin goes further (sigma schedulers such as Euler, which the reference refuses).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from diffsteer import AttentionPatch, Plugin, PluginError, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffsteer import BranchPredictions, GenerationCall, StepState

__all__ = [
    "MID_SELF_ATTENTION", "PASS_NAME", "Sag", "SagSettings", "attended_keys", "degrade", "gaussian_blur_2d", "map_size",
]
__version__ = "0.1.0"

#: The layers SAG reads: the mid block's self-attention (the first one, as in the reference).
MID_SELF_ATTENTION = "mid_block.*attn1"
#: Name of SAG's extra UNet pass (``call.pass_name`` / ``inputs.pass_name`` while it runs).
PASS_NAME = "sag"


class SagSettings(BaseModel):
    """Settings of :class:`Sag`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sag_scale: float = Field(
        0.75, ge=0,
        description="weight of the self-attention guidance term (diffusers: sag_scale); 0 turns SAG off",
    )
    blur_sigma: float = Field(
        1.0, gt=0, le=8,
        description="standard deviation, in latent pixels, of the Gaussian blur of the attended regions; "
        "the kernel spans 2*ceil(4*sigma)+1 pixels (9 for the default, as in diffusers)",
    )

    @property
    def kernel_size(self) -> int:
        """Side of the blur kernel: covers +-4 sigma (9 at sigma 1, diffusers' fixed value)."""
        return 2 * math.ceil(4 * self.blur_sigma) + 1


# -- the math ----------------------------------------------------------------------------------------------


def gaussian_blur_2d(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur per channel with reflect padding, ``(B, C, H, W)`` -> same shape.

    Operation for operation the reference's ``gaussian_blur_2d`` (one 2-D kernel, the outer product of
    the normalised 1-D one), so fp32 results agree bit for bit.
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel_1d = (pdf / pdf.sum()).to(device=images.device, dtype=images.dtype)
    kernel_2d = torch.mm(kernel_1d[:, None], kernel_1d[None, :])
    kernel_2d = kernel_2d.expand(images.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(images, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel_2d, groups=images.shape[-3])


def attended_keys(probs: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Which key positions the self-attention concentrates on: ``(B, heads, q, k)`` -> ``(B, k)`` bool.

    A key is *attended* when its attention summed over all queries, averaged over heads, exceeds
    ``threshold``. Each query's row sums to 1, so the mean over keys of that sum is exactly 1: the
    default marks the keys that receive more than an average share.
    """
    return probs.float().mean(dim=1).sum(dim=1) > threshold


def map_size(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` attention positions under a ``latent_hw`` latent.

    Each UNet down block halves the size, rounding up (its stride-2 convolution pads by 1); the
    reference reads the same size off a forward hook on the mid block.
    """
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} attention positions are no halving of a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w


def degrade(x0: torch.Tensor, keys: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``x0`` ``(B, C, h, w)`` where the mid-block attention concentrates (``keys``, ``(B, tokens)``)."""
    b, channels, h, w = x0.shape
    mh, mw = map_size((h, w), keys.shape[-1])
    mask = keys.reshape(b, mh, mw).unsqueeze(1).repeat(1, channels, 1, 1).to(x0.dtype)
    mask = F.interpolate(mask, (h, w))  # nearest, as in the reference
    blurred = gaussian_blur_2d(x0, kernel_size=kernel_size, sigma=sigma)
    return blurred * mask + x0 * (1 - mask)


# -- the plugin ---------------------------------------------------------------------------------------------


@dataclass
class SagCallState:
    """What one Sag instance keeps for one call (the plugin object may serve concurrent calls)."""

    label: str = "sag"  # "sag", or "sag#2" for the second instance of a call: names its outputs
    active: bool = False  # sag_scale > 0: as in the reference, 0 skips all of it
    layer: str = ""  # the mid-block self-attention layer observed
    branch: str = "uncond"  # the branch degraded and re-predicted
    keys: Optional[torch.Tensor] = None  # this step's attended-key map, from the main pass
    masks: list[torch.Tensor] = field(default_factory=list)  # each step's map, for call.outputs


class Sag(Plugin):
    """Self-attention guidance: guide away from a version blurred where the UNet attends.

    Each step costs one extra UNet pass over one branch (``uncond`` with classifier-free guidance,
    else ``cond``): the degraded re-prediction, run through ``call.predict`` so conditioning plugins
    (ControlNet residuals, extra input channels) follow it with that branch's rows.

    Example:
        >>> Sag(sag_scale=1.0).settings.kernel_size
        9

    Raises:
        diffsteer.SettingsError: a field is out of range (names ``sag.<field>``).
        diffsteer.PluginError: the UNet has no mid-block self-attention, or the latents are too small
            for the blur kernel.

    A call's masks come back in ``output.extras["sag"]["masks"]``: ``(steps, batch, h, w)`` bool at the
    mid block's resolution, true where the latents were blurred.
    """

    name = "sag"
    contract = "1.1"
    Settings = SagSettings
    settings: SagSettings

    # -- hooks ------------------------------------------------------------------------------------------
    @hookimpl
    def diffsteer_setup(self, call: "GenerationCall") -> None:
        state = call.state_for(self, SagCallState)
        mine = [p for p in call.plugins if isinstance(p, Sag)]
        rank = next(i for i, p in enumerate(mine) if p is self)
        state.label = self.name if rank == 0 else f"{self.name}#{rank + 1}"
        state.active = self.settings.sag_scale > 0
        if not state.active:
            return
        layers = [n for n in call.unet.attention_layers() if fnmatch.fnmatchcase(n, MID_SELF_ATTENTION)]
        if not layers:
            raise PluginError(
                self.name,
                "self-attention guidance reads the UNet's mid-block self-attention, and this UNet has none "
                f"(no attention layer matches {MID_SELF_ATTENTION!r})",
            )
        state.layer, state.branch = layers[0], "uncond" if call.request.do_cfg else "cond"
        # The reflect padding of the blur needs more latent pixels than it pads.
        h, w = call.latent_shape[-2:]
        s = self.settings
        if min(h, w) <= s.kernel_size // 2:
            raise PluginError(
                self.name,
                f"the latents are {h}x{w}, too small for a {s.kernel_size}x{s.kernel_size} blur "
                f"(blur_sigma={s.blur_sigma:g}); they must be larger than {s.kernel_size // 2} on each side: "
                "lower blur_sigma or generate larger images",
            )

    @hookimpl
    def diffsteer_attention_patches(self, call: "GenerationCall", register: Callable[[AttentionPatch], None]) -> None:
        state = call.state_for(self, SagCallState)
        if not state.active:
            return
        branch = state.branch

        def observe(layer: str, probs: torch.Tensor) -> None:
            # Only the main pass holds the rows SAG degrades; its own pass and other plugins' extra
            # passes stack other rows.
            if call.pass_name != "main":
                return
            state.keys = attended_keys(probs[call.pass_layout.rows(branch)])

        register(AttentionPatch(self.name, state.layer, observe=observe))

    @hookimpl
    def diffsteer_guidance(
        self, call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
    ) -> Optional[torch.Tensor]:
        state = call.state_for(self, SagCallState)
        if not state.active:
            return None
        keys, state.keys = state.keys, None
        if keys is None:
            raise PluginError(self.name, f"the mid-block self-attention was not observed in step {step.index}'s main pass")
        try:
            grid = map_size(tuple(step.latents.shape[-2:]), keys.shape[-1])
        except ValueError as exc:
            raise PluginError(self.name, f"cannot place the mid-block attention map on the latents: {exc}") from None
        branch, s, sched = state.branch, self.settings, call.step_scheduler
        pred = predictions[branch]
        x0, eps = sched.split_model_output(pred, step.latents, step.timestep)
        degraded = sched.renoise(degrade(x0, keys, s.kernel_size, s.blur_sigma), eps, step.timestep)
        layout = call.layout.subset([branch])
        degraded_pred = call.predict(degraded, step.timestep, layout, pass_name=PASS_NAME)[branch]
        state.masks.append(keys.reshape(keys.shape[0], *grid).cpu())
        return s.sag_scale * (pred - degraded_pred)

    @hookimpl
    def diffsteer_teardown(self, call: "GenerationCall", error: Optional[BaseException]) -> None:
        state = call.state_for(self, SagCallState)
        if error is None and state.masks:
            call.outputs[state.label] = {"masks": torch.stack(state.masks)}
