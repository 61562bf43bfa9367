"""Attention patches, and their compilation into one processor per patched layer.

Plugins register :class:`AttentionPatch` objects once per call. :func:`compile_patches` groups them by
layer and builds one :class:`PatchedAttention` processor per layer that any patch touches; every other
layer keeps the plain fused SDPA path. A layer computes explicit softmax probabilities only when some
patch must see or edit them, and then once for all of its patches.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .errors import PluginError
from .models.attention import Attention
from .models.context import ForwardContext

LayerSelector = Union[str, Sequence[str], Callable[[str], bool]]
QKVEdit = Callable[[Attention, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
ProbsEdit = Callable[[str, torch.Tensor], torch.Tensor]
ProbsObserver = Callable[[str, torch.Tensor], None]
OutputEdit = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionPatch:
    """What one plugin does to the attention layers that ``layers`` selects.

    ``layers`` is a glob over module paths (``"*attn2"``: every cross-attention;
    ``"mid_block.*attn1"``: the mid-block self-attention), a list of globs, or a predicate.
    The callbacks, all optional, run in this order inside the layer:

    * ``edit_qkv(attn, q, k, v) -> (q, k, v)`` on per-head tensors ``(batch, heads, tokens, dim)``;
    * ``edit_probs(layer, probs) -> probs`` on softmax probabilities ``(batch, heads, q_tokens, k_tokens)``;
    * ``observe(layer, probs)`` sees the final probabilities (after every edit); it must not change them;
    * ``edit_output(layer, out) -> out`` on the projected output ``(batch, tokens, channels)``.

    The callbacks run inside the UNet forward, so ``torch.compile`` traces them. There, keep what a callback
    records in a fixed slot (a dict key, an attribute) and collect it in ``post_step``: appending to a list
    makes dynamo guard on the list's length and compile again every step.
    """

    owner: str
    layers: LayerSelector = "*"
    edit_qkv: Optional[QKVEdit] = None
    edit_probs: Optional[ProbsEdit] = None
    observe: Optional[ProbsObserver] = None
    edit_output: Optional[OutputEdit] = None

    def selects(self, layer: str) -> bool:
        sel = self.layers
        if callable(sel):
            return bool(sel(layer))
        globs = [sel] if isinstance(sel, str) else list(sel)
        return any(fnmatch.fnmatchcase(layer, g) for g in globs)


class PatchedAttention:
    """The compiled processor of one layer: the patches that select it, in registration order."""

    def __init__(self, patches: Sequence[AttentionPatch]) -> None:
        self.patches = tuple(patches)
        self.qkv_edits = [p.edit_qkv for p in patches if p.edit_qkv]
        self.probs_edits = [p.edit_probs for p in patches if p.edit_probs]
        self.observers = [p.observe for p in patches if p.observe]
        self.output_edits = [p.edit_output for p in patches if p.edit_output]
        self.needs_probs = bool(self.probs_edits or self.observers)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor],
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        q, k, v = attn.project_qkv(hidden_states, encoder_hidden_states, context)
        for edit in self.qkv_edits:
            q, k, v = edit(attn, q, k, v)
        if self.needs_probs:
            probs = attn.attention_probs(q, k)
            for edit_probs in self.probs_edits:
                probs = edit_probs(attn.name, probs)
            for observe in self.observers:
                observe(attn.name, probs)
            heads_out = torch.matmul(probs.to(v.dtype), v)
        else:
            heads_out = attn.attend(q, k, v)
        out = attn.project_out(heads_out, context)
        for edit_out in self.output_edits:
            out = edit_out(attn.name, out)
        return out


def compile_patches(patches: Sequence[AttentionPatch], layers: Sequence[str]) -> dict[str, PatchedAttention]:
    """Build the processor map for one call; a patch that selects no layer is an error naming its owner."""
    processors: dict[str, PatchedAttention] = {}
    matched = {id(p): False for p in patches}
    for layer in layers:
        chosen = [p for p in patches if p.selects(layer)]
        for p in chosen:
            matched[id(p)] = True
        if chosen:
            processors[layer] = PatchedAttention(chosen)
    for p in patches:
        if not matched[id(p)]:
            raise PluginError(
                p.owner, f"attention patch selects no layer (layers={p.layers!r}); e.g. {list(layers)[:3]}"
            )
    return processors
