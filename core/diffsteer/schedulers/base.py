"""The scheduler interface the pipeline drives, and the parts of it every scheduler shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .config import DEFAULTS_KEY, SchedulerConfig, build_config
from .noise_schedule import make_betas, spaced_timesteps
from .prediction import split_prediction

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
TimestepLike = Union[torch.Tensor, int, float]
ConfigLike = Union[SchedulerConfig, Mapping[str, Any], None]


@dataclass
class SchedulerOutput:
    """One denoising step: the sample for the next timestep and, for previews and guidance, the x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a per-batch-item vector ``(B,)`` (or a scalar) to broadcast over a ``ndim``-dimensional batch."""
    return values.flatten().reshape(-1, *([1] * (ndim - 1)))


class Scheduler(ABC):
    """A diffusion sampler with diffusers' semantics: same timesteps, same step outputs, same noise draws.

    Call :meth:`set_timesteps`, then per timestep :meth:`scale_model_input` on the model input and
    :meth:`step` on the model output. Per-generation state (step index, multistep history) lives on
    the instance, so use :meth:`fresh` to get one instance per generation.
    """

    #: Our short name, as :func:`make_scheduler` takes it.
    default_name: ClassVar[str]
    #: The diffusers class with the same math; written as ``_class_name`` to scheduler_config.json.
    diffusers_class_name: ClassVar[str]
    config_class: ClassVar[type[SchedulerConfig]]
    #: Model evaluations per entry of ``timesteps`` (img2img skips ``start * order`` entries).
    order: ClassVar[int] = 1
    #: Sampling options that are not part of diffusers' config (DDIM's ``eta``), with their defaults.
    option_defaults: ClassVar[Mapping[str, float]] = {}

    def __init__(self, config: ConfigLike = None, **options: float) -> None:
        self.config = self._coerce_config(config)
        self._options = self._check_options(options)
        for key, value in self._options.items():
            setattr(self, key, value)

        self.betas = make_betas(self.config)
        #: Cumulative product of (1 - beta) over the training timesteps, float32 as in diffusers.
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._begin_index: Optional[int] = None

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> dict[str, float]:
        unknown = sorted(set(options) - set(cls.option_defaults))
        if unknown:
            known = ", ".join(sorted(cls.option_defaults)) or "none"
            raise ValueError(
                f"{cls.diffusers_class_name} has no config field or option "
                f"{', '.join(map(repr, unknown))} (its options: {known})"
            )
        checked = {}
        for key, default in cls.option_defaults.items():
            value = options.get(key, default)
            try:
                checked[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{cls.diffusers_class_name} option {key!r} must be a number, got {value!r}") from None
        return checked

    @classmethod
    def _coerce_config(cls, config: ConfigLike) -> SchedulerConfig:
        if type(config) is cls.config_class:
            return config  # already validated and immutable: share it
        if isinstance(config, SchedulerConfig):
            return build_config(cls.config_class, cls.diffusers_class_name, config.explicit_values())
        return build_config(cls.config_class, cls.diffusers_class_name, config or {})

    # ----- identity and serialisation -------------------------------------------------------------

    @property
    def name(self) -> str:
        """Our name for this scheduler (``"ddim"``, ``"euler_a"``, ...)."""
        return self.default_name

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: pure-noise latents are ``randn * init_noise_sigma``."""
        return 1.0

    def fresh(self) -> "Scheduler":
        """A new instance with this config and options and no timesteps or step state."""
        return type(self)(self.config, **self._options)

    def to_diffusers_config(self) -> dict[str, Any]:
        """This config as a diffusers ``scheduler_config.json`` dict, ``_class_name`` included.

        Like diffusers' in-memory config it lists under ``_use_default_values`` the fields left at this
        class's default, so another class built from the dict applies its own defaults for them.
        """
        values = self.config.model_dump()
        data: dict[str, Any] = {"_class_name": self.diffusers_class_name, **self.config._passthrough, **values}
        defaulted = sorted(set(values) - self.config.model_fields_set)
        if defaulted:
            data[DEFAULTS_KEY] = defaulted
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_inference_steps={self.num_inference_steps})"

    # ----- the sampling interface -----------------------------------------------------------------

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Choose the ``num_inference_steps`` timesteps (``self.timesteps``) and reset the step state."""

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: Generators = None,
    ) -> SchedulerOutput:
        """Advance ``sample`` from ``timestep`` to the next timestep given the model's output there.

        Stochastic schedulers draw their noise from ``generator`` exactly as diffusers does.
        """

    def set_begin_index(self, begin_index: int) -> None:
        """Declare that sampling starts at ``timesteps[begin_index]`` (img2img), before the first step."""
        self._begin_index = int(begin_index)

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: TimestepLike) -> torch.Tensor:
        """The model's input at ``timestep``; only schedulers that keep unscaled (VE) samples change it."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """Forward-diffuse ``original_samples`` to ``timesteps`` (one per batch item, or one for all)."""
        root_alpha, root_beta = self._train_scales(timesteps, original_samples)
        return root_alpha * original_samples + root_beta * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """The v-prediction training target v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0."""
        root_alpha, root_beta = self._train_scales(timesteps, sample)
        return root_alpha * noise - root_beta * sample

    # ----- x0 / noise estimates at the current step (for guidance that re-noises an x0: SAG) --------

    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, timestep: TimestepLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)``: the clean-sample and noise estimates that ``model_output`` implies for ``sample``.

        ``sample`` is this scheduler's sample at the step of ``timestep`` (what :meth:`step` receives,
        before :meth:`scale_model_input`), ``model_output`` the UNet's output for it. The estimates are
        raw: no clipping or thresholding (that is :meth:`step`'s business), and they read no step state
        or history, so a plugin may call this between the UNet pass and :meth:`step`.
        :meth:`renoise` is the inverse: ``renoise(*split_model_output(out, x, t), t)`` is ``x``.

        Variance-preserving samplers (DDIM, DDPM, PNDM) use the training schedule at ``timestep``,
        ``x = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``, the formula of diffusers'
        ``StableDiffusionSAGPipeline.pred_x0`` / ``pred_epsilon``; the sigma samplers use the noise
        level of the current step (see :class:`~diffsteer.schedulers.sigma_base.SigmaScheduler`).
        """
        root_alpha, root_beta = self._train_scales(timestep, sample)
        return split_prediction(self.config.prediction_type, model_output, sample, root_alpha, root_beta)

    def renoise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep: TimestepLike) -> torch.Tensor:
        """A sample of this scheduler at the noise level of the step at ``timestep``, from x0 and a noise.

        The inverse of :meth:`split_model_output`. For variance-preserving samplers it is
        :meth:`add_noise` at ``timestep``; the sigma samplers differ from their ``add_noise`` (which
        follows diffusers' img2img conventions) in always using the *current* step's sigma.
        """
        return self.add_noise(original_samples, noise, torch.as_tensor(timestep).reshape(1))

    # ----- helpers for subclasses -----------------------------------------------------------------

    def _train_scales(self, timesteps: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) of training timesteps, shaped to broadcast over ``like``."""
        cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        index = torch.as_tensor(timesteps, device=like.device)
        if index.is_floating_point():
            index = index.round()  # sigma schedulers' timesteps are float but name training steps
        abar = cumprod[index.long()]
        return per_sample(abar**0.5, like.ndim), per_sample((1 - abar) ** 0.5, like.ndim)

    def _check_num_steps(self, num_inference_steps: int) -> int:
        steps = int(num_inference_steps)
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps "
                f"({self.config.num_train_timesteps}), got {num_inference_steps}"
            )
        return steps

    def _integer_timesteps(self, num_steps: int) -> np.ndarray:
        """The config's spacing of ``num_steps`` timesteps, rounded to int64, descending."""
        cfg = self.config
        spaced = spaced_timesteps(cfg.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
        return np.round(spaced).astype(np.int64)

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")
        return self.num_inference_steps

    def _alpha_cumprod_at(self, timestep: int, before_start: torch.Tensor) -> torch.Tensor:
        """abar at a training timestep; ``before_start`` stands in for the (virtual) timestep -1."""
        return self.alphas_cumprod[timestep] if timestep >= 0 else before_start
