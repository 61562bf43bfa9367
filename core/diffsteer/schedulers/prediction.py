"""Converting a model output (epsilon, v or x0) into the clean-sample and noise estimates, and clipping x0.

These are for variance-preserving samples x_t = alpha_t * x0 + sigma_t * eps, with alpha_t^2 + sigma_t^2 = 1.
"""

from __future__ import annotations

from typing import Union

import torch

from .config import SchedulerConfig

Scalar = Union[torch.Tensor, float]


def split_prediction(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha: Scalar, sigma: Scalar
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` implied by ``model_output`` where the signal scale is ``alpha``, the noise scale ``sigma``.

    v-prediction (Salimans & Ho 2022) is v = alpha * eps - sigma * x0.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', not {prediction_type!r}")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): clamp each sample to its ``ratio`` quantile of
    |x0| (at least 1, at most ``max_value``) and divide by it."""
    dtype = x0.dtype
    batch, *rest = x0.shape
    # quantile needs float32/64, and clamp has no CPU half kernel.
    flat = x0.reshape(batch, -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    limit = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -limit, limit) / limit
    return flat.reshape(batch, *rest).to(dtype)


def refine_x0(x0: torch.Tensor, config: SchedulerConfig) -> torch.Tensor:
    """Apply the config's dynamic thresholding, else its ``clip_sample`` clamp, to a predicted x0."""
    if getattr(config, "thresholding", False):
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        bound = config.clip_sample_range
        return x0.clamp(-bound, bound)
    return x0
