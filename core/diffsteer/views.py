"""Per-view UNet passes: denoising a canvas as windows (MultiDiffusion, arXiv 2302.08113).

A plugin that returns a :class:`ViewPlan` from :func:`~diffsteer.hookspecs.diffsteer_plan_views` makes each
step of the main loop run over windows of the canvas latents instead of the whole: for each batch of views the
core crops the latents, runs the step's prediction hooks on the crop (``model_inputs``,
``noise_prediction``, ``combine_guidance``, ``guidance``) and the scheduler step with **that batch's own
scheduler state**, then averages the views' results into the canvas, weighted per cell. ``pre_step`` and
``post_step`` see the whole canvas, once per step.

diffusers' ``StableDiffusionPanoramaPipeline`` once shared one scheduler across views, so multistep schedulers
mixed the history of different windows (diffusers#3494); here every batch of views steps a scheduler of its own.

During a view pass hooks see ``step.view`` (a :class:`ViewBatch`), ``inputs.view`` the same, ``call.layout``
as the views' layout (every branch holding one row per image per view) and ``call.step_scheduler`` as the
batch's scheduler. An injector whose conditioning is canvas-sized crops it with ``inputs.view.crop(owner, x)``
(ControlNet does), and regions are cropped by the core.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Union

import torch

from .branches import BranchLayout
from .errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall, StepState
    from .schedulers import Scheduler

Size = Union[int, tuple[int, int]]


def _pair(value: Size) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class View:
    """One window of the canvas latents, in latent cells.

    ``left + width`` may pass the canvas's right edge in a plan that wraps (360° panoramas): the columns
    continue from the left edge. ``weight`` (``(height, width)``, ``>= 0``) weighs the view's result in each
    cell's average (a region's mask); ``None`` is 1 everywhere. ``embeddings`` replaces the named branches'
    embeddings (``{branch: (batch, tokens, hidden)}``) for this view only: a region's own prompt.
    """

    top: int
    left: int
    height: int
    width: int
    weight: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    embeddings: Optional[Mapping[str, torch.Tensor]] = field(default=None, repr=False, compare=False)

    def columns(self, canvas_width: int, scale: int = 1) -> torch.Tensor:
        """The canvas column of each of the view's columns at ``scale`` (pixels per latent cell), wrapped."""
        return (torch.arange(self.left * scale, (self.left + self.width) * scale)) % (canvas_width * scale)


