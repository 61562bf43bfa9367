"""DDIM sampling (Song et al. 2021) and its deterministic inversion (image -> noise)."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field

from ..models.random import randn_tensor
from .base import ConfigLike, Generators, Scheduler, SchedulerOutput, TimestepLike
from .config import Flag, ThresholdingFields, ZeroSnrFields
from .prediction import refine_x0, split_prediction


class DDIMConfig(ZeroSnrFields, ThresholdingFields):
    """diffusers ``DDIMScheduler`` fields."""

    clip_sample: Flag = True
    clip_sample_range: float = Field(1.0, gt=0.0)
    #: If true the step after the last timestep lands on abar = 1 (a clean image); else on abar_0.
    set_alpha_to_one: Flag = True


class DDIMInverseConfig(ZeroSnrFields):
    """diffusers ``DDIMInverseScheduler`` fields (it has no linspace spacing and no thresholding)."""

    clip_sample: Flag = True
    clip_sample_range: float = Field(1.0, gt=0.0)
    #: If true the first inversion step starts from abar = 1; else from abar_0.
    set_alpha_to_one: Flag = True
    timestep_spacing: Literal["leading", "trailing"] = "leading"


class _DDIMBase(Scheduler):
    """What DDIM and its inversion share: a fixed stride between timesteps and the DDIM update rule."""

    config: Union[DDIMConfig, DDIMInverseConfig]

    def _stride(self) -> int:
        # diffusers steps by num_train // num_steps even when the spacing ('linspace', 'trailing' with a
        # stride that does not divide) puts the next timestep elsewhere; we keep that for parity.
        return self.config.num_train_timesteps // self._require_timesteps()

    def _ddim_update(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        abar_from: torch.Tensor,
        abar_to: torch.Tensor,
        noise_std: Union[torch.Tensor, float] = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move ``sample`` from noise level ``abar_from`` to ``abar_to``; return (moved, x0 estimate).

        ``noise_std`` is the standard deviation the caller will add as fresh noise; the deterministic
        direction is shrunk so the total variance stays right (eq. 12 of the paper).
        """
        beta_from = 1 - abar_from
        x0, eps = split_prediction(
            self.config.prediction_type, model_output, sample, abar_from**0.5, beta_from**0.5
        )
        x0 = refine_x0(x0, self.config)
        direction = (1 - abar_to - noise_std**2) ** 0.5 * eps
        return abar_to**0.5 * x0 + direction, x0


class DDIMScheduler(_DDIMBase):
    """DDIM; ``eta`` = 0 is deterministic, 1 is DDPM-like ancestral sampling."""

    default_name = "ddim"
    diffusers_class_name = "DDIMScheduler"
    config_class = DDIMConfig
    option_defaults = {"eta": 0.0}
    config: DDIMConfig
    eta: float

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        if self.eta < 0:
            raise ValueError(f"DDIMScheduler option 'eta' must be >= 0, got {self.eta}")
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        self.num_inference_steps = self._check_num_steps(num_inference_steps)
        self.timesteps = torch.from_numpy(self._integer_timesteps(self.num_inference_steps)).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
        eta: Optional[float] = None,
    ) -> SchedulerOutput:
        """One DDIM step; ``eta`` overrides the instance's ``eta`` for this step only."""
        eta = self.eta if eta is None else float(eta)
        t = int(timestep)
        prev_t = t - self._stride()
        abar_t = self.alphas_cumprod[t]
        abar_prev = self._alpha_cumprod_at(prev_t, self.final_alpha_cumprod)

        # sigma_t of the paper's eq. 16: eta times the DDPM posterior standard deviation.
        posterior_var = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
        noise_std = eta * posterior_var**0.5
        prev_sample, x0 = self._ddim_update(model_output, sample, abar_t, abar_prev, noise_std)
        if eta > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + noise_std * noise
        return SchedulerOutput(prev_sample, x0)


class DDIMInverseScheduler(_DDIMBase):
    """Deterministic DDIM run backwards, from a clean latent towards noise (for inversion-based editing).

    ``timesteps`` ascend; each step moves the sample *up* to the given timestep using the model output
    predicted at it, which is diffusers' ``DDIMInverseScheduler`` convention.
    """

    default_name = "ddim_inverse"
    diffusers_class_name = "DDIMInverseScheduler"
    config_class = DDIMInverseConfig
    config: DDIMInverseConfig

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(self.config.num_train_timesteps, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        self.num_inference_steps = self._check_num_steps(num_inference_steps)
        ascending = self._integer_timesteps(self.num_inference_steps)[::-1].copy()
        self.timesteps = torch.from_numpy(ascending).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
        eta: Optional[float] = None,
    ) -> SchedulerOutput:
        """One inversion step up to ``timestep``. Inversion is deterministic: ``eta`` must be 0 if given."""
        if eta:
            raise ValueError(f"DDIMInverseScheduler is deterministic; eta must be 0, got {eta}")
        target = int(timestep)
        source = min(target - self._stride(), self.config.num_train_timesteps - 1)
        abar_source = self._alpha_cumprod_at(source, self.initial_alpha_cumprod)
        moved, x0 = self._ddim_update(model_output, sample, abar_source, self.alphas_cumprod[target])
        return SchedulerOutput(moved, x0)
