"""Diffusion schedulers with diffusers' semantics (same timesteps, step outputs and noise draws), no diffusers.

>>> sched = make_scheduler("dpmpp_2m_karras", scheduler_config_json_dict)
>>> sched.set_timesteps(25)
>>> for t in sched.timesteps:
...     eps = unet(sched.scale_model_input(latents, t), t)
...     latents = sched.step(eps, t, latents, generator=gen).prev_sample
"""

from .base import Scheduler, SchedulerOutput
from .config import SchedulerConfig, SchedulerConfigError
from .ddim import DDIMInverseScheduler, DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverScheduler
from .euler import EulerAncestralScheduler, EulerScheduler
from .pndm import PNDMScheduler
from .registry import make_scheduler, scheduler_names

__all__ = [
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverScheduler",
    "EulerAncestralScheduler",
    "EulerScheduler",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerOutput",
    "make_scheduler",
    "scheduler_names",
]
