"""A training plugin that makes the text encoder carry position words, so the UNet can learn to use them.

Why it exists (measured on the stage-4 shapes model, docs/shapes-model.md): after joint training the text
encoder's final states for "a red circle on the left ..." and "... on the right ..." differed by about 1 % over
the tokens after the word, against 20-30 % for a colour or shape word. The UNet got nothing from the word (the
t = 999 loss was 0.725 with the true, the swapped and the stripped caption alike, where the position-aware optimum
is about 0.62), and neither network moved out of that state in 2,000 more steps: each one's gradient towards using
position is proportional to how much the other already does. A linear classifier that must read the position
word from the padding states breaks the tie. Within 100 steps the states differ by over 100 %, and the UNet starts
placing objects by the word.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..plugins import Plugin
from ..text import PromptEncoder
from ..training import ParamGroup
from .vocab import POSITIONS, parse_caption

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..training import DiffusionTrainer, TrainBatch, TrainOutputs


def position_label(caption: str) -> Optional[int]:
    """Index in :data:`POSITIONS` of the first object's position word, or None when it has none."""
    objects = parse_caption(caption).objects if caption else ()
    if not objects or objects[0].position is None:
        return None
    return POSITIONS.index(objects[0].position)


def padding_mean(hidden: torch.Tensor, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mean of each row's states from its first end-of-text token on: in a causal text encoder those are the
    states that have seen the whole caption."""
    is_eos = ids == eos_token_id
    after = is_eos.long().cumsum(dim=1) > 0
    weights = after.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class PositionProbe(Plugin):
    """Adds ``weight * cross_entropy(head(padding_mean(states)), position)`` for captions with a position word.

    Trains the whole UNet and text encoder (as the recipe's stages do) plus the probe's linear head, whose
    weights are checkpointed with them and are not part of the exported model.
    """

    name = "shapes-position-probe"

    def __init__(self, hidden_size: int, weight: float, seed: int = 0) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"shapes-position-probe: weight must be > 0, got {weight}")
        self.weight = float(weight)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(hidden_size, len(POSITIONS))

    @hookimpl
    def diffsteer_train_parameters(self, trainer: "DiffusionTrainer") -> list[ParamGroup]:
        self.head.to(trainer.device)  # once, before the optimizer holds its parameters
        return [
            ParamGroup("unet", list(trainer.unet.parameters())),
            ParamGroup("text_encoder", list(trainer.text_encoder.parameters())),
            ParamGroup("position_probe", list(self.head.parameters())),
        ]

    @hookimpl
    def diffsteer_train_loss(self, trainer: "DiffusionTrainer", batch: "TrainBatch",
                             outputs: "TrainOutputs") -> Optional[torch.Tensor]:
        labels = [position_label(c) for c in outputs.captions]
        rows = [i for i, label in enumerate(labels) if label is not None]
        if not rows:
            return None
        hidden = outputs.encoder_hidden_states[rows].float()
        ids = PromptEncoder(trainer.tokenizer, trainer.text_encoder).token_ids([outputs.captions[i] for i in rows])
        pooled = padding_mean(hidden, ids.to(hidden.device), trainer.tokenizer.eos_token_id)
        target = torch.tensor([labels[i] for i in rows], device=hidden.device)
        # A per-process mean over this micro-batch's rows, like the core loss (rows without a word count as 0).
        ce = F.cross_entropy(self.head(pooled), target, reduction="sum")
        return self.weight * ce / len(labels)
