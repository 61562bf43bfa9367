"""A training plugin that makes the text encoder carry chosen caption words, so the UNet can learn to use them.

Why it exists (measured on the stage-4 shapes model, docs/shapes-model.md): after joint training the text
encoder's final states for "a red circle on the left ..." and "... on the right ..." differed by about 1 % over
the tokens after the word, against 20-30 % for a colour or shape word. The UNet got nothing from the word (the
t = 999 loss was 0.725 with the true, the swapped and the stripped caption alike, where the position-aware optimum
is about 0.62), and neither network moved out of that state in 2,000 more steps: each one's gradient towards using
position is proportional to how much the other already does. A linear classifier that must read the position
word from the padding states breaks the tie. Within 100 steps the states differ by over 100 %, and the UNet starts
placing objects by the word.

Stage 6 uses the same probe on the colours and shapes of both objects: on the stage-5 model, swapping the
*second* object's colour changed the padding states by 6-8 %, and two-object images often repeat the first
colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..plugins import Plugin
from ..text import PromptEncoder
from ..training import ParamGroup
from .vocab import COLOURS, POSITIONS, SHAPES, parse_caption

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..training import DiffusionTrainer, TrainBatch, TrainOutputs

#: What the probe can be asked to read: attribute -> (its classes, object index, object field).
ATTRIBUTES: dict[str, tuple[tuple[str, ...], int, str]] = {
    "position": (POSITIONS, 0, "position"),
    "colour1": (COLOURS, 0, "colour"),
    "shape1": (SHAPES, 0, "shape"),
    "colour2": (COLOURS, 1, "colour"),
    "shape2": (SHAPES, 1, "shape"),
}


def attribute_problem(attributes: Sequence[str]) -> Optional[str]:
    """Why ``attributes`` cannot be probed (empty, or names outside :data:`ATTRIBUTES`), or None when they can."""
    if attributes and all(a in ATTRIBUTES for a in attributes):
        return None
    return f"attributes must be some of {sorted(ATTRIBUTES)}, got {list(attributes)}"


def caption_label(caption: str, attribute: str) -> Optional[int]:
    """Class index of ``attribute`` (a key of :data:`ATTRIBUTES`) in ``caption``, or None when it names none."""
    classes, index, field = ATTRIBUTES[attribute]
    objects = parse_caption(caption).objects if caption else ()
    if len(objects) <= index:
        return None
    value = getattr(objects[index], field)
    return classes.index(value) if value in classes else None


def position_label(caption: str) -> Optional[int]:
    """Index in :data:`POSITIONS` of the first object's position word, or None when it has none."""
    return caption_label(caption, "position")


def padding_mean(hidden: torch.Tensor, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mean of each row's states from its first end-of-text token on: in a causal text encoder those are the
    states that have seen the whole caption."""
    is_eos = ids == eos_token_id
    after = is_eos.long().cumsum(dim=1) > 0
    weights = after.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CaptionProbe(Plugin):
    """Adds ``weight * Σ_attribute cross_entropy(head(padding_mean(states)), label)`` over the captions that name
    each attribute.

    Trains the whole UNet and text encoder (as the recipe's stages do) plus the probe's linear head (one block of
    logits per attribute), whose weights are checkpointed with them and are not part of the exported model.
    """

    name = "shapes-caption-probe"

    def __init__(self, hidden_size: int, weight: float, attributes: Sequence[str] = ("position",),
                 seed: int = 0) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"{self.name}: weight must be > 0, got {weight}")
        problem = attribute_problem(attributes)
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        self.weight = float(weight)
        self.attributes = tuple(attributes)
        self.sizes = [len(ATTRIBUTES[a][0]) for a in self.attributes]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(hidden_size, sum(self.sizes))

    @hookimpl
    def diffsteer_train_parameters(self, trainer: "DiffusionTrainer") -> list[ParamGroup]:
        self.head.to(trainer.device)  # once, before the optimizer holds its parameters
        return [
            ParamGroup("unet", list(trainer.unet.parameters())),
            ParamGroup("text_encoder", list(trainer.text_encoder.parameters())),
            ParamGroup("caption_probe", list(self.head.parameters())),
        ]

    @hookimpl
    def diffsteer_train_loss(self, trainer: "DiffusionTrainer", batch: "TrainBatch",
                             outputs: "TrainOutputs") -> Optional[torch.Tensor]:
        captions = outputs.captions
        labels = {a: [caption_label(c, a) for c in captions] for a in self.attributes}
        rows = [i for i in range(len(captions)) if any(labels[a][i] is not None for a in self.attributes)]
        if not rows:
            return None
        hidden = outputs.encoder_hidden_states[rows].float()
        ids = PromptEncoder(trainer.tokenizer, trainer.text_encoder).token_ids([captions[i] for i in rows])
        logits = self.head(padding_mean(hidden, ids.to(hidden.device), trainer.tokenizer.eos_token_id))
        total = logits.new_zeros(())
        for a, block in zip(self.attributes, logits.split(self.sizes, dim=1)):
            keep = [j for j, i in enumerate(rows) if labels[a][i] is not None]
            if keep:
                target = torch.tensor([labels[a][rows[j]] for j in keep], device=logits.device)
                total = total + F.cross_entropy(block[keep], target, reduction="sum")
        # A per-process mean over this micro-batch's rows, like the core loss (rows without a label count as 0).
        return self.weight * total / len(captions)
