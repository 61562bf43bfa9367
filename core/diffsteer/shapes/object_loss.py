"""A training plugin that weights the diffusion loss towards the latent cells the objects cover.

Why it exists: in a 64x64 shapes scene the objects cover a small part of the 16x16 latent, so the plain MSE is
mostly about the plain background. On the stage-5 model the errors left are objects, not backgrounds: two-object
prompts draw the first colour twice, mostly on black. Extra weight on the object cells makes what goes wrong there
cost more, without changing what the model is asked to predict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..plugins import Plugin

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..training import DiffusionTrainer, TrainBatch, TrainOutputs

#: The batch key that carries the masks (from :func:`object_masks`, passed through the trainer's data).
MASK_KEY = "object_mask"


def object_masks(images_u8: torch.Tensor, latent_size: int, threshold: int = 32) -> torch.Tensor:
    """``(N, 1, latent_size, latent_size)`` float masks: 1 where a latent cell sees any object pixel.

    ``images_u8`` are ``(N, 3, H, W)`` scenes on a plain background. A pixel is an object pixel when some channel
    differs from the top-left pixel's by more than ``threshold``: the world's backgrounds are white or black and
    its colours are neither, and scenes keep a margin, so the corner is background.
    """
    if images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"object_masks: images must be (N, 3, H, W), got {tuple(images_u8.shape)}")
    if images_u8.shape[-1] % latent_size or images_u8.shape[-2] % latent_size:
        raise ValueError(f"object_masks: image size {tuple(images_u8.shape[-2:])} is not a multiple of "
                         f"latent size {latent_size}")
    pixels = images_u8.to(torch.int16)
    background = pixels[:, :, :1, :1]
    objects = ((pixels - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return F.adaptive_max_pool2d(objects, latent_size)


class ObjectWeightedLoss(Plugin):
    """Adds ``weight * mean(mask * (prediction - target)^2)`` per row, weighted and averaged like the core loss,
    so an object cell costs ``1 + weight`` times a background cell.

    The batch must carry :data:`MASK_KEY` (``(b, 1, h, w)``, broadcast over the latent channels).
    """

    name = "shapes-object-loss"

    def __init__(self, weight: float) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"{self.name}: weight must be > 0, got {weight}")
        self.weight = float(weight)

    @hookimpl
    def diffsteer_train_loss(self, trainer: "DiffusionTrainer", batch: "TrainBatch",
                             outputs: "TrainOutputs") -> Optional[torch.Tensor]:
        mask = batch.get(MASK_KEY)
        if mask is None:
            raise ValueError(f"{self.name}: the batch has no {MASK_KEY!r}; pass object_masks(...) to the data")
        rows = outputs.data_rows
        prediction, target = outputs.prediction[:rows].float(), outputs.target[:rows].float()
        if mask.shape[0] != rows or mask.shape[-2:] != prediction.shape[-2:]:
            raise ValueError(f"{self.name}: {MASK_KEY!r} is {tuple(mask.shape)}, the prediction "
                             f"{tuple(prediction.shape)}")
        mask = mask.to(prediction.device, prediction.dtype)
        per_row = (mask * (prediction - target).pow(2)).mean(dim=(1, 2, 3))
        weights = batch["loss_weight"][:rows].to(per_row.device, per_row.dtype)
        return self.weight * (weights * per_row).sum() / rows
