"""Base of the schedulers that walk a table of sigmas by step index (Euler, Euler ancestral, DPM-Solver).

``sigmas[i]`` is the noise level at ``timesteps[i]`` and ``sigmas[-1]`` the level after the last step.
The step index starts at ``set_begin_index``'s value, or else where the first timestep seen sits in the
schedule, and advances once per ``step``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .base import ConfigLike, Scheduler, TimestepLike, per_sample
from .noise_schedule import ZERO_SNR_ALPHA_CUMPROD, sigmas_from_alphas_cumprod
from .prediction import split_prediction


class SigmaScheduler(Scheduler):
    """Keeps ``sigmas`` (float32, on the CPU, as diffusers does to avoid device syncs) and the step index."""

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        cumprod = self.alphas_cumprod
        if getattr(self.config, "rescale_betas_zero_snr", False):
            # Zero terminal SNR makes the last sigma infinite, so diffusers pins abar_T to 2^-24 in these
            # schedulers. We pin a copy used for sigmas only: ``alphas_cumprod`` (and so get_velocity)
            # stays the true training schedule.
            cumprod = cumprod.clone()
            cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self._sigma_alphas_cumprod = cumprod
        train_sigmas = sigmas_from_alphas_cumprod(cumprod)
        self.sigmas = torch.cat([train_sigmas.flip(0), torch.zeros(1)])
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self._step_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the next step, or None before the first."""
        return self._step_index

    def _train_sigma_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sigmas of the training timesteps (ascending, float32 numpy) and their logs."""
        sigmas = sigmas_from_alphas_cumprod(self._sigma_alphas_cumprod).numpy()
        return sigmas, np.log(sigmas)

    def _install(self, sigmas: np.ndarray, timesteps: torch.Tensor) -> None:
        """Adopt a new schedule and forget the step state (the begin index too, as diffusers does)."""
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def _position(self, timestep: Any, schedule: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule.

        A timestep that appears twice (possible with few steps) resolves to its second occurrence, so a
        sampler started part-way never skips a sigma; that is diffusers' convention.
        """
        schedule = self.timesteps if schedule is None else schedule
        hits = (schedule == torch.as_tensor(timestep).to(schedule.device)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps")
        return int(hits[1 if len(hits) > 1 else 0])

    def _current_index(self, timestep: TimestepLike) -> int:
        if self._step_index is None:
            self._step_index = self._peek_index(timestep)
        return self._step_index

    def _peek_index(self, timestep: TimestepLike) -> int:
        """The index :meth:`_current_index` gives, without starting the step count."""
        if self._step_index is not None:
            return self._step_index
        return self._begin_index if self._begin_index is not None else self._position(timestep)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """Noise ``original_samples`` to the sigma of ``timesteps`` (entries of ``self.timesteps``)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        wanted = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        if self._begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            indices = [self._position(t, schedule) for t in wanted]
        else:
            # Once a start is declared the noise level is that of the current step, whatever t says.
            current = self._step_index if self._step_index is not None else self._begin_index
            indices = [current] * wanted.shape[0]
        sigma = per_sample(sigmas[indices], original_samples.ndim)
        return self._noised(original_samples, noise, sigma)

    def _noised(self, original: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A sample at noise level ``sigma``; variance-exploding by default (x0 + sigma * noise)."""
        return original + noise * sigma

    def _to_vp(self, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The variance-preserving form of a sample at level ``sigma`` (VE: divided by sqrt(sigma^2 + 1))."""
        return sample / ((sigma**2 + 1) ** 0.5)

    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, timestep: TimestepLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` at the current step's sigma (see :meth:`Scheduler.split_model_output`).

        The model saw the VP sample ``alpha * x0 + sigma_vp * eps`` with ``alpha = 1 / sqrt(sigma^2 + 1)``
        and ``sigma_vp = sigma * alpha``; its output is read in that convention whatever the sampler keeps.
        """
        sigma = self.sigmas[self._peek_index(timestep)].to(device=sample.device, dtype=sample.dtype)
        alpha_t, sigma_t = vp_scales(sigma)
        return split_prediction(
            self.config.prediction_type, model_output, self._to_vp(sample, sigma), alpha_t, sigma_t
        )

    def renoise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep: TimestepLike) -> torch.Tensor:
        """x0 noised to the current step's sigma, in this sampler's sample space."""
        sigma = self.sigmas[self._peek_index(timestep)].to(
            device=original_samples.device, dtype=original_samples.dtype
        )
        return self._noised(original_samples, noise, sigma)


def vp_scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP sample whose VE noise level is ``sigma``."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha
