"""Conversions between user images (PIL, numpy, tensors) and the model's ``[-1, 1]`` tensors."""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import InputFileError, RequestError

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Image.Image], str, "os.PathLike[str]"]


def open_image(path: Union[str, "os.PathLike[str]"]) -> Image.Image:
    """An image file as RGB, read whole (the file is closed); unreadable files raise :class:`InputFileError`."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputFileError(str(path), f"cannot read the image ({exc})") from None


def to_model_tensor(image: ImageInput, *, multiple: int = 8) -> torch.Tensor:
    """Turn an image or batch into ``(batch, 3, H, W)`` float32 in ``[-1, 1]``.

    PIL images are resized down to a multiple of ``multiple`` (Lanczos, as diffusers does); numpy
    arrays are ``HWC``/``NHWC`` in ``[0, 1]``; tensors are ``CHW``/``NCHW`` in ``[-1, 1]`` (or 4-channel
    latents, which pass through unchanged); a path is read as a PIL image.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, Image.Image) for i in image):
            raise RequestError("image", "lists must hold PIL images")
        arrays = []
        for im in image:
            w, h = (d - d % multiple for d in im.size)
            if (w, h) != im.size:
                im = im.resize((w, h), resample=Image.LANCZOS)
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        image = np.stack(arrays)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise RequestError(
                "image", f"as a numpy array must be HWC or NHWC with 1 or 3 channels, got shape {image.shape}"
            )
        if arr.max(initial=0.0) > 1.0 + 1e-6:
            raise RequestError("image", "as a numpy array must hold values in [0, 1]; divide uint8 images by 255")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4:
            raise RequestError("image", f"as a tensor must be CHW or NCHW, got shape {tuple(image.shape)}")
        return t.float()
    raise RequestError("image", f"must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}")


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """Map decoded ``[-1, 1]`` images to ``pt`` (``[0, 1]`` NCHW), ``np`` (NHWC float) or ``pil``."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    arr = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]
    raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
