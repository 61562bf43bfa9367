"""Sub-loops: a plugin's own run of steps inside a call (DDIM inversion for DiffEdit and pix2pix-zero).

A sub-loop drives its own scheduler instance over its own timesteps, with the call's UNet passes: every
pass goes through :meth:`~diffsteer.call.GenerationCall.predict`, so the call's tokens, weight overrides,
``model_inputs`` conditioning (ControlNet residuals) and attention patches act in it as in the main loop.
The main loop's scheduler, step and timesteps are untouched; the per-step hooks of the main loop
(``pre_step``, ``noise_prediction``, ``guidance``, ``post_step``) do not fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from .branches import CONDITIONAL, UNCONDITIONAL, BranchLayout, BranchPredictions
from .errors import GenerationError, PluginError
from .schedulers import Scheduler, make_scheduler

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall, StepState

#: ``adjust(step, guided) -> guided or None``: changes the guided prediction before the scheduler step.
PredictionEdit = Callable[["StepState", torch.Tensor], Optional[torch.Tensor]]


@dataclass
class Trajectory:
    """What a sub-loop ran through.

    ``latents[0]`` is the start and ``latents[i + 1]`` the latents after step ``i`` (at ``timesteps[i]``
    for an inversion, which steps *up* to each timestep); ``predictions[i]`` is the guided model output of
    step ``i`` and ``pred_original[i]`` the scheduler's x0 estimate there (both only when asked for).
    """

    timesteps: torch.Tensor
    latents: list[torch.Tensor]
    predictions: Optional[list[torch.Tensor]] = None
    pred_original: Optional[list[Optional[torch.Tensor]]] = None

    @property
    def final(self) -> torch.Tensor:
        """The latents after the last step (the inverted noise of an inversion)."""
        return self.latents[-1]


def loop_scheduler(call: "GenerationCall", owner: str, scheduler: Union[str, Scheduler]) -> Scheduler:
    """A fresh scheduler for a sub-loop: by name (built from the model's scheduler config) or from an instance."""
    if isinstance(scheduler, Scheduler):
        return scheduler.fresh()  # never the caller's instance, so never the main loop's state
    if not isinstance(scheduler, str):
        raise PluginError(owner, f"a sub-loop's scheduler must be a name or a Scheduler, not {type(scheduler).__name__}")
    try:
        return make_scheduler(scheduler, call.scheduler.to_diffusers_config())
    except ValueError as exc:
        raise PluginError(owner, f"sub-loop scheduler: {exc}") from None


def loop_timesteps(
    sched: Scheduler, owner: str, num_steps: int, strength: float, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The sub-loop's timesteps: the ``int(num_steps * strength)`` least noisy steps of the schedule.

    A descending schedule (sampling) keeps its last steps, as img2img does; an ascending one (inversion)
    its first, which are the noise levels a main loop narrowed by the same ``strength`` denoises through.
    """
    if not 0 < strength <= 1:
        raise PluginError(owner, f"sub-loop strength must lie in (0, 1], got {strength}")
    try:
        sched.set_timesteps(num_steps, device=device)
    except ValueError as exc:
        raise PluginError(owner, f"sub-loop: {exc}") from None
    kept = min(int(num_steps * strength), num_steps)
    if kept == 0:
        raise PluginError(owner, f"sub-loop strength={strength} leaves no steps out of {num_steps}")
    ts, order = sched.timesteps, sched.order
    if len(ts) > 1 and ts[0] < ts[-1]:
        return ts[: kept * order]
    first = (num_steps - kept) * order
    if first:
        sched.set_begin_index(first)
    return ts[first:]


def default_layout(call: "GenerationCall", owner: str, guidance_scale: float) -> BranchLayout:
    """The call's conditional branch, with an unconditional one in front when ``guidance_scale > 1`` (the call's,
    or the negative prompts encoded now when the call itself runs without guidance)."""
    if call.layout is None:  # pragma: no cover - the layout exists whenever a sub-loop may run
        raise PluginError(owner, "a sub-loop needs the call's prompts encoded")
    layout = call.layout.subset(call.layout.with_role(CONDITIONAL))
    if guidance_scale <= 1:
        return layout
    uncond = call.layout.with_role(UNCONDITIONAL)
    if uncond:
        return call.layout.subset(uncond + layout.names)
    # The main loop runs without guidance: encode the negative prompts (or "") as the core would.
    req = call.request
    guided = BranchLayout(layout.batch_size)
    guided.add("uncond", call.encode_per_image(req.negative_prompts or [""] * len(req.prompts)), role=UNCONDITIONAL)
    for branch in layout:
        guided.add(branch.name, branch.embeddings, branch.owner, branch.role)
    return guided


def guide(owner: str, layout: BranchLayout, predictions: BranchPredictions, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over ``layout``'s conditional and unconditional branches."""
    cond = layout.with_role(CONDITIONAL)
    if len(cond) != 1:
        raise PluginError(owner, f"a sub-loop's layout needs one conditional branch, got {cond} (branches {layout.names})")
    if guidance_scale <= 1:
        return predictions[cond[0]]
    uncond = layout.with_role(UNCONDITIONAL)
    if len(uncond) != 1:
        raise PluginError(owner, f"guidance_scale={guidance_scale} needs one unconditional branch in the sub-loop's "
                          f"layout, got {uncond} (branches {layout.names})")
    return predictions[uncond[0]] + guidance_scale * (predictions[cond[0]] - predictions[uncond[0]])


def run_subloop(
    call: "GenerationCall",
    owner: str,
    latents: torch.Tensor,
    scheduler: Union[str, Scheduler],
    num_steps: int,
    *,
    strength: float = 1.0,
    layout: Optional[BranchLayout] = None,
    guidance_scale: float = 1.0,
    adjust: Optional[PredictionEdit] = None,
    keep_predictions: bool = False,
    name: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> Trajectory:
    """Run ``scheduler`` from ``latents`` with the call's UNet passes; see :meth:`GenerationCall.run_subloop`."""
    from .call import StepState  # call.py imports this module lazily; keep the cycle one-way at import time

    if not call._patches_ready:
        raise PluginError(owner, "runs a sub-loop before prepare_latents; the call's weight overrides and attention "
                          "patches are not in place until then: run it from diffsteer_prepare_latents or later")
    sched = loop_scheduler(call, owner, scheduler)
    timesteps = loop_timesteps(sched, owner, num_steps, strength, call.device)
    layout = layout if layout is not None else default_layout(call, owner, guidance_scale)
    loop = name or owner
    if loop in ("main", "predict"):
        raise PluginError(owner, f"a sub-loop cannot be named {loop!r} (the core's own loop names)")
    if latents.shape[0] != layout.batch_size:
        raise PluginError(owner, f"sub-loop latents have {latents.shape[0]} rows, the layout {layout.batch_size}")
    ascending = len(timesteps) > 1 and bool(timesteps[0] < timesteps[-1])
    x = latents.to(call.device, torch.float32)
    trajectory = Trajectory(timesteps=timesteps, latents=[x], predictions=[] if keep_predictions else None,
                            pred_original=[] if keep_predictions else None)
    saved = (call.step, call._loop_scheduler, call.unet_context)
    call._loop_scheduler = sched
    try:
        for index, t in enumerate(timesteps):
            step = StepState(index=index, timestep=t, latents=x, num_steps=len(timesteps), loop=loop,
                             denoise_index=len(timesteps) - 1 - index if ascending else None)
            call.step = step
            if call.scoped.windowed:
                call._use_patches(step)
            preds = call.predict(x, t, layout, pass_name=loop)
            guided = guide(owner, layout, preds, guidance_scale)
            if adjust is not None:
                edited = adjust(step, guided)
                guided = guided if edited is None else edited
            out = sched.step(guided, t, x, generator=generator if generator is not None else call.generator)
            x = out.prev_sample
            if not torch.isfinite(x).all():
                raise GenerationError(f"sub-loop {loop!r} of plugin {owner!r}: latents became NaN or inf at its step "
                                      f"{index} (timestep {int(t)})")
            step.latents, step.prediction, step.pred_original = x, guided, out.pred_original_sample
            trajectory.latents.append(x)
            if trajectory.predictions is not None and trajectory.pred_original is not None:
                trajectory.predictions.append(guided)
                trajectory.pred_original.append(out.pred_original_sample)
    finally:
        call.step, call._loop_scheduler, call.unet_context = saved
    return trajectory
