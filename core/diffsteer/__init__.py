"""diffsteer: composable controlled generation for Stable-Diffusion-style latent diffusion models.

>>> from diffsteer import Pipeline
>>> pipe = Pipeline.from_pretrained("shapes")                    # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20, seed=0).images  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .attention_patches import AttentionPatch
from .branches import BranchLayout, BranchPredictions
from .errors import (
    DiffsteerError,
    GenerationError,
    PluginConflictError,
    PluginError,
    PluginNotFoundError,
    SettingsError,
)
from .hookspecs import hookimpl
from .plugins import Plugin

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall, StepState, UNetInputs
    from .pipeline import Pipeline, PipelineOutput

__all__ = [
    "AttentionPatch", "BranchLayout", "BranchPredictions", "DiffsteerError", "GenerationCall",
    "GenerationError", "Pipeline", "PipelineOutput", "Plugin", "PluginConflictError", "PluginError",
    "PluginNotFoundError", "SettingsError", "StepState", "UNetInputs", "hookimpl",
]

_LAZY = {
    "Pipeline": ".pipeline", "PipelineOutput": ".pipeline",
    "GenerationCall": ".call", "StepState": ".call", "UNetInputs": ".call",
}


def __getattr__(name: str) -> Any:
    # The pipeline pulls in transformers; plugin packages that only need hookimpl/Plugin stay light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'diffsteer' has no attribute {name!r}")
