"""Scheduler configuration: pydantic models that read diffusers' ``scheduler_config.json`` field for field.

Each scheduler class has its own config model because diffusers' defaults differ per class (DDIM clips
and sets ``set_alpha_to_one`` by default, PNDM does neither; Euler spaces timesteps ``linspace``, DDIM
``leading``). Fields a scheduler does not know are ignored, as diffusers ignores them; values we do not
implement are rejected by the field's type, so the error names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..errors import DiffsteerError

#: Key of a diffusers config dict listing the fields that were left at the class default (diffusers'
#: ``ConfigMixin`` records it so that a config handed to another class does not impose those defaults).
DEFAULTS_KEY = "_use_default_values"


class SchedulerConfigError(DiffsteerError, ValueError):
    """A scheduler config value is invalid or unsupported; the message names the scheduler and field."""


def _none_is_false(value: Any) -> Any:
    # diffusers writes some flags as null (``use_karras_sigmas: null``) and treats that as False.
    return False if value is None else value


def _as_float_list(value: Any) -> Any:
    # trained_betas may arrive as a numpy array or tensor when a config is built in code.
    if value is None or isinstance(value, list):
        return value
    return [float(v) for v in value]


Flag = Annotated[bool, BeforeValidator(_none_is_false)]
#: A diffusers flag whose feature we do not implement: accepted only when off, so turning it on fails
#: with an error that names the field.
Unsupported = Annotated[Literal[False], BeforeValidator(_none_is_false)]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


class SchedulerConfig(BaseModel):
    """Fields every scheduler shares: the training noise schedule and how inference timesteps are spaced.

    Field names and defaults are diffusers'. Unknown keys (``_class_name``, fields of other schedulers)
    are ignored; the config is immutable, so one instance can back many scheduler instances.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.0001, ge=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    trained_betas: Annotated[Optional[list[float]], BeforeValidator(_as_float_list)] = None
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = Field(0, ge=0)

    # Keys of the source dict that this class does not know. Kept (as diffusers keeps them) so that a
    # config handed on to another scheduler class still carries e.g. PNDM's ``clip_sample: false``.
    _passthrough: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_trained_betas(self) -> "SchedulerConfig":
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"field 'trained_betas' has {len(self.trained_betas)} values but "
                f"num_train_timesteps is {self.num_train_timesteps}"
            )
        return self

    def explicit_values(self) -> dict[str, Any]:
        """The values this config was given (not its defaults), plus the unknown keys it carried.

        This is what passes to another scheduler class, mirroring diffusers' ``_use_default_values``.
        """
        return {**self._passthrough, **self.model_dump(exclude_unset=True)}


class ZeroSnrFields(SchedulerConfig):
    """The zero-terminal-SNR rescale of the betas (Lin et al. 2023), known to every scheduler but PNDM."""

    rescale_betas_zero_snr: Flag = False


class ThresholdingFields(SchedulerConfig):
    """Dynamic thresholding of the predicted clean sample (Imagen), known to DDIM, DDPM and DPM-Solver."""

    thresholding: Flag = False
    dynamic_thresholding_ratio: float = Field(0.995, gt=0.0, le=1.0)
    sample_max_value: float = Field(1.0, gt=0.0)


def build_config(cls: type[SchedulerConfig], owner: str, values: Mapping[str, Any]) -> SchedulerConfig:
    """Validate ``values`` (a diffusers-style dict) into ``cls``; errors name ``owner`` and the field."""
    values = dict(values)
    for key in values.pop(DEFAULTS_KEY, None) or ():
        # diffusers lists the fields its config filled from the class default: drop them so that this
        # class applies its own default, exactly as diffusers' ``from_config`` does.
        values.pop(key, None)
    try:
        config = cls(**{k: v for k, v in values.items() if isinstance(k, str) and not k.startswith("_")})
    except ValidationError as err:
        problems = []
        for item in err.errors():
            field = ".".join(str(p) for p in item["loc"])
            where = f"field {field!r}: " if field else ""
            shown = f" (got {item['input']!r})" if field else ""
            problems.append(f"{where}{item['msg'].removeprefix('Value error, ')}{shown}")
        raise SchedulerConfigError(f"invalid {owner} config: " + "; ".join(problems)) from None
    config._passthrough = {
        k: v for k, v in values.items() if not k.startswith("_") and k not in cls.model_fields
    }
    return config
