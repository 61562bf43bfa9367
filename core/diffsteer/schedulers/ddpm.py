"""DDPM ancestral sampling (Ho et al. 2020): the posterior mean plus fresh noise at every step."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field

from ..models.random import randn_tensor
from .base import ConfigLike, Generators, Scheduler, SchedulerOutput, TimestepLike
from .config import Flag, ThresholdingFields, ZeroSnrFields
from .prediction import refine_x0, split_prediction

#: Floor on the posterior variance: at the last step it is 0 and its log would be -inf.
MIN_POSTERIOR_VARIANCE = 1e-20


class DDPMConfig(ZeroSnrFields, ThresholdingFields):
    """diffusers ``DDPMScheduler`` fields (``fixed_large_log`` is not supported: diffusers takes its square
    root as a standard deviation, which is NaN)."""

    variance_type: Literal["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"] = (
        "fixed_small"
    )
    clip_sample: Flag = True
    clip_sample_range: float = Field(1.0, gt=0.0)


class DDPMScheduler(Scheduler):
    """DDPM. With a learned variance (``learned``/``learned_range``) the model output carries twice the
    sample's channels: the prediction, then the variance."""

    default_name = "ddpm"
    diffusers_class_name = "DDPMScheduler"
    config_class = DDPMConfig
    config: DDPMConfig

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        self._one = torch.tensor(1.0)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        self.num_inference_steps = self._check_num_steps(num_inference_steps)
        self.timesteps = torch.from_numpy(self._integer_timesteps(self.num_inference_steps)).to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in the schedule (-1 after the last; t-1 before set_timesteps)."""
        if self.num_inference_steps is None:
            return timestep - 1
        where = (self.timesteps == timestep).nonzero()
        if len(where) == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps")
        index = int(where[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        t = int(timestep)
        learned = self.config.variance_type in ("learned", "learned_range")
        predicted_variance: Optional[torch.Tensor] = None
        if learned and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        abar_t = self.alphas_cumprod[t]
        abar_prev = self._alpha_cumprod_at(self.previous_timestep(t), self._one)
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        alpha_step = abar_t / abar_prev  # the one-step alpha between the two (possibly distant) timesteps
        beta_step = 1 - alpha_step

        x0, _ = split_prediction(self.config.prediction_type, model_output, sample, abar_t**0.5, beta_t**0.5)
        x0 = refine_x0(x0, self.config)
        # Posterior q(x_prev | x_t, x0) mean, eq. 7 of the paper.
        x0_coeff = (abar_prev**0.5 * beta_step) / beta_t
        sample_coeff = alpha_step**0.5 * beta_prev / beta_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            # Posterior variance (eq. 7), in diffusers' operation order so results match to the bit.
            std = self._noise_std(beta_prev / beta_t * beta_step, beta_step, predicted_variance)
            prev_sample = prev_sample + std * noise
        return SchedulerOutput(prev_sample, x0)

    def _noise_std(
        self, posterior_var: torch.Tensor, beta_step: torch.Tensor, predicted: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Standard deviation of the added noise for the configured ``variance_type``."""
        posterior_var = torch.clamp(posterior_var, min=MIN_POSTERIOR_VARIANCE)
        kind = self.config.variance_type
        if kind == "fixed_small":
            return posterior_var**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_var))
        if kind == "fixed_large":
            return beta_step**0.5
        if predicted is None:
            raise ValueError(
                f"variance_type {kind!r} needs a model output with twice the sample's channels"
            )
        if kind == "learned":
            return predicted**0.5
        # learned_range: the model interpolates, in log space, between the two fixed variances.
        frac = (predicted + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta_step) + (1 - frac) * torch.log(posterior_var)))
