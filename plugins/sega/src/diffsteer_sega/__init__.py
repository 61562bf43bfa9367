"""diffsteer plugin ``sega``: Semantic Guidance (Brack et al., arXiv 2301.12247).

SEGA steers a generation toward (or away from) *concepts* given as text. Each concept's prompt becomes
an extra branch of the batched UNet call that already holds classifier-free guidance's ``uncond`` and
``cond`` rows; its guidance direction ``concept - uncond`` is scaled, thresholded to its largest
entries per channel, weighted, given momentum, and added to the guided prediction.

>>> from diffsteer import Pipeline                                           # doctest: +SKIP
>>> from diffsteer_sega import Sega                                          # doctest: +SKIP
>>> pipe = Pipeline.from_pretrained("shapes", scheduler="ddim")              # doctest: +SKIP
>>> sega = Sega(concepts=[{"prompt": "red", "guidance_scale": 5, "warmup_steps": 2}])  # doctest: +SKIP
>>> pipe("a circle", num_inference_steps=20, seed=0, plugins=[sega])         # doctest: +SKIP

The math follows diffusers' ``SemanticStableDiffusionPipeline`` (0.42.1) step for step; see
``docs/sega.md`` for the parameter mapping and the one place where we deliberately differ (a
division by zero that makes the reference produce NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffsteer import Plugin, PluginError, SettingsError, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffsteer import BranchLayout, BranchPredictions, GenerationCall, StepState

__all__ = ["Concept", "Sega", "SegaSettings", "concept_guidance", "sega_step"]
__version__ = "0.1.0"


class Concept(BaseModel):
    """One SEGA concept: a text to steer toward (or away from, ``reverse=True``).

    Every field has the reference's default; ``docs/sega.md`` maps each to its diffusers argument.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="the concept text (diffusers: editing_prompt)")
    reverse: bool = Field(
        False, description="steer away from the concept instead of toward it (reverse_editing_direction)"
    )
    guidance_scale: float = Field(5.0, ge=0, description="scale of the concept's direction (edit_guidance_scale)")
    warmup_steps: int = Field(
        10, ge=0, description="steps before the concept is applied; momentum builds up meanwhile (edit_warmup_steps)"
    )
    cooldown_steps: Optional[int] = Field(
        None, ge=1, description="step index from which the concept is no longer applied; None: never (edit_cooldown_steps)"
    )
    threshold: float = Field(
        0.9, ge=0, lt=1,
        description="quantile of |guidance| per channel below which entries are dropped: 0.9 keeps the top 10% (edit_threshold)",
    )
    weight: float = Field(1.0, ge=0, description="relative influence of this concept (edit_weights)")

    @model_validator(mode="after")
    def _window_not_empty(self) -> "Concept":
        if self.cooldown_steps is not None and self.cooldown_steps <= self.warmup_steps:
            raise ValueError(
                f"cooldown_steps ({self.cooldown_steps}) must be greater than warmup_steps "
                f"({self.warmup_steps}), or the concept is never applied"
            )
        return self


