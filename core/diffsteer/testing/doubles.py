"""Test doubles shared by the core's and the plugins' tests: a plain-CFG stand-in, recording plugins and a
short-call helper. Loaded on first use (``diffsteer.testing.PlainCfg``), so the fixture kit costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..hookspecs import hookimpl
from ..plugins import Plugin

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..branches import BranchLayout, BranchPredictions
    from ..call import GenerationCall, StepState, UNetInputs
    from ..pipeline import Pipeline, PipelineOutput


class PlainCfg(Plugin):
    """Replaces the guidance formula (the exclusive ``diffsteer_combine_guidance``) with the core's own
    ``uncond + guidance_scale * (cond - uncond)``: a call with it must equal a call without it, and a plugin
    that adds a guidance term must still add it on top."""

    name = "plain-cfg"

    @hookimpl
    def diffsteer_combine_guidance(
        self, call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
    ) -> torch.Tensor:
        u, c = predictions["uncond"], predictions["cond"]
        return u + call.request.guidance_scale * (c - u)


def run(pipe: "Pipeline", plugins: Sequence[Any] = (), **kw: Any) -> "PipelineOutput":
    """A short call with fixed defaults (``"a red circle"``, 4 steps, seed 0, latents out); ``kw`` overrides
    any of them or adds other arguments."""
    args: dict[str, Any] = dict(prompt="a red circle", num_inference_steps=4, seed=0, output_type="latent")
    args.update(kw)
    return pipe(plugins=list(plugins), **args)


def branch_recorder(seen: dict) -> Plugin:
    """A plugin that records, into ``seen``, every branch's embeddings (by branch name, after every plugin
    listed before it added its branches) and the call's token ids of the prompts (``seen["ids"]``, one
    list per prompt). List it last to see what the UNet will get.

    Example:
        >>> seen = {}
        >>> pipe("a red circle", num_inference_steps=1, plugins=[..., branch_recorder(seen)])  # doctest: +SKIP
        >>> seen["cond"].shape                                                              # doctest: +SKIP
        torch.Size([1, 77, 32])
    """
    class BranchRecorder(Plugin):
        name = "branch-recorder"

        @hookimpl
        def diffsteer_guidance_branches(self, call: "GenerationCall", branches: "BranchLayout") -> None:
            seen.update({n: branches[n].embeddings.clone() for n in branches.names})
            seen["ids"] = [row.tolist() for row in call.text.token_ids(call.request.prompts)]

    return BranchRecorder()


def pass_recorder(passes: list) -> Plugin:
    """A plugin that appends, to ``passes``, one dict per UNet pass of a call (the main pass and every
    extra pass a plugin runs): ``step``, ``pass_name``, ``layout`` (its branches), copies of ``sample``,
    ``timestep`` and ``hidden`` (the encoder hidden states), and of the ``down`` / ``mid`` residuals that
    the plugins listed before it added (``None`` when there are none). List it last.

    Example:
        >>> passes = []
        >>> pipe("a circle", num_inference_steps=2, plugins=[..., pass_recorder(passes)])  # doctest: +SKIP
        >>> [(p["pass_name"], p["layout"].names) for p in passes][:2]                   # doctest: +SKIP
        [('main', ['uncond', 'cond']), ('sag', ['uncond'])]
    """
    def copy(t: Any) -> Any:
        return None if t is None else [x.clone() for x in t] if isinstance(t, list) else t.clone()

    class PassRecorder(Plugin):
        name = "pass-recorder"

        @hookimpl
        def diffsteer_model_inputs(self, call: "GenerationCall", step: "StepState", inputs: "UNetInputs") -> None:
            passes.append(dict(
                step=step.index, pass_name=inputs.pass_name, layout=inputs.layout, sample=inputs.sample.clone(),
                timestep=inputs.timestep, hidden=inputs.encoder_hidden_states.clone(),
                down=copy(inputs.down_residuals), mid=copy(inputs.mid_residual),
            ))

    return PassRecorder()
