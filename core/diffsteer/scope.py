"""Where and when a plugin acts: two settings every plugin has, applied by the core.

* The **step window** ``window_start``/``window_end``: fractions of the call's steps. Step ``i`` of ``n`` is
  inside when ``i / n >= window_start`` and ``(i + 1) / n <= window_end`` (diffusers'
  ``control_guidance_start/end`` rule). Outside it
  the core calls none of the plugin's per-step hooks (``pre_step``, ``model_inputs``, ``noise_prediction``,
  ``combine_guidance``, ``guidance``, ``post_step``), its attention patches are not applied and its UNet
  weight overrides are left out (a per-step LoRA schedule; text-encoder overrides act on the prompts, encoded
  once before the steps).
* The **region**: an image-sized mask in ``[0, 1]`` (a path, a PIL image, a ``(H, W)``/``(1, H, W)``
  tensor or array). The core confines the plugin's effect to it: its guidance term, its residuals, its
  replacement of the guidance formula, and its edits of latents and predictions are blended in with the mask
  at their own resolution. What cannot be confined (prompt encoding, embedding edits, tokens, weight
  overrides, attention edits, extra input channels, decoding) is refused with a
  :class:`~diffsteer.errors.PluginError` naming the plugin.

Give them to any plugin as keywords (``Sega(concepts=[...], window_start=0.2, region="left.png")``), in a settings
mapping, or with ``--set NAME.window_start=0.2`` on the command line. The names are long so that a plugin's
own settings keep ``start``/``end`` for themselves (a guidance-scale schedule's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from .errors import PluginError, SettingsError

#: The setting names every plugin takes; a plugin's own Settings may not reuse them.
SCOPE_FIELDS = ("window_start", "window_end", "region")


class Scope(BaseModel):
    """A plugin's step window and region (see the module docs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True, frozen=True)

    window_start: float = Field(0.0, ge=0, le=1, description="fraction of the steps before the plugin starts acting")
    window_end: float = Field(1.0, ge=0, le=1, description="fraction of the steps after which it stops")
    region: Any = Field(None, description="image-sized mask in [0, 1] that confines its effect; None: everywhere")

    @field_validator("region")
    @classmethod
    def _region_type(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)):
            if not Path(value).is_file():
                raise ValueError(f"region file {str(value)!r} does not exist")
            return str(value)
        if not isinstance(value, (Image.Image, torch.Tensor, np.ndarray)):
            raise ValueError(f"a region must be a path, PIL image, tensor or array, not {type(value).__name__}")
        return value

    @field_serializer("region")
    def _describe_region(self, value: Any) -> Any:
        # Paths are recorded as given; in-memory masks by shape (they cannot be stored as JSON).
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, Image.Image):
            return f"<PIL {value.mode} {value.width}x{value.height}>"
        return f"<{type(value).__name__} {'x'.join(str(s) for s in value.shape)}>"

    @property
    def windowed(self) -> bool:
        return self.window_start > 0.0 or self.window_end < 1.0

    def active(self, index: int, num_steps: int) -> bool:
        """Whether step ``index`` of ``num_steps`` lies inside the window."""
        return not (index / num_steps < self.window_start or (index + 1) / num_steps > self.window_end)

    def mask(self, owner: str, height: int, width: int) -> Optional[torch.Tensor]:
        """The region as float32 ``(1, 1, height, width)`` in ``[0, 1]``, or ``None`` without one."""
        value = self.region
        if value is None:
            return None
        if isinstance(value, str):
            with Image.open(value) as img:
                value = img.copy()
        if isinstance(value, Image.Image):
            img = value.convert("L")
            if img.size != (width, height):
                img = img.resize((width, height), resample=Image.BILINEAR)
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
        t = torch.as_tensor(value).float()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise PluginError(owner, f"region must be one (H, W) mask, got shape {tuple(torch.as_tensor(value).shape)}")
        if tuple(t.shape) != (height, width):
            raise PluginError(owner, f"region is {t.shape[0]}x{t.shape[1]} but the call makes {height}x{width} images")
        if float(t.min()) < 0 or float(t.max()) > 1:
            raise PluginError(owner, f"region values must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]")
        return t[None, None]

    def settings(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as JSON-compatible values (for call metadata)."""
        dumped = self.model_dump(mode="json")
        changed = {"window_start": self.window_start != 0.0, "window_end": self.window_end != 1.0,
                   "region": self.region is not None}
        return {k: dumped[k] for k in SCOPE_FIELDS if changed[k]}


def split_scope(
    name: str, own_fields: Any, aliases: Mapping[str, str], settings: Any, fields: Mapping[str, Any]
) -> tuple[Any, dict[str, Any], Scope]:
    """Take the scope fields (or their ``aliases``) out of ``settings`` and ``fields``; validate them.

    Returns the plugin's own settings, its own keyword fields and the :class:`Scope`. Errors name the
    field as the user spelt it.
    """
    reused = [f for f in SCOPE_FIELDS if f in own_fields]
    if reused:
        raise PluginError(name, f"its Settings define {', '.join(reused)}, which every plugin's scope uses")
    spelt: dict[str, str] = {}
    scope: dict[str, Any] = {}

    def take(source: dict[str, Any]) -> dict[str, Any]:
        rest = {}
        for key, value in source.items():
            field = aliases.get(key, key)
            if field in SCOPE_FIELDS:
                if field in spelt:
                    raise SettingsError(name, [(key, f"sets {field} again (given as {spelt[field]} too)")])
                spelt[field] = key
                scope[field] = value
            else:
                rest[key] = value
        return rest

    if isinstance(settings, Mapping):
        settings = take(dict(settings))
    fields = take(dict(fields))
    try:
        result = Scope(**scope)
    except ValidationError as exc:
        problems = [(spelt.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "<scope>", e["msg"]) for e in exc.errors()]
        raise SettingsError(name, problems) from None
    if result.window_start >= result.window_end:
        start, end = spelt.get("window_start", "window_start"), spelt.get("window_end", "window_end")
        raise SettingsError(name, [(start, f"{start} ({result.window_start}) must be smaller than {end} "
                                          f"({result.window_end}), or the plugin never acts")])
    return settings, fields, result


def latent_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` ``(1, 1, H, W)`` averaged down to ``like``'s spatial size, in its dtype and device."""
    return F.interpolate(mask.to(like.device, torch.float32), size=tuple(like.shape[-2:]), mode="area").to(like.dtype)


def blend(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``after`` inside ``mask``, ``before`` outside (soft where the mask is)."""
    m = latent_mask(mask, after)
    return before + m * (after - before)
