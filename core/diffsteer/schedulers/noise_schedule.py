"""Noise-schedule math shared by all schedulers: betas, zero-SNR rescale, timestep spacing, sigma tables.

Dtypes follow diffusers on purpose (betas and alphas_cumprod in float32, spacing and sigma interpolation
in numpy float64), because matching its timesteps and step outputs bit for bit is a design goal.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .config import SchedulerConfig

#: Upper bound on one cosine-schedule beta; values near 1 make the last steps numerically unstable.
COSINE_MAX_BETA = 0.999

#: alphas_cumprod[-1] used for sigma tables under zero terminal SNR: a true zero gives an infinite sigma.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def cosine_betas(num_train_timesteps: int, max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, improved DDPM)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    # Python floats rather than numpy so that every beta rounds the way diffusers' do.
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step is pure noise (Lin et al. 2023, Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return 1 - alphas


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """The float32 training betas that ``config`` describes (zero-SNR rescale applied if it asks)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the schedule of the Stable Diffusion models.
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(n)
    if getattr(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(
    spacing: str,
    num_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    last_timestep: Optional[int] = None,
) -> np.ndarray:
    """``num_steps`` inference timesteps, descending, as float64 (Lin et al. 2023, table 2).

    * ``linspace``: evenly from 0 to ``last_timestep - 1`` inclusive; not rounded (callers that need
      integers round, Euler keeps the fractions).
    * ``leading``: multiples of ``last_timestep // num_steps`` from 0, plus ``steps_offset``.
    * ``trailing``: counted down from ``last_timestep`` in strides of ``num_train_timesteps / num_steps``,
      minus one, so the first step is the last training timestep.

    ``last_timestep`` (default ``num_train_timesteps``) lets DPM-Solver clip the noisiest timesteps.
    """
    end = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, end - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        stride = end // num_steps
        return (np.arange(num_steps) * stride)[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        stride = num_train_timesteps / num_steps
        return np.round(np.arange(end, 0, -stride)) - 1
    raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', not {spacing!r}")


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise-to-signal ratio sigma_t = sqrt((1 - abar_t) / abar_t): the k-diffusion (VE) noise level."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_timestep(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``, interpolating linearly in log-sigma.

    ``log_sigmas`` is the ascending log-sigma table of the training timesteps.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    above = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis] >= 0
    # Index of the last table entry at or below each sigma, kept one short of the end so +1 is valid.
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo_val, hi_val = log_sigmas[low], log_sigmas[low + 1]
    weight = np.clip((lo_val - log_sigma) / (lo_val - hi_val), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Descending sigmas spaced evenly in sigma^(1/rho) (Karras et al. 2022, eq. 5; rho = 7 as in the paper)."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Descending sigmas spaced evenly in log(sigma)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))
