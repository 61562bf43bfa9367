"""Checks on a generation call's arguments, run before any work: a wrong type or an impossible value is a
:class:`~diffsteer.errors.RequestError` naming the argument; a size far from the model's native one is a
:class:`~diffsteer.errors.DiffsteerWarning` with an estimate of what it will cost.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any, Optional, Sequence

from .errors import DiffsteerWarning, RequestError

#: torch generators take seeds in [0, 2**64 - 1]; negative seeds alias positive ones, so they are refused.
MAX_SEED = 2**64 - 1
#: A size whose area is more than this many times the native area (or less than its inverse) gets a warning.
FAR_FROM_NATIVE = 4.0


def _kind(value: Any) -> str:
    return type(value).__name__


def _show(number: Any) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def check_number(name: str, value: Any, *, integer: bool = False, minimum: Any = None, maximum: Any = None,
                 optional: bool = False, hint: str = "") -> None:
    """``value`` is a finite number (an integer when ``integer``; never a bool or a string) within
    ``[minimum, maximum]``; None passes when ``optional``."""
    if value is None and optional:
        return
    kind, what = (numbers.Integral, "an integer") if integer else (numbers.Real, "a number")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(name, f"must be {what}, got {value!r} ({_kind(value)})")
    if not integer and not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        span = (f"in [{_show(minimum)}, {_show(maximum)}]" if minimum is not None and maximum is not None
                else f"at least {_show(minimum)}" if minimum is not None else f"at most {_show(maximum)}")
        raise RequestError(name, f"must be {span}, got {value}{hint}")


def check_int(name: str, value: Any, **limits: Any) -> None:
    """:func:`check_number` for an integer."""
    check_number(name, value, integer=True, **limits)


def check_float(name: str, value: Any, **limits: Any) -> None:
    """:func:`check_number` for a real number."""
    check_number(name, value, **limits)


def check_prompts(name: str, value: Any, *, optional: bool = False) -> Optional[list[str]]:
    """A string or a non-empty list of strings, as a list (None stays None when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise RequestError(name, f"must be a string or a non-empty list of strings, got {value!r} ({_kind(value)})")


def check_guidance_interval(value: Any, name: str = "guidance_interval") -> tuple[float, float]:
    """``(lo, hi)``: two numbers with ``0 <= lo <= hi <= 1``, fractions of the training timesteps."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise RequestError(name, f"must be two numbers (lo, hi) with 0 <= lo <= hi <= 1, got {value!r} "
                                 f"({_kind(value)})")
    for label, item in zip(("lo", "hi"), value):
        check_float(f"{name} {label}", item, minimum=0.0, maximum=1.0)
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise RequestError(name, f"lo must not exceed hi, got ({lo}, {hi})")
    return lo, hi


def check_arguments(
    *, steps: Any, guidance_scale: Any, guidance_rescale: Any, height: Any, width: Any, seed: Any, strength: Any,
    num_images: Any, eta: Any, clip_skip: Any,
) -> None:
    """Types and ranges of a call's scalar arguments (the names are the API's)."""
    check_int("num_inference_steps", steps, minimum=1)
    check_int("num_images_per_prompt", num_images, minimum=1)
    check_float("guidance_scale", guidance_scale, minimum=0.0,
                hint=" (values up to 1 turn guidance off; a negative scale is not a stronger 'off')")
    check_float("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
    check_float("strength", strength, minimum=0.0, maximum=1.0)
    check_float("eta", eta, minimum=0.0, optional=True)
    check_int("clip_skip", clip_skip, minimum=0, optional=True)
    check_int("seed", seed, minimum=0, maximum=MAX_SEED, optional=True, hint="; omit it for a random seed")
    for label, value in (("height", height), ("width", width)):
        check_int(label, value, minimum=1, optional=True, hint=" (omit it for the model's native size)")


def physical_memory() -> Optional[int]:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def activation_bytes(height: int, width: int, rows: int, *, vae_factor: int, unet_channels: int,
                     vae_channels: int) -> int:
    """A lower bound on the peak activation memory of one call, in bytes (float32).

    The largest tensors live at full resolution: the UNet's first block holds a few ``(rows, channels, h/f,
    w/f)`` maps at once (input, the resnet's hidden state, the skip), and the VAE decoder's last block a few
    ``(images, channels, h, w)`` maps. Weights and attention scratch come on top, so real use is higher.
    """
    latent_area = (height // vae_factor) * (width // vae_factor)
    unet = 4 * rows * unet_channels * latent_area * 4
    vae = 3 * max(1, rows // 2) * vae_channels * height * width * 4
    return max(unet, vae)


def check_size(height: int, width: int, *, native: int, vae_factor: int, rows: int, unet_channels: int,
               vae_channels: int, memory: Optional[int] = None) -> None:
    """Refuse a size whose activations alone exceed this machine's RAM; warn when it is far from ``native``."""
    need = activation_bytes(height, width, rows, vae_factor=vae_factor, unet_channels=unet_channels,
                            vae_channels=vae_channels)
    memory = physical_memory() if memory is None else memory
    gib = 2**30
    if memory is not None and need > memory:
        raise RequestError(
            "height x width", f"{height}x{width} needs at least {need / gib:.1f} GiB for activations alone, more than "
            f"this machine's {memory / gib:.1f} GiB; this model's native size is {native}x{native}"
        )
    ratio = (height * width) / float(native * native)
    if ratio > FAR_FROM_NATIVE:
        # Self-attention over the latent grid grows with the square of its area.
        warnings.warn(
            f"{height}x{width} is {ratio:.3g}x the area of this model's native {native}x{native}: expect roughly "
            f"{ratio * ratio:.3g}x the time per step, at least {need / gib:.2f} GiB of activations, and images the "
            "model was not trained for",
            DiffsteerWarning, stacklevel=4,
        )
    elif ratio < 1 / FAR_FROM_NATIVE:
        warnings.warn(
            f"{height}x{width} is {ratio:.3g}x the area of this model's native {native}x{native}: expect images the "
            "model was not trained for",
            DiffsteerWarning, stacklevel=4,
        )
