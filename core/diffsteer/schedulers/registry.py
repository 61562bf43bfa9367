"""Scheduler names: ours ("euler_a", "dpmpp_2m_karras", ...) and diffusers' class names, and the factory."""

from __future__ import annotations

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
_UNIFORM = {"use_karras_sigmas": False}

#: Our names -> (class, config values the name implies, which override the given config).
_PRESETS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddim_inverse": (DDIMInverseScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerScheduler, {}),
    "euler_a": (EulerAncestralScheduler, {}),
    "dpmpp_2m": (DPMSolverScheduler, {**_DPMPP_2M, **_UNIFORM}),
    "dpmpp_2m_karras": (DPMSolverScheduler, {**_DPMPP_2M, **_KARRAS}),
    "dpmpp_2m_sde": (DPMSolverScheduler, {**_DPMPP_2M_SDE, **_UNIFORM}),
    "dpmpp_2m_sde_karras": (DPMSolverScheduler, {**_DPMPP_2M_SDE, **_KARRAS}),
    "pndm": (PNDMScheduler, {}),
}

_BY_DIFFUSERS_CLASS: dict[str, type[Scheduler]] = {
    cls.diffusers_class_name: cls for cls, _ in _PRESETS.values()
}


def scheduler_names() -> list[str]:
    """Our scheduler names, as :func:`make_scheduler` accepts them."""
    return list(_PRESETS)


def _resolve(name: str) -> tuple[type[Scheduler], dict[str, Any]]:
    if name in _PRESETS:
        return _PRESETS[name]
    if name in _BY_DIFFUSERS_CLASS:
        return _BY_DIFFUSERS_CLASS[name], {}
    raise ValueError(
        f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())} "
        f"(or a diffusers class name: {', '.join(sorted(_BY_DIFFUSERS_CLASS))})"
    )


def make_scheduler(name: Optional[str], config: ConfigLike = None, **overrides: Any) -> Scheduler:
    """Build a scheduler by ``name`` (ours or a diffusers class name) from a config.

    ``config`` is a diffusers ``scheduler_config.json`` dict (``_class_name`` and unknown keys are
    fine), another scheduler's ``config``, or None for the defaults. With ``name=None`` the class is
    taken from ``config["_class_name"]``. ``overrides`` set config fields (``prediction_type=...``)
    or sampling options (DDIM's ``eta``, Euler's ``s_churn``) and win over both the config and the
    name's implied settings (``dpmpp_2m_karras`` implies ``use_karras_sigmas=True``).
    """
    if name is None:
        class_name = config.get("_class_name") if isinstance(config, Mapping) else None
        if not class_name:
            raise ValueError("make_scheduler(None, config) needs a config with '_class_name'; pass a name")
        name = str(class_name)
    cls, implied = _resolve(name)

    if isinstance(config, SchedulerConfig):
        values: dict[str, Any] = config.explicit_values()
    else:
        values = dict(config or {})
    fields = cls.config_class.model_fields
    options = {k: v for k, v in overrides.items() if k not in fields}
    explicit = {**implied, **{k: v for k, v in overrides.items() if k in fields}}
    values.update(explicit)
    if DEFAULTS_KEY in values:
        # A value the name or an override sets is no longer a default to be dropped.
        values[DEFAULTS_KEY] = [k for k in values[DEFAULTS_KEY] if k not in explicit]
    return cls(values, **options)
