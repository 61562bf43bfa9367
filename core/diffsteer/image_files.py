"""Image files that carry a generation's parameters: PNG (a text chunk), JPEG and WebP (EXIF ImageDescription).

The format is the one the file's suffix names; files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DiffsteerError

METADATA_KEY = "diffsteer"
#: suffix -> (PIL format, save options)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"lossless": True}),
}
_EXIF_DESCRIPTION = 0x010E
_EXIF_PREFIX = METADATA_KEY + ":"


class OutputPathError(DiffsteerError, ValueError):
    """An output path names a folder, a missing folder or a format that cannot be written."""


def check_output_path(path: Path, option: str = "-o") -> None:
    """Refuse, before any work, an output that cannot be written: a folder, a missing parent, an unknown suffix."""
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; name an image file inside it, e.g. {path / 'out.png'}")
    if path.suffix.lower() not in FORMATS:
        raise OutputPathError(
            f"{option} {path}: cannot write {path.suffix or 'a file without a suffix'}; "
            f"use one of {', '.join(FORMATS)}"
        )
    if not path.parent.is_dir():
        raise OutputPathError(f"{option} {path}: folder {path.parent} does not exist")


def save_image(image: Any, path: Path, parameters: dict[str, Any]) -> None:
    """Write ``image`` in the format ``path``'s suffix names, with ``parameters`` as standard JSON inside."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .atomic import atomic_file

    fmt, options = FORMATS[path.suffix.lower()]
    text = json.dumps(parameters, sort_keys=True, allow_nan=False)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text(METADATA_KEY, text)
        options = {**options, "pnginfo": info}
    else:
        exif = Image.Exif()
        exif[_EXIF_DESCRIPTION] = _EXIF_PREFIX + text  # json.dumps escapes non-ASCII: EXIF text is ASCII
        options = {**options, "exif": exif.tobytes()}
    with atomic_file(path) as tmp:
        image.save(tmp, format=fmt, **options)


def read_image_parameters(path: Path, option: str = "--from") -> dict[str, Any]:
    """The parameters an image written by :func:`save_image` carries."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get(METADATA_KEY)
            if text is None:
                description = im.getexif().get(_EXIF_DESCRIPTION)
                if isinstance(description, str) and description.startswith(_EXIF_PREFIX):
                    text = description[len(_EXIF_PREFIX):]
    except (OSError, ValueError) as exc:
        raise DiffsteerError(f"{option} {path}: cannot read the image ({exc})") from None
    if not text:
        raise DiffsteerError(f"{option} {path}: the image has no diffsteer parameters")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DiffsteerError(f"{option} {path}: its diffsteer parameters are not valid JSON ({exc})") from None
    if not isinstance(params, dict) or "prompt" not in params:
        raise DiffsteerError(f"{option} {path}: its diffsteer parameters hold no prompt")
    return params
