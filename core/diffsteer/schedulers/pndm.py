"""PNDM (Liu et al. 2022): pseudo numerical methods on the DDIM transfer; a Runge-Kutta warm-up, then
linear multistep.

Stable Diffusion 1.x ships it with ``skip_prk_steps=True``: the warm-up is replaced by a second-order
step that evaluates the model twice at the first timestep's neighbourhood (hence a repeated timestep).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import model_validator

from .base import ConfigLike, Generators, Scheduler, SchedulerOutput, TimestepLike
from .config import Flag, SchedulerConfig

#: Adams-Bashforth weights (newest estimate first) and denominator, by number of noise estimates kept.
_ADAMS_BASHFORTH: dict[int, tuple[tuple[int, ...], int]] = {
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
}


class PNDMConfig(SchedulerConfig):
    """diffusers ``PNDMScheduler`` fields.

    PNDM has no ``rescale_betas_zero_snr``: its transfer divides by abar at the last timestep, which
    that rescale makes 0. diffusers ignores the key silently; we ignore it too (and carry it on to
    other schedulers) but warn, since the sampler then runs the un-rescaled schedule.
    """

    skip_prk_steps: Flag = False
    set_alpha_to_one: Flag = False
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    @model_validator(mode="before")
    @classmethod
    def _warn_zero_snr(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("rescale_betas_zero_snr"):
            warnings.warn(
                "PNDM ignores rescale_betas_zero_snr=True (as diffusers does) and samples the un-rescaled "
                "schedule; use ddim, euler or dpmpp_2m for a zero-terminal-SNR model",
                UserWarning,
                stacklevel=2,
            )
        return data


class PNDMScheduler(Scheduler):
    """PNDM with its Runge-Kutta (PRK) warm-up, or PLMS only when ``skip_prk_steps`` is set."""

    default_name = "pndm"
    diffusers_class_name = "PNDMScheduler"
    config_class = PNDMConfig
    config: PNDMConfig
    #: Runge-Kutta order of the warm-up and number of noise estimates of the 4th-order multistep formula.
    pndm_order = 4

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        super().__init__(config, **options)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self._counter = 0  # model evaluations consumed so far
        self._eps_history: list[torch.Tensor] = []
        self._rk_sum: Optional[torch.Tensor] = None  # weighted sum of the current Runge-Kutta stage outputs
        self._anchor: Optional[torch.Tensor] = None  # sample a multi-evaluation step starts from

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        self.num_inference_steps = n = self._check_num_steps(num_inference_steps)
        ascending = self._integer_timesteps(n)[::-1]
        if self.config.skip_prk_steps:
            # The first PLMS step needs two model evaluations (at its start, then at its target), so
            # the second timestep appears twice.
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            prk = np.array([], dtype=np.int64)
        else:
            # Each of the three RK4 steps over the noisiest timesteps evaluates at t, t - h/2 (twice)
            # and t - h, with h the stride; then PLMS continues from the fourth-noisiest timestep.
            half = self.config.num_train_timesteps // n // 2
            pairs = np.repeat(ascending[-self.pndm_order :], 2) + np.tile([0, half], self.pndm_order)
            prk = np.repeat(pairs[:-1], 2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self.prk_timesteps = prk.astype(np.int64)
        self.timesteps = torch.from_numpy(np.concatenate([prk, plms]).astype(np.int64)).to(device)
        self._reset_history()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        self._require_timesteps()
        if not self.config.skip_prk_steps and self._counter < len(self.prk_timesteps):
            return self._runge_kutta_step(model_output, int(timestep), sample)
        return self._multistep_step(model_output, int(timestep), sample)

    def _runge_kutta_step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> SchedulerOutput:
        """One of the four model evaluations of an RK4 step.

        Each stage moves the step's start sample (the anchor) with its own noise estimate, to the
        midpoint for stages 1-3; the fourth moves it to the end with the RK4 average of all four.
        """
        stage = self._counter % 4
        stride = self.config.num_train_timesteps // self._require_timesteps()
        target = timestep - (0 if self._counter % 2 else stride // 2)
        start = int(self.prk_timesteps[self._counter // 4 * 4])
        if stage == 0:
            self._rk_sum = model_output * (1 / 6)
            self._eps_history.append(model_output)
            self._anchor = sample
        elif stage in (1, 2):
            self._rk_sum = self._rk_sum + model_output * (1 / 3)
        else:
            model_output = self._rk_sum + model_output * (1 / 6)
            self._rk_sum = None
        anchor = self._anchor if self._anchor is not None else sample
        self._counter += 1
        return self._transfer(anchor, start, target, model_output)

    def _multistep_step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> SchedulerOutput:
        """A pseudo linear multistep (PLMS) step: Adams-Bashforth on the noise estimates."""
        if not self.config.skip_prk_steps and len(self._eps_history) < 3:
            raise RuntimeError("PNDM: the Runge-Kutta warm-up must run before multistep steps")
        stride = self.config.num_train_timesteps // self._require_timesteps()
        start, target = timestep, timestep - stride
        if self._counter == 1:
            # Second evaluation of the first step (skip_prk_steps): the model ran at the step's target;
            # average both estimates and redo the step from its start (Heun-like).
            start, target = timestep + stride, timestep
        else:
            self._eps_history = self._eps_history[-3:] + [model_output]

        history = self._eps_history
        if len(history) == 1 and self._counter == 0:
            self._anchor = sample
        elif len(history) == 1 and self._counter == 1:
            model_output = (model_output + history[-1]) / 2
            sample, self._anchor = self._anchor, None
        else:
            weights, denominator = _ADAMS_BASHFORTH[len(history)]
            combined = self._weighted(history, weights)
            # diffusers multiplies the 4th-order sum by 1/24 but divides the others; keep its rounding.
            model_output = combined * (1 / 24) if len(history) == 4 else combined / denominator
        self._counter += 1
        return self._transfer(sample, start, target, model_output)

    @staticmethod
    def _weighted(history: list[torch.Tensor], weights: tuple[int, ...]) -> torch.Tensor:
        """sum_i weights[i] * history[-1 - i], newest first (the rounding order of the paper's formulas)."""
        total = weights[0] * history[-1]
        for offset, weight in enumerate(weights[1:], start=2):
            total = total + weight * history[-offset]
        return total

    def _transfer(self, sample: torch.Tensor, timestep: int, target: int, eps: torch.Tensor) -> SchedulerOutput:
        """The PNDM transfer phi (eq. 9 of the paper): move ``sample`` from ``timestep`` to ``target``."""
        abar_t = self.alphas_cumprod[timestep]
        abar_prev = self._alpha_cumprod_at(target, self.final_alpha_cumprod)
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        if self.config.prediction_type == "v_prediction":
            eps = abar_t**0.5 * eps + beta_t**0.5 * sample
        sample_coeff = (abar_prev / abar_t) ** 0.5
        eps_denominator = abar_t * beta_prev**0.5 + (abar_t * beta_t * abar_prev) ** 0.5
        prev_sample = sample_coeff * sample - (abar_prev - abar_t) * eps / eps_denominator
        x0 = (sample - beta_t**0.5 * eps) / abar_t**0.5
        return SchedulerOutput(prev_sample, x0)
