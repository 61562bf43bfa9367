"""Scheduler names: ours ("euler_a", "dpmpp_2m_karras", ...) and diffusers' class names, and the factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .base import ConfigLike, Scheduler
from .config import DEFAULTS_KEY, SchedulerConfig
from .ddim import DDIMInverseScheduler, DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverScheduler
from .euler import EulerAncestralScheduler, EulerScheduler
from .pndm import PNDMScheduler

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {**_DPMPP_2M, "algorithm_type": "sde-dpmsolver++"}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False}
_NO_KARRAS = {"use_karras_sigmas": False}


@dataclass(frozen=True)
class _Preset:
    """What one of our names means: a class, the config values the name forces, and values it
    supplies only where the config is silent."""

    cls: type[Scheduler]
    forced: Mapping[str, Any] = field(default_factory=dict)
    fallback: Mapping[str, Any] = field(default_factory=dict)


_PRESETS: dict[str, _Preset] = {
    "ddim": _Preset(DDIMScheduler),
    "ddim_inverse": _Preset(DDIMInverseScheduler),
    "ddpm": _Preset(DDPMScheduler),
    "euler": _Preset(EulerScheduler),
    "euler_a": _Preset(EulerAncestralScheduler),
    "dpmpp_2m": _Preset(DPMSolverScheduler, {**_DPMPP_2M, **_NO_KARRAS}),
    "dpmpp_2m_karras": _Preset(DPMSolverScheduler, {**_DPMPP_2M, **_KARRAS}),
    "dpmpp_2m_sde": _Preset(DPMSolverScheduler, {**_DPMPP_2M_SDE, **_NO_KARRAS}),
    "dpmpp_2m_sde_karras": _Preset(DPMSolverScheduler, {**_DPMPP_2M_SDE, **_KARRAS}),
    # Stable Diffusion's PNDM is PLMS without the Runge-Kutta warm-up (which would cost 9 extra model
    # calls); diffusers' class default keeps the warm-up, so the name supplies the SD setting.
    "pndm": _Preset(PNDMScheduler, fallback={"skip_prk_steps": True}),
}

# A diffusers class name means that class with its own defaults and nothing forced.
_BY_DIFFUSERS_CLASS: dict[str, _Preset] = {
    p.cls.diffusers_class_name: _Preset(p.cls) for p in _PRESETS.values()
}
_BY_CONFIG_CLASS: dict[type[SchedulerConfig], _Preset] = {
    p.cls.config_class: p for p in _BY_DIFFUSERS_CLASS.values()
}


def scheduler_names() -> list[str]:
    """Our scheduler names, as :func:`make_scheduler` accepts them."""
    return list(_PRESETS)


def _resolve(name: str) -> _Preset:
    if name in _PRESETS:
        return _PRESETS[name]
    if name in _BY_DIFFUSERS_CLASS:
        return _BY_DIFFUSERS_CLASS[name]
    raise ValueError(
        f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())} "
        f"(or a diffusers class name: {', '.join(sorted(_BY_DIFFUSERS_CLASS))})"
    )


def make_scheduler(name: Optional[str], config: ConfigLike = None, **overrides: Any) -> Scheduler:
    """Build a scheduler by ``name`` (ours or a diffusers class name) from a config.

    ``config`` is a diffusers ``scheduler_config.json`` dict (``_class_name`` and unknown keys are
    fine), another scheduler's ``config``, or None for the defaults. With ``name=None`` the class is
    taken from ``config["_class_name"]`` (or from the type of a scheduler's ``config``).

    Precedence, lowest first: the class defaults; what our name supplies where the config is silent
    (``pndm``: ``skip_prk_steps=True``); the config; what the name forces (``dpmpp_2m_karras``:
    ``use_karras_sigmas=True``); ``overrides``. Overrides set config fields (``prediction_type=...``)
    or sampling options (DDIM's ``eta``, Euler's ``s_churn``).
    """
    if name is None and type(config) in _BY_CONFIG_CLASS:
        preset = _BY_CONFIG_CLASS[type(config)]  # type: ignore[index]
    elif name is None:
        class_name = config.get("_class_name") if isinstance(config, Mapping) else None
        if not class_name:
            raise ValueError("make_scheduler(None, config) needs a config with '_class_name'; pass a name")
        preset = _resolve(str(class_name))
    else:
        preset = _resolve(name)

    given = _explicit(config)
    fields = preset.cls.config_class.model_fields
    options = {k: v for k, v in overrides.items() if k not in fields}
    field_overrides = {k: v for k, v in overrides.items() if k in fields}
    values = {**preset.fallback, **given, **preset.forced, **field_overrides}
    return preset.cls(values, **options)


def _explicit(config: ConfigLike) -> dict[str, Any]:
    """The values ``config`` actually sets: a diffusers dict minus its ``_use_default_values`` keys."""
    if isinstance(config, SchedulerConfig):
        return config.explicit_values()
    values = dict(config or {})
    for key in values.pop(DEFAULTS_KEY, None) or ():
        values.pop(key, None)
    return values
