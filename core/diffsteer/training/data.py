"""A ready-made data source for pre-encoded latents held in memory."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class InMemoryData:
    """Per-row tensors and captions in memory, served as the trainer's ``data`` callable.

    Encode a fixed image set with the (frozen) VAE once, then train on the latents::

        data = InMemoryData(latents=vae.encode(images).mean * vae.config.scaling_factor, captions=captions)

    Extra per-row tensors (control images, depth maps) pass through under their keyword.
    It has a length, so the trainer shuffles it per epoch.
    """

    def __init__(self, latents: torch.Tensor, captions: Sequence[str], **extra: torch.Tensor) -> None:
        if len(captions) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(captions)} captions")
        for name, value in extra.items():
            if value.shape[0] != latents.shape[0]:
                raise ValueError(f"{name!r} has {value.shape[0]} rows, latents {latents.shape[0]}")
        self.latents, self.captions, self.extra = latents, list(captions), extra

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out: dict[str, Any] = {"latents": self.latents[idx], "captions": [self.captions[i] for i in indices]}
        out.update({name: value[idx] for name, value in self.extra.items()})
        return out
