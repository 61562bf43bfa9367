"""The denoising objective: targets per prediction type, and what a step's forward pass produced."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedulers import Scheduler


def training_target(
    scheduler: Scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict under ``scheduler.config.prediction_type``.

    ``epsilon``: the noise; ``v_prediction``: the velocity (the scheduler's ``get_velocity``, so zero
    terminal SNR schedules are handled alike); ``sample``: the clean latents.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")  # pragma: no cover - the config refuses it


def row_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per row, in float32 whatever the forward's precision."""
    err = (prediction.float() - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


@dataclass
class TrainOutputs:
    """One micro-step's forward pass, as :func:`~diffsteer.hookspecs.diffsteer_train_loss` sees it."""

    prediction: torch.Tensor
    target: torch.Tensor
    #: Unweighted MSE per row ``(rows,)``, appended rows included.
    row_loss: torch.Tensor
    #: The core loss: ``sum(loss_weight * row_loss) / data_rows``.
    loss: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    noisy_latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    #: The captions ``encoder_hidden_states`` encode: the batch's, with ``""`` where caption dropout hit.
    captions: list[str]
    #: Rows this process read from the data (before plugins appended any).
    data_rows: int
