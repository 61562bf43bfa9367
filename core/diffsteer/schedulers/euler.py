"""Euler and Euler-ancestral samplers (Karras et al. 2022, k-diffusion) on variance-exploding samples.

Samples live at x = x0 + sigma * eps, so the initial noise is scaled by ``init_noise_sigma`` and the
model input by 1 / sqrt(sigma^2 + 1) (``scale_model_input``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import model_validator

from ..models.random import randn_tensor
from .base import ConfigLike, Generators, SchedulerOutput, TimestepLike
from .config import Flag, Unsupported, ZeroSnrFields
from .noise_schedule import exponential_sigmas, karras_sigmas, sigma_to_timestep, spaced_timesteps
from .sigma_base import SigmaScheduler


class EulerAncestralConfig(ZeroSnrFields):
    """diffusers ``EulerAncestralDiscreteScheduler`` fields."""

    timestep_spacing: Literal["leading", "trailing", "linspace"] = "linspace"


class EulerConfig(EulerAncestralConfig):
    """diffusers ``EulerDiscreteScheduler`` fields (beta-distributed sigmas, which need scipy, are unsupported)."""

    interpolation_type: Literal["linear", "log_linear"] = "linear"
    use_karras_sigmas: Flag = False
    use_exponential_sigmas: Flag = False
    use_beta_sigmas: Unsupported = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_type: Literal["discrete", "continuous"] = "discrete"
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    @model_validator(mode="after")
    def _one_sigma_spread(self) -> "EulerConfig":
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("fields 'use_karras_sigmas' and 'use_exponential_sigmas' cannot both be true")
        return self


class _EulerBase(SigmaScheduler):
    """Shared by both Euler variants: the sigma table, input scaling and the x0 estimate."""

    config: EulerAncestralConfig

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max()
        # With 'leading' spacing the first timestep is below T, so the sample carries its own unit
        # variance on top of sigma (diffusers' convention, kept for parity).
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float((top**2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, timestep: TimestepLike) -> torch.Tensor:
        sigma = self.sigmas[self._current_index(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        self.num_inference_steps = n = self._check_num_steps(num_inference_steps)
        cfg = self.config
        spaced = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset)
        timesteps = spaced.astype(np.float32)  # Euler keeps linspace's fractional timesteps
        train_sigmas, log_train_sigmas = self._train_sigma_table()
        sigmas, timesteps = self._inference_sigmas(timesteps, train_sigmas, log_train_sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
        self._install(sigmas, self._timestep_tensor(timesteps, sigmas).to(device))

    def _inference_sigmas(
        self, timesteps: np.ndarray, train_sigmas: np.ndarray, log_train_sigmas: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sigmas at the inference timesteps (and the timesteps, if the sigma rule moves them)."""
        return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas), timesteps

    def _final_sigma(self) -> float:
        return 0.0

    def _timestep_tensor(self, timesteps: np.ndarray, sigmas: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(timesteps.astype(np.float32))

    def _ve_x0(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor
    ) -> torch.Tensor:
        """x0 from the model output on a VE sample; ``sigma_hat`` is the (churned) level for epsilon."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma_hat * model_output
        if kind == "v_prediction":
            # The model saw sample / sqrt(sigma^2 + 1), a VP sample with alpha = 1 / sqrt(sigma^2 + 1).
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        return model_output


class EulerScheduler(_EulerBase):
    """Euler's method on the probability-flow ODE, with optional stochastic churn (``s_churn`` etc.)."""

    default_name = "euler"
    diffusers_class_name = "EulerDiscreteScheduler"
    config_class = EulerConfig
    option_defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    config: EulerConfig
    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            self.timesteps = self._timestep_tensor(self.timesteps.numpy(), self.sigmas.numpy())

    def _inference_sigmas(
        self, timesteps: np.ndarray, train_sigmas: np.ndarray, log_train_sigmas: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        if cfg.interpolation_type == "linear":
            sigmas, timesteps = super()._inference_sigmas(timesteps, train_sigmas, log_train_sigmas)
        else:
            # Evenly spaced in log sigma over the whole training range (one more than the steps).
            ends = float(np.log(train_sigmas[-1])), float(np.log(train_sigmas[0]))
            sigmas = torch.linspace(*ends, len(timesteps) + 1).exp().numpy()
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            # The range is that of the inference sigmas unless the config pins it.
            lo = cfg.sigma_min if cfg.sigma_min is not None else sigmas[-1].item()
            hi = cfg.sigma_max if cfg.sigma_max is not None else sigmas[0].item()
            spread = karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas
            sigmas = spread(lo, hi, len(timesteps))
            timesteps = sigma_to_timestep(sigmas, log_train_sigmas)
        return sigmas, timesteps

    def _final_sigma(self) -> float:
        if self.config.final_sigmas_type == "sigma_min":
            abar0 = self._sigma_alphas_cumprod[0]
            return float(((1 - abar0) / abar0) ** 0.5)
        return 0.0

    def _timestep_tensor(self, timesteps: np.ndarray, sigmas: np.ndarray) -> torch.Tensor:
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            # EDM-style conditioning: the model takes c_noise = log(sigma) / 4 as its timestep.
            return 0.25 * torch.log(torch.from_numpy(sigmas[:-1].astype(np.float32)))
        return super()._timestep_tensor(timesteps, sigmas)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        index = self._current_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[index]
        # Churn (Karras et al. alg. 2): raise the noise level to sigma_hat by adding fresh noise first.
        churn = self.s_churn / (len(self.sigmas) - 1)
        gamma = min(churn, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            sample = sample + noise * self.s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        x0 = self._ve_x0(model_output, sample, sigma, sigma_hat)
        derivative = (sample - x0) / sigma_hat
        prev_sample = sample + derivative * (self.sigmas[index + 1] - sigma_hat)
        self._step_index = index + 1
        return SchedulerOutput(prev_sample.to(model_output.dtype), x0)


class EulerAncestralScheduler(_EulerBase):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up."""

    default_name = "euler_a"
    diffusers_class_name = "EulerAncestralDiscreteScheduler"
    config_class = EulerAncestralConfig

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        index = self._current_index(timestep)
        sigma = self.sigmas[index]
        sample = sample.to(torch.float32)
        x0 = self._ve_x0(model_output, sample, sigma, sigma)

        # Split the move to sigma_next into a deterministic part (to sigma_down) and noise (sigma_up),
        # with sigma_down^2 + sigma_up^2 = sigma_next^2.
        sigma_next = self.sigmas[index + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        # Drawn at the last step too (sigma_up = 0 there), so the generator advances as in diffusers.
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = prev_sample + noise * sigma_up
        self._step_index = index + 1
        return SchedulerOutput(prev_sample.to(model_output.dtype), x0)
