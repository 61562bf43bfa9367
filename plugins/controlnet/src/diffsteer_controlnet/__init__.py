"""diffsteer plugin ``controlnet``: ControlNet (Zhang et al., arXiv 2302.05543).

A ControlNet is a trainable copy of the UNet's encoder that reads a control image (outlines, masks,
depth) and adds residuals to the UNet's skip connections, so the image follows the control's layout.

>>> from diffsteer import Pipeline                                              # doctest: +SKIP
>>> from diffsteer_controlnet import ControlNet                                 # doctest: +SKIP
>>> pipe = Pipeline.from_pretrained("shapes")                                   # doctest: +SKIP
>>> cn = ControlNet(model="shapes-outline", image="outline.png", conditioning_scale=1.0)  # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20, seed=0, plugins=[cn])          # doctest: +SKIP

Several ControlNets stack as several plugin instances (each with its own image and scale), which is
diffusers' ``MultiControlNetModel``. ``diffsteer train controlnet`` trains one; see docs/controlnet.md.
"""

from __future__ import annotations

from .loading import SHIPPED, load_controlnet, save_controlnet, shipped_controlnet_dir
from .model import ConditioningEmbedding, ControlNetConfig, ControlNetModel
from .plugin import ControlNet, ControlNetSettings

__all__ = [
    "SHIPPED",
    "ConditioningEmbedding",
    "ControlNet",
    "ControlNetConfig",
    "ControlNetModel",
    "ControlNetSettings",
    "load_controlnet",
    "save_controlnet",
    "shipped_controlnet_dir",
]
__version__ = "0.1.0"
