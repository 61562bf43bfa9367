"""diffsteer: composable controlled generation for Stable-Diffusion-style latent diffusion models.

>>> from diffsteer import Pipeline
>>> pipe = Pipeline.from_pretrained("shapes")                    # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20, seed=0).images  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (
    DiffsteerError,
    GenerationError,
    PluginConflictError,
    PluginError,
    PluginNotFoundError,
    SettingsError,
)

if TYPE_CHECKING:  # pragma: no cover
    from .attention_patches import AttentionPatch
    from .branches import BranchLayout, BranchPredictions
    from .call import GenerationCall, StepState, UNetInputs
    from .hookspecs import hookimpl
    from .overrides import WeightOverrides
    from .pipeline import Pipeline, PipelineOutput
    from .plugins import Plugin

__all__ = [
    "AttentionPatch", "BranchLayout", "BranchPredictions", "DiffsteerError", "GenerationCall",
    "GenerationError", "Pipeline", "PipelineOutput", "Plugin", "PluginConflictError", "PluginError",
    "PluginNotFoundError", "SettingsError", "StepState", "UNetInputs", "WeightOverrides", "hookimpl",
]

# Everything that imports torch, transformers or pydantic is loaded on first use, so `import diffsteer`
# (and with it `diffsteer --help`) stays fast and plugin packages load only what they touch.
_LAZY = {
    "AttentionPatch": ".attention_patches",
    "BranchLayout": ".branches", "BranchPredictions": ".branches",
    "GenerationCall": ".call", "StepState": ".call", "UNetInputs": ".call",
    "hookimpl": ".hookspecs",
    "WeightOverrides": ".overrides",
    "Pipeline": ".pipeline", "PipelineOutput": ".pipeline",
    "Plugin": ".plugins",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'diffsteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
