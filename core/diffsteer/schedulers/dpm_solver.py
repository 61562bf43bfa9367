"""DPM-Solver++ multistep (Lu et al. 2022), orders 1 and 2, as ODE or SDE ("2M", "2M SDE").

Samples are variance preserving. Each step turns the model output into an x0 estimate; the 2nd-order
update extrapolates from the last two estimates in log-SNR time lambda = log(alpha / sigma).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BeforeValidator, model_validator

from ..models.random import randn_tensor
from .base import ConfigLike, Generators, SchedulerOutput, TimestepLike
from .config import Flag, ThresholdingFields, Unsupported, ZeroSnrFields
from .noise_schedule import exponential_sigmas, karras_sigmas, sigma_to_timestep, spaced_timesteps
from .prediction import refine_x0, split_prediction
from .sigma_base import SigmaScheduler, vp_scales


def _from_sibling_scheduler(aliases: dict[str, str]) -> Any:
    # Configs of DEIS / UniPC carry their own solver names; diffusers maps them onto DPM-Solver++'s.
    return BeforeValidator(lambda value: aliases.get(value, value) if isinstance(value, str) else value)


class DPMSolverConfig(ZeroSnrFields, ThresholdingFields):
    """diffusers ``DPMSolverMultistepScheduler`` fields.

    Not supported (rejected when set): solver order 3, the deprecated non-++ algorithms, learned
    variance, Lu lambdas, beta / flow sigmas and dynamic shifting.
    """

    solver_order: Literal[1, 2] = 2
    algorithm_type: Annotated[
        Literal["dpmsolver++", "sde-dpmsolver++"], _from_sibling_scheduler({"deis": "dpmsolver++"})
    ] = "dpmsolver++"
    solver_type: Annotated[
        Literal["midpoint", "heun"],
        _from_sibling_scheduler({"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}),
    ] = "midpoint"
    lower_order_final: Flag = True
    euler_at_final: Flag = False
    use_karras_sigmas: Flag = False
    use_exponential_sigmas: Flag = False
    use_beta_sigmas: Unsupported = False
    use_lu_lambdas: Unsupported = False
    use_flow_sigmas: Unsupported = False
    use_dynamic_shifting: Unsupported = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: None = None
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "linspace"

    @model_validator(mode="after")
    def _one_sigma_spread(self) -> "DPMSolverConfig":
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("fields 'use_karras_sigmas' and 'use_exponential_sigmas' cannot both be true")
        return self


def _log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha) - torch.log(sigma)


class DPMSolverScheduler(SigmaScheduler):
    """DPM-Solver++ (2M by default; ``use_karras_sigmas`` gives "DPM++ 2M Karras")."""

    default_name = "dpmpp_2m"
    diffusers_class_name = "DPMSolverMultistepScheduler"
    config_class = DPMSolverConfig
    config: DPMSolverConfig

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        root = self._sigma_alphas_cumprod.sqrt()
        self._train_log_snr = _log_snr(root, (1 - self._sigma_alphas_cumprod).sqrt())
        self._reset_history()

    @property
    def name(self) -> str:
        cfg = self.config
        sde = "_sde" if cfg.algorithm_type == "sde-dpmsolver++" else ""
        return f"dpmpp_2m{sde}{'_karras' if cfg.use_karras_sigmas else ''}"

    def _reset_history(self) -> None:
        self._x0_history: list[torch.Tensor] = []
        self._lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        n = self._check_num_steps(num_inference_steps)
        cfg = self.config
        # Drop the noisiest timesteps whose log-SNR is below lambda_min_clipped (for cosine schedules).
        clipped = int(torch.searchsorted(torch.flip(self._train_log_snr, [0]), cfg.lambda_min_clipped))
        last = cfg.num_train_timesteps - clipped
        if cfg.timestep_spacing == "trailing":
            spaced = spaced_timesteps("trailing", n, cfg.num_train_timesteps, cfg.steps_offset, last)
        else:
            # Space n + 1 points and drop the final one, so the schedule never ends at t = 0 exactly.
            spaced = spaced_timesteps(cfg.timestep_spacing, n + 1, cfg.num_train_timesteps, cfg.steps_offset, last)
            spaced = spaced[:-1]
        timesteps: np.ndarray = np.round(spaced).astype(np.int64)

        train_sigmas, log_train_sigmas = self._train_sigma_table()
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            # Unlike Euler, the spread covers the whole training sigma range.
            spread = karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas
            sigmas = spread(train_sigmas[0].item(), train_sigmas[-1].item(), n)
            timesteps = sigma_to_timestep(sigmas, log_train_sigmas)
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        final = 0.0
        if cfg.final_sigmas_type == "sigma_min":
            abar0 = self._sigma_alphas_cumprod[0]
            final = float(((1 - abar0) / abar0) ** 0.5)
        sigmas = np.concatenate([sigmas, [final]])
        # Fractional timesteps truncate to int64 here, as in diffusers.
        self._install(sigmas, torch.from_numpy(timesteps).to(device=device, dtype=torch.int64))
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def _noised(self, original: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = vp_scales(sigma)
        return alpha_t * original + sigma_t * noise

    def _to_vp(self, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return sample  # DPM-Solver keeps VP samples

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        cfg = self.config
        steps = self._require_timesteps()
        index = self._current_index(timestep)
        # A first-order last step is more stable with few steps, and required when it lands on sigma 0.
        first_order_final = index == steps - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero"
        )

        alpha_s, sigma_s = vp_scales(self.sigmas[index])
        x0, _ = split_prediction(cfg.prediction_type, model_output, sample, alpha_s, sigma_s)
        x0 = refine_x0(x0, cfg)
        self._x0_history = (self._x0_history + [x0])[-cfg.solver_order:]

        sample = sample.to(torch.float32)
        noise: Optional[torch.Tensor] = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
            )

        use_first_order = cfg.solver_order == 1 or self._lower_order_nums < 1 or first_order_final
        prev_sample = self._update(index, sample, noise, second_order=not use_first_order)
        self._lower_order_nums = min(self._lower_order_nums + 1, cfg.solver_order)
        self._step_index = index + 1
        # The result takes x0's dtype (float32 for a half-precision model output and float32 sample),
        # as in diffusers, where the converted output replaces the model output before this cast.
        return SchedulerOutput(prev_sample.to(x0.dtype), x0)

    def _update(
        self, index: int, sample: torch.Tensor, noise: Optional[torch.Tensor], second_order: bool
    ) -> torch.Tensor:
        """x at ``sigmas[index + 1]`` from x at ``sigmas[index]`` and the x0 history.

        The result is c_x * sample + c_0 * D0 [+ c_1 * D1] [+ c_noise * noise] with D0 the newest x0 and
        D1 its finite-difference slope in lambda; the coefficients are those of eqs. (5)/(8) of
        DPM-Solver++ (ODE) and of its SDE variant, in diffusers' operation order.
        """
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        alpha_t, sigma_t = vp_scales(self.sigmas[index + 1])
        alpha_s0, sigma_s0 = vp_scales(self.sigmas[index])
        h = _log_snr(alpha_t, sigma_t) - _log_snr(alpha_s0, sigma_s0)

        if sde:
            c_x = sigma_t / sigma_s0 * torch.exp(-h)
            c_0 = alpha_t * (1 - torch.exp(-2.0 * h))
        else:
            c_x = sigma_t / sigma_s0
            c_0 = -(alpha_t * (torch.exp(-h) - 1.0))
        d0 = self._x0_history[-1]
        prev_sample = c_x * sample + c_0 * d0

        if second_order:
            alpha_s1, sigma_s1 = vp_scales(self.sigmas[index - 1])
            h_0 = _log_snr(alpha_s0, sigma_s0) - _log_snr(alpha_s1, sigma_s1)
            d1 = (1.0 / (h_0 / h)) * (d0 - self._x0_history[-2])
            if self.config.solver_type == "midpoint":
                c_1 = 0.5 * c_0 if sde else -(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
            elif sde:
                c_1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                c_1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            prev_sample = prev_sample + c_1 * d1

        if noise is not None:
            prev_sample = prev_sample + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        return prev_sample