@dataclass(frozen=True)
class ViewPlan:
    """The views one call denoises: all of the same size, ``batch_size`` of them per UNet pass.

    ``wrap=True`` lets views run past the right edge onto the left one (``circular_padding``).
    """

    views: tuple[View, ...]
    batch_size: int = 1
    wrap: bool = False

    @classmethod
    def grid(cls, canvas: Size, window: Size, stride: Size, *, batch_size: int = 1, wrap: bool = False) -> "ViewPlan":
        """Windows of ``window`` cells every ``stride`` cells over a ``canvas`` of latent cells, row by row.

        Along an axis shorter than or equal to the window there is one view of the canvas's length. Without
        ``wrap`` the views start at ``0, stride, 2·stride, ...`` while they fit; where the last one would stop
        short of the edge, one more view ends at the edge, so every cell is covered. With ``wrap`` the
        columns start every ``stride`` cells round the whole width (``width // stride`` views) and the last
        ones run over the right edge.
        """
        (ch, cw), (wh, ww), (sh, sw) = _pair(canvas), _pair(window), _pair(stride)
        if min(ch, cw, wh, ww, sh, sw) < 1:
            raise ValueError(f"canvas {ch}x{cw}, window {wh}x{ww} and stride {sh}x{sw} must all be positive")
        wh, ww = min(wh, ch), min(ww, cw)
        tops = _starts(ch, wh, sh)
        if wrap and cw > ww:
            if cw % sw:
                raise ValueError(f"a wrapping plan needs the stride ({sw}) to divide the canvas width ({cw})")
            lefts = list(range(0, cw, sw))
        else:
            lefts = _starts(cw, ww, sw)
        views = tuple(View(t, l, wh, ww) for t in tops for l in lefts)
        return cls(views, batch_size=batch_size, wrap=wrap and cw > ww)

    def batches(self) -> list[tuple[View, ...]]:
        """The views in UNet passes of at most ``batch_size``, in plan order."""
        return [self.views[i:i + self.batch_size] for i in range(0, len(self.views), self.batch_size)]


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class ViewBatch:
    """The views of one UNet pass, as hooks see them (``step.view``, ``inputs.view``).

    Rows are view-major: view ``j`` holds rows ``[j * rows, (j + 1) * rows)`` of every per-image tensor of
    the pass (``rows`` is the call's batch size), and each branch of ``call.layout`` stacks them so.
    """

    views: tuple[View, ...]
    #: The canvas in latent cells ``(height, width)``.
    canvas: tuple[int, int]
    #: Images of the call (rows per view).
    rows: int
    #: Which batch of the plan this is (``0 ..``); per-view plugin state is keyed by it.
    index: int = 0

    def __len__(self) -> int:
        return len(self.views)

    def _scale(self, owner: str, tensor: torch.Tensor) -> int:
        h, w = tensor.shape[-2:]
        ch, cw = self.canvas
        if h % ch or w % cw or h // ch != w // cw:
            raise PluginError(owner, f"cannot crop a {h}x{w} tensor to the views of a {ch}x{cw}-cell canvas: "
                              "it must be the canvas's size in latent cells or in pixels")
        return h // ch

    def crop(self, owner: str, tensor: torch.Tensor) -> torch.Tensor:
        """Each view's window of a canvas-sized ``tensor`` (latent- or pixel-sized), stacked view-major.

        ``tensor`` has ``rows`` rows (one per image) or one row (shared); the result has ``len(views)`` times as
        many. A size that is not the canvas's in latent cells or in pixels raises
        :class:`~diffsteer.errors.PluginError` naming ``owner``.
        """
        s = self._scale(owner, tensor)
        cw = self.canvas[1]
        parts = []
        for v in self.views:
            rows = tensor[..., v.top * s:(v.top + v.height) * s, :]
            if v.left + v.width <= cw:
                parts.append(rows[..., v.left * s:(v.left + v.width) * s])
            else:
                parts.append(rows.index_select(-1, v.columns(cw, s).to(tensor.device)))
        return torch.cat(parts)

    def crop_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A ``(1, 1, H, W)`` canvas mask cropped to each view, one row per image of each view."""
        return self.crop("core", mask).repeat_interleave(self.rows, dim=0)

    def layout(self, base: BranchLayout) -> BranchLayout:
        """``base`` with each branch stacked over the views (a view's ``embeddings`` replace its rows)."""
        out = BranchLayout(base.batch_size * len(self.views))
        for b in base:
            rows = []
            for v in self.views:
                given = (v.embeddings or {}).get(b.name)
                rows.append(b.embeddings if given is None else given.to(b.embeddings))
            out.add(b.name, torch.cat(rows), b.owner, b.role)
        return out

    def view_weights(self, like: torch.Tensor) -> torch.Tensor:
        """Each view's fusion weight as one ``(1, h, w)`` row per view, in ``like``'s dtype and device."""
        h, w = self.views[0].height, self.views[0].width
        out = [torch.ones(1, 1, h, w) if v.weight is None else v.weight.reshape(1, 1, h, w).float() for v in self.views]
        return torch.cat(out).to(like.device, like.dtype)

    def add_into(self, canvas: torch.Tensor, per_view: torch.Tensor) -> None:
        """Add each view's rows of ``per_view`` (``len(views) * r`` rows, view-major) into its window of
        ``canvas`` (``r`` rows), in place; columns past the right edge of a wrapping view go to the left."""
        cw = self.canvas[1]
        r = per_view.shape[0] // len(self.views)
        for j, v in enumerate(self.views):
            window = canvas[..., v.top:v.top + v.height, :]
            window.index_add_(-1, v.columns(cw).to(canvas.device), per_view[j * r:(j + 1) * r])


def coverage(plan: ViewPlan, canvas: tuple[int, int]) -> torch.Tensor:
    """The summed view weight of each latent cell, ``(1, 1, h, w)``: what each step divides the views' sum by."""
    cover = torch.zeros(1, 1, *canvas)
    views = ViewBatch(plan.views, canvas, 1)
    views.add_into(cover, views.view_weights(cover))
    return cover


def check_plan(owner: str, plan: object, canvas: tuple[int, int]) -> ViewPlan:
    """``plan`` if it is a :class:`ViewPlan` of one view size, inside ``canvas``, with valid weights (the
    :class:`ViewRunner` then checks that every cell has weight)."""
    if not isinstance(plan, ViewPlan):
        raise PluginError(owner, f"diffsteer_plan_views returned a {type(plan).__name__}, not a ViewPlan")
    ch, cw = canvas
    if not plan.views:
        raise PluginError(owner, "planned no views")
    if plan.batch_size < 1:
        raise PluginError(owner, f"view batch_size must be at least 1, got {plan.batch_size}")
    sizes = {(v.height, v.width) for v in plan.views}
    if len(sizes) > 1:
        raise PluginError(owner, f"views must all be one size to batch them, got {sorted(sizes)}")
    for v in plan.views:
        if v.top < 0 or v.left < 0 or v.top + v.height > ch or (not plan.wrap and v.left + v.width > cw):
            raise PluginError(owner, f"view {v.top, v.left, v.height, v.width} (top, left, height, width) leaves "
                              f"the {ch}x{cw}-cell canvas" + ("" if plan.wrap else " (only a wrap=True plan may pass the right edge)"))
        if v.width > cw:
            raise PluginError(owner, f"a view is {v.width} cells wide, the canvas {cw}")
        if v.weight is not None:
            if tuple(v.weight.shape[-2:]) != (v.height, v.width) or v.weight.numel() != v.height * v.width:
                raise PluginError(owner, f"a view's weight is {tuple(v.weight.shape)}, its window {v.height}x{v.width}")
            if not torch.isfinite(v.weight).all() or float(v.weight.min()) < 0:
                raise PluginError(owner, "view weights must be finite and non-negative")
    return plan


class ViewRunner:
    """Runs the main loop's steps of one call over a :class:`ViewPlan` (each batch its own scheduler)."""

    def __init__(self, call: "GenerationCall", owner: str, plan: ViewPlan) -> None:
        self.call, self.owner, self.plan = call, owner, plan
        h, w = call.latent_shape[-2:]
        self.canvas = (h, w)
        self.batches = [ViewBatch(b, self.canvas, call.batch_size, i) for i, b in enumerate(plan.batches())]
        # A copy per batch of the scheduler as the call set it (timesteps, begin index), before any step.
        self.schedulers: list["Scheduler"] = [copy.deepcopy(call.scheduler) for _ in self.batches]
        self._layouts: dict[int, tuple[int, BranchLayout]] = {}
        # The weights never change during a call: each cell's total is computed once.
        self.count = coverage(plan, self.canvas)
        if float(self.count.min()) <= 0:
            empty = int((self.count <= 0).sum())
            raise PluginError(owner, f"the views leave {empty} of the canvas's {h * w} latent cells without weight")

    def _layout(self, batch: ViewBatch, base: BranchLayout) -> BranchLayout:
        cached = self._layouts.get(batch.index)
        if cached is None or cached[0] != id(base):
            cached = (id(base), batch.layout(base))
            self._layouts[batch.index] = cached
        return cached[1]

    def step(self, step: "StepState", denoise: Callable[["StepState"], None]) -> None:
        """Denoise the canvas ``step`` view by view: ``denoise(view_step)`` runs one view batch's prediction
        and scheduler step (it sets ``view_step.latents``, ``prediction`` and ``pred_original``); the views'
        results are averaged into ``step``'s fields."""
        from .call import StepState

        call = self.call
        canvas = step.latents
        sums: dict[str, torch.Tensor] = {}
        count = self.count.to(canvas.device, canvas.dtype)
        saved = (call.step, call.layout, call._loop_scheduler)
        assert saved[1] is not None, "views run once prompts are encoded"
        try:
            for batch, scheduler in zip(self.batches, self.schedulers):
                view_step = StepState(index=step.index, timestep=step.timestep, latents=batch.crop(self.owner, canvas),
                                      num_steps=step.num_steps, loop=step.loop, view=batch)
                call.step, call.layout, call._loop_scheduler = view_step, self._layout(batch, saved[1]), scheduler
                denoise(view_step)
                weight = batch.view_weights(canvas).repeat_interleave(batch.rows, dim=0)
                for name in ("latents", "prediction", "pred_original"):
                    value = getattr(view_step, name)
                    if value is not None:
                        if name not in sums:
                            sums[name] = torch.zeros_like(canvas)
                        batch.add_into(sums[name], value * weight)
        finally:
            call.step, call.layout, call._loop_scheduler = saved
        step.latents = sums["latents"] / count
        step.prediction = sums["prediction"] / count if "prediction" in sums else None
        step.pred_original = sums["pred_original"] / count if "pred_original" in sums else None


def plan_views(call: "GenerationCall") -> Optional[ViewRunner]:
    """Fire :func:`~diffsteer.hookspecs.diffsteer_plan_views`; the call's :class:`ViewRunner`, or ``None``."""
    from .hook_chain import is_wrapper
    from .plugins import plugin_label

    caller = call.scoped.relay(None).diffsteer_plan_views
    planners = [i.plugin for i in caller.get_hookimpls() if not is_wrapper(i)]
    plan = caller(call=call)
    if plan is None:
        return None
    # Exclusive: at most one plugin implements it (checked when the call starts).
    owner = plugin_label(planners[0]) if planners else "core"
    return ViewRunner(call, owner, check_plan(owner, plan, tuple(call.latent_shape[-2:])))
