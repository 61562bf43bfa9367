"""Diffusion schedulers with diffusers' semantics (same timesteps, step outputs and noise draws), no diffusers.

Typical use, one fresh scheduler per generation::

    sched = make_scheduler("dpmpp_2m_karras", scheduler_config_json_dict).fresh()
    sched.set_timesteps(25)
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=generator).prev_sample
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