class SegaSettings(BaseModel):
    """Settings of :class:`Sega`: the concepts plus the momentum shared by all of them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    concepts: list[Concept] = Field(
        default_factory=list,
        description="the concepts; a plain string is a concept with default settings. None: plain generation",
    )
    momentum_scale: float = Field(
        0.1, ge=0, description="scale of the momentum added to the concept guidance; 0 disables it (edit_momentum_scale)"
    )
    momentum_beta: float = Field(
        0.4, ge=0, le=1, description="how much of the previous momentum is kept each step (edit_mom_beta)"
    )

    @field_validator("concepts", mode="before")
    @classmethod
    def _strings_are_prompts(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):  # one concept given bare
            value = [value]
        if isinstance(value, (list, tuple)):
            return [{"prompt": v} if isinstance(v, str) else v for v in value]
        return value


def concept_guidance(
    concept: torch.Tensor, uncond: torch.Tensor, scale: float, threshold: float, reverse: bool
) -> torch.Tensor:
    """One concept's thresholded guidance term, ``(batch, channels, h, w)``.

    ``scale * ±(concept - uncond)``, keeping per image and channel only the entries whose magnitude
    reaches the ``threshold`` quantile of that channel's magnitudes (0.9 keeps the largest 10%).
    """
    direction = concept - uncond
    if reverse:
        direction = -direction
    direction = direction * scale
    magnitude = direction.abs()
    # torch.quantile needs float32/64: predictions reach hooks in float32 whatever the UNet's dtype.
    cutoff = torch.quantile(magnitude.flatten(start_dim=2).float(), threshold, dim=2).to(direction.dtype)
    return torch.where(magnitude >= cutoff[..., None, None], direction, torch.zeros_like(direction))


GuidanceInput = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class SegaCallState:
    """What one Sega instance keeps for one call (the plugin object may serve concurrent calls)."""

    label: str = "sega"  # "sega", or "sega#2" for the second instance of a call: names its branches and outputs
    branches: list[str] = field(default_factory=list)


@dataclass
class SegaViewState:
    """What follows the latents from step to step: one per call, or one per view batch of a view plan."""

    momentum: Optional[torch.Tensor] = None
    applied: list[torch.Tensor] = field(default_factory=list)  # the term of each step, for call.outputs


class Sega(Plugin):
    """Semantic Guidance: steer generation toward or away from text concepts.

    Args:
        settings: a :class:`SegaSettings` or a mapping of its fields (or give them as keywords).
        sem_guidance: optional pre-computed guidance, one tensor per denoising step (a list, or a
            tensor whose first dimension is the step), added to the guided prediction at that step on
            top of the concepts' own term: diffusers' ``sem_guidance``. A call's applied terms come back
            in ``output.extras["sega"]["sem_guidance"]`` (``(steps, batch, channels, h, w)``), so
            passing them here with no concepts replays that call's guidance without the concept branches.

    Example:
        >>> sega = Sega(concepts=["red", {"prompt": "blue", "reverse": True}], momentum_scale=0.3)
        >>> [(c.prompt, c.reverse) for c in sega.settings.concepts]
        [('red', False), ('blue', True)]

    Raises:
        diffsteer.SettingsError: a field is out of range (names ``sega.<field>``).
    """

    name = "sega"
    contract = "1.2"
    Settings = SegaSettings
    settings: SegaSettings

    def __init__(
        self,
        settings: Union[BaseModel, Mapping[str, Any], None] = None,
        *,
        sem_guidance: Optional[GuidanceInput] = None,
        **fields: Any,
    ) -> None:
        super().__init__(settings, **fields)
        self.sem_guidance: Optional[list[torch.Tensor]] = None
        if sem_guidance is not None:
            steps = list(sem_guidance)
            if not steps or not all(isinstance(t, torch.Tensor) for t in steps):
                raise SettingsError(self.name, [("sem_guidance", "must be a non-empty list of tensors, one per step")])
            self.sem_guidance = steps

    @classmethod
    def from_diffusers(
        cls,
        editing_prompt: Union[str, Sequence[str], None] = None,
        reverse_editing_direction: Union[bool, Sequence[bool]] = False,
        edit_guidance_scale: Union[float, Sequence[float]] = 5,
        edit_warmup_steps: Union[int, Sequence[int]] = 10,
        edit_cooldown_steps: Union[int, Sequence[int], None] = None,
        edit_threshold: Union[float, Sequence[float]] = 0.9,
        edit_momentum_scale: float = 0.1,
        edit_mom_beta: float = 0.4,
        edit_weights: Optional[Sequence[float]] = None,
        sem_guidance: Optional[GuidanceInput] = None,
    ) -> "Sega":
        """Build a :class:`Sega` from ``SemanticStableDiffusionPipeline``'s argument names and defaults.

        As there, a per-concept argument is either one value for all concepts or a list with one
        value per concept.

        Example:
            >>> sega = Sega.from_diffusers(["red", "blue"], reverse_editing_direction=[False, True],
            ...                            edit_warmup_steps=[2, 4], edit_weights=[1, 2])
            >>> [(c.prompt, c.reverse, c.warmup_steps, c.weight) for c in sega.settings.concepts]
            [('red', False, 2, 1.0), ('blue', True, 4, 2.0)]
        """
        prompts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt or [])
        given = {  # diffusers name -> (our field, value)
            "reverse_editing_direction": ("reverse", reverse_editing_direction),
            "edit_guidance_scale": ("guidance_scale", edit_guidance_scale),
            "edit_warmup_steps": ("warmup_steps", edit_warmup_steps),
            "edit_cooldown_steps": ("cooldown_steps", edit_cooldown_steps),
            "edit_threshold": ("threshold", edit_threshold),
            "edit_weights": ("weight", edit_weights if edit_weights else 1.0),
        }
        problems = [
            (name, f"has {len(v)} values for {len(prompts)} editing prompts")
            for name, (_, v) in given.items()
            if isinstance(v, (list, tuple)) and len(v) != len(prompts)
        ]
        per_concept = dict(given.values())
        if problems:
            raise SettingsError(cls.name, problems)
        concepts = [
            {"prompt": p, **{f: (v[i] if isinstance(v, (list, tuple)) else v) for f, v in per_concept.items()}}
            for i, p in enumerate(prompts)
        ]
        return cls(
            concepts=concepts, momentum_scale=edit_momentum_scale, momentum_beta=edit_mom_beta,
            sem_guidance=sem_guidance,
        )

    # -- hooks ------------------------------------------------------------------------------------------
    @hookimpl
    def diffsteer_setup(self, call: "GenerationCall") -> None:
        request = call.request
        if not request.do_cfg:
            raise PluginError(
                self.name,
                "semantic guidance needs classifier-free guidance (its concepts are measured against the "
                f"unconditional branch): pass guidance_scale > 1 (got {request.guidance_scale:g})",
            )
        # The call's steps and latent shape are known before setup: refuse what cannot work before any work.
        self._check_steps(call.num_steps, torch.Size(call.latent_shape))
        # Several Sega instances may share a call: each gets its own branches, momentum and outputs.
        mine = [p for p in call.plugins if isinstance(p, Sega)]
        rank = next(i for i, p in enumerate(mine) if p is self)
        label = self.name if rank == 0 else f"{self.name}#{rank + 1}"
        call.state_for(self, SegaCallState).label = label

    @hookimpl
    def diffsteer_guidance_branches(self, call: "GenerationCall", branches: "BranchLayout") -> None:
        state = call.state_for(self, SegaCallState)
        for i, concept in enumerate(self.settings.concepts):
            name = f"{state.label}:{i}"
            # One row per image, in the prompts' order: the concept applies alike to every prompt.
            texts = [concept.prompt] * len(call.request.prompts)
            branches.add(name, call.encode_per_image(texts), owner=state.label)
            state.branches.append(name)

    @hookimpl
    def diffsteer_guidance(
        self, call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
    ) -> Optional[torch.Tensor]:
        state = call.state_for(self, SegaCallState)
        # Momentum follows each window of a view plan on its own (diffsteer.views).
        view = call.view_state_for(self, SegaViewState)
        term = self._concept_term(state, view, step.index, predictions) if self.settings.concepts else None
        if self.sem_guidance is not None:
            extra = self.sem_guidance[step.index].to(predictions["uncond"].device, predictions["uncond"].dtype)
            if step.view is not None and extra.ndim == 4 and tuple(extra.shape[-2:]) == step.view.canvas:
                # Canvas-sized guidance follows each window; a broadcast one (spatial size 1) applies as it is.
                extra = step.view.crop(self.name, extra.expand(call.batch_size, *extra.shape[1:]))
            term = extra if term is None else term + extra
        view.applied.append(
            torch.zeros_like(predictions["uncond"]) if term is None else term.expand_as(predictions["uncond"])
        )
        return term

    @hookimpl
    def diffsteer_teardown(self, call: "GenerationCall", error: Optional[BaseException]) -> None:
        state = call.state_for(self, SegaCallState)
        views = {k: v for k, v in call.view_states(self).items() if v.applied}
        if error is None and views:
            if None in views:
                call.outputs[state.label] = {"sem_guidance": torch.stack(views[None].applied).cpu()}
            else:  # a view plan: each batch of views' terms (its windows' crops), in plan order
                call.outputs[state.label] = {"sem_guidance_views": [torch.stack(views[k].applied).cpu() for k in sorted(views)]}

    # -- the math -----------------------------------------------------------------------------------------
    def _concept_term(
        self, state: SegaCallState, view: SegaViewState, index: int, predictions: "BranchPredictions"
    ) -> Optional[torch.Tensor]:
        concepts = [predictions[name] for name in state.branches]
        term, view.momentum = sega_step(self.settings, index, predictions["uncond"], concepts, view.momentum)
        return term

    def _check_steps(self, num_steps: int, shape: torch.Size) -> None:
        for i, concept in enumerate(self.settings.concepts):
            if concept.warmup_steps >= num_steps:
                raise PluginError(
                    self.name,
                    f"concept {i} ({concept.prompt!r}) has warmup_steps={concept.warmup_steps} but this call "
                    f"runs {num_steps} steps, so it would never be applied: lower warmup_steps",
                )
        if self.sem_guidance is not None:
            if len(self.sem_guidance) < num_steps:
                raise PluginError(
                    self.name, f"sem_guidance has {len(self.sem_guidance)} steps but this call runs {num_steps}"
                )
            for i, g in enumerate(self.sem_guidance[:num_steps]):
                try:
                    ok = torch.broadcast_shapes(g.shape, shape) == shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise PluginError(
                        self.name,
                        f"sem_guidance[{i}] has shape {tuple(g.shape)}, which does not fit this call's "
                        f"predictions {tuple(shape)}",
                    )


def sega_step(
    settings: SegaSettings,
    index: int,
    uncond: torch.Tensor,
    concepts: Sequence[torch.Tensor],
    momentum: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """SEGA's additive term at step ``index`` and the updated momentum.

    Args:
        settings: the concepts and momentum parameters.
        index: the step index (0 for the first denoising step).
        uncond: the unconditional prediction ``(batch, channels, h, w)``.
        concepts: each concept's prediction, in ``settings.concepts`` order.
        momentum: the momentum from the previous step (``None`` at the first).

    Returns:
        ``(term, momentum)``: ``term`` is added to ``uncond + scale * (cond - uncond)``, or is
        ``None`` while no concept has warmed up.

    Until every concept has warmed up, the warmed-up ones are applied with weights normalised to sum
    to one and without momentum; once all have, their weighted sum plus momentum is applied. The
    momentum accumulates the (unnormalised) weighted sum of *all* concepts from the first step.
    A concept past its cool-down adds nothing and has no weight.
    """
    edits: list[Optional[torch.Tensor]] = []
    warm: list[bool] = []
    for concept, prediction in zip(settings.concepts, concepts, strict=True):
        warm.append(index >= concept.warmup_steps)
        if concept.cooldown_steps is not None and index >= concept.cooldown_steps:
            edits.append(None)
        else:
            edits.append(
                concept_guidance(prediction, uncond, concept.guidance_scale, concept.threshold, concept.reverse)
            )
    weights = [0.0 if e is None else c.weight for c, e in zip(settings.concepts, edits)]

    term: Optional[torch.Tensor] = None
    warmed = sum(warm)
    if 0 < warmed < len(edits):
        total = sum(w for w, ok in zip(weights, warm) if ok)
        # The reference divides by this total unguarded (NaN when every warmed-up concept has weight 0
        # or has cooled down); we apply nothing then.
        if total > 0:
            term = _weighted_sum([(w / total, e) for w, e, ok in zip(weights, edits, warm) if ok], uncond)

    if momentum is None:
        momentum = torch.zeros_like(uncond)
    combined = _weighted_sum(list(zip(weights, edits)), uncond) + settings.momentum_scale * momentum
    momentum = settings.momentum_beta * momentum + (1 - settings.momentum_beta) * combined
    if warmed == len(edits):
        term = combined
    return term, momentum


def _weighted_sum(pairs: list[tuple[float, Optional[torch.Tensor]]], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for weight, tensor in pairs:
        if tensor is not None and weight != 0:
            out = out + weight * tensor
    return out
