"""diffsteer plugin: prompt weighting in compel or A1111 syntax, and prompts longer than 77 tokens.

>>> from diffsteer import Pipeline                                                    # doctest: +SKIP
>>> from diffsteer_prompt_weighting import PromptWeighting
>>> pipe = Pipeline.from_pretrained("shapes")                                         # doctest: +SKIP
>>> pipe("a red++ circle and a blue square", plugins=[PromptWeighting()], seed=0)     # doctest: +SKIP
>>> pipe("a (red:1.3) circle", plugins=[PromptWeighting(syntax="a1111")], seed=0)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffsteer import Plugin, PluginError, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffsteer import GenerationCall

from .a1111_syntax import parse_a1111
from .compel_syntax import parse_compel
from .encoder import EncodingPlan, WeightedPromptEncoder
from .syntax import Blend, Break, Conjunction, Fragment, Prompt, PromptSyntaxError

__all__ = [
    "Blend", "Break", "Conjunction", "Fragment", "Prompt", "PromptSyntaxError", "PromptWeighting",
    "WeightedPromptEncoder", "parse_a1111", "parse_compel",
]
__version__ = "0.1.0"


@dataclass
class PromptWeightingCallState:
    """What one PromptWeighting instance keeps for one call (the plugin object may serve concurrent calls)."""

    encoder: WeightedPromptEncoder
    chunks: int  # the chunk count every text of the call is padded to


class PromptWeighting(Plugin):
    """Encodes every prompt of a call (positive, negative and other plugins' branch prompts) with per-token
    weights, and encodes prompts longer than 75 tokens in several chunks instead of truncating them."""

    name = "prompt-weighting"
    contract = "1.1"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        syntax: Literal["compel", "a1111"] = Field(
            "compel", description="compel (word++, (words)1.3, .blend(), .and()) or a1111 ((word:1.3), [word], BREAK)"
        )
        truncate_long_prompts: bool = Field(
            False, description="keep only the first 75 tokens of each prompt instead of encoding all of them in chunks"
        )
        min_chunks: int = Field(
            1, ge=1, le=64,
            description="pad every text of the call to at least this many 77-token chunks (for long branch prompts)",
        )
        normalize_emphasis: bool = Field(
            True, description="a1111 only: keep each chunk's mean after weighting (A1111 'Original'; False: 'No norm')"
        )

    # -- per-call state --------------------------------------------------------------------------------------------
    def _state(self, call: "GenerationCall") -> "PromptWeightingCallState":
        """The call's encoder and its chunk count, made on first use: at setup, or earlier when a plugin listed
        before this one encodes text in its own setup."""
        return call.state_for(self, lambda: self._new_state(call))

    def _new_state(self, call: "GenerationCall") -> "PromptWeightingCallState":
        s = self.settings
        encoder = WeightedPromptEncoder(
            call.text.tokenizer, call.text.encoder, syntax=s.syntax, truncate_long_prompts=s.truncate_long_prompts,
            normalize_emphasis=s.normalize_emphasis, clip_skip=call.request.clip_skip,
        )
        req = call.request
        known = [("prompt", t) for t in req.prompts]
        if req.do_cfg:
            known += [("negative prompt", t) for t in (req.negative_prompts or [""] * len(req.prompts))]
        # Every embedding of the call goes into one UNet batch, so all texts get one chunk count: the most the
        # call's own prompts need. Branch texts that plugins encode later are padded to it.
        chunks = max([s.min_chunks] + [self._plan(encoder, role, t).chunks for role, t in known])
        return PromptWeightingCallState(encoder, chunks)

    def _plan(self, encoder: WeightedPromptEncoder, role: str, text: str) -> EncodingPlan:
        try:
            return encoder.plan(text)
        except PromptSyntaxError as exc:
            raise PluginError(self.name, f"cannot parse the {role}: {exc.describe()}") from None

    # -- hooks -----------------------------------------------------------------------------------------------------
    @hookimpl
    def diffsteer_setup(self, call: "GenerationCall") -> None:
        # Parse the prompts now, so a syntax error stops the call before any work.
        self._state(call)

    @hookimpl
    def diffsteer_encode_prompt(self, call: "GenerationCall", texts: list[str]) -> Optional[torch.Tensor]:
        state = self._state(call)
        encoder, chunks = state.encoder, state.chunks
        for text in texts:
            plan = self._plan(encoder, "text", text)
            if plan.chunks > chunks:
                raise PluginError(
                    self.name,
                    f"{text!r} needs {plan.chunks} chunks of {encoder.chunk_tokens} tokens, but this call's prompts "
                    f"use {chunks}, and every text of one UNet batch must have the same length; "
                    f"raise min_chunks to {plan.chunks} (--set {self.name}.min_chunks={plan.chunks}) or shorten it",
                )
        return encoder.encode(texts, chunks=chunks).to(device=call.device, dtype=call.dtype)
