"""The strict evaluator: an image is *clean* only when it shows exactly what its caption asks, as a person would judge.

An image is clean when every criterion holds:

- ``count``: as many objects as the caption names, an object being a connected foreground blob (8-connected, of any
  mix of colours, so two touching objects are one blob) of at least :data:`MIN_BLOB_PIXELS` pixels at 64x64;
- ``stray``: fewer than :data:`MAX_STRAY_PIXELS` foreground pixels (at 64x64) outside those blobs;
- ``colour``: each object's pixels are at least :data:`MIN_COLOUR_FRACTION` its named colour (any one colour when
  the caption names none, as in "a circle");
- ``shape``: each object's best-fitting ideal shape is the named one with IoU at least :data:`MIN_IOU` (any shape when
  none is named). The ideal shapes are the renderer's own disc, square and triangle (:func:`..world.shape_coverage`
  geometry) of the blob's area, centred on its area centroid, at their best rotation; a square that fits best nearer
  45 degrees than upright is a "diamond", the renderer's diamond being exactly that square;
- ``position``, ``size``: as :func:`..evaluate.evaluate_caption` checks them (centroid in the named half; size on
  the named side of the small/large threshold), on the object matched to each phrase;
- ``background``: the named background, as :func:`..evaluate.background_colour` reads it.

Two more criteria catch blemishes a person sees but the issue's definition lets through; an image passing them too
is *flawless*:

- ``plain``: the background is pure white or black, without a faint frame, panel or tint: fewer than
  :data:`MAX_FAINT_PIXELS` pixels (at 64x64) more than :data:`FAINT_LEVEL` off it, 2 px or more away from any
  foreground;
- ``solid``: no object holds a spot of :data:`MIN_SPOT_PIXELS` or more inside its edge of another colour, or more
  than :data:`SPOT_LEVEL` off its own (a whitish-cyan dot in a blue square; not a darker shade of it).

VAE round trips of the renderer's scenes pass all of them (tests/test_shapes_strict.py shows the margins).
:func:`evaluate_strict` returns these as booleans (None where the caption is silent) plus ``clean`` and
``flawless``; semantic tests use ``clean`` as their default check. :func:`strict_verdict` also returns the blobs it
measured, for diagnosis.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import DiffsteerError
from .evaluate import (
    HUE_CENTRES,
    OBJECT_THRESHOLD,
    ImageLike,
    _background_rgb,
    _dilate,
    _hue_classes,
    _object_mask,
    _unit_geometry,
    background_colour,
    connected_components,
    coverage_centroid,
    full_colour,
    in_named_half,
    region_coverage,
    to_array,
)
from .vocab import BACKGROUND_RGB, COLOURS, ObjectSpec, parse_caption
from .world import SIZE_THRESHOLD, _signed_distance

MIN_BLOB_PIXELS = 12  # at 64x64 (scaled with the image area): the smallest object the world draws is ~110 px
MAX_STRAY_PIXELS = 10  # stray foreground pixels outside the blobs must be fewer than this (at 64x64, scaled)
MIN_COLOUR_FRACTION = 0.8
MIN_IOU = 0.75
#: Forms fitted to every blob. The diamond is not fitted separately: it is the square at 45 degrees.
FIT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Shapes a caption may name for the strict check.
STRICT_SHAPES: tuple[str, ...] = (*FIT_SHAPES, "diamond")
FAINT_LEVEL = 24  # of 255: a background pixel this far off the background colour is a visible mark
MAX_FAINT_PIXELS = 20  # at 64x64: VAE round trips of clean renders leave at most ~5 such pixels
MIN_SPOT_PIXELS = 4  # at 64x64: a connected clump this large inside an object, off its colour, is a spot
SPOT_LEVEL = 128  # of 255: a pixel this far from its object's colour in some channel is off it (VAE: < 2 such px)
#: The issue's criteria: all must hold for an image to be clean.
STRICT_CRITERIA: tuple[str, ...] = ("count", "stray", "colour", "shape", "position", "size", "background")
#: Blemishes: a clean image passing these too is flawless.
BLEMISH_CRITERIA: tuple[str, ...] = ("plain", "solid")

# Rotations that map a form onto itself: the search covers one period only.
_PERIOD = {"circle": 0.0, "square": 90.0, "triangle": 360.0}
_COARSE_STEP, _FINE_STEP = 10.0, 2.5


class StrictEvaluationError(DiffsteerError, ValueError):
    """Input the strict evaluator cannot judge: a colour or shape outside its world, or mismatched images and captions."""


@dataclass(frozen=True)
class ShapeFit:
    """The best placement of one ideal form on a blob: soft IoU and rotation (degrees, clockwise on screen)."""

    shape: str
    iou: float
    angle: float


@dataclass(frozen=True)
class Blob:
    """One connected foreground blob, measured on its sub-pixel coverage.

    ``pixels`` counts its foreground pixels, ``area`` (pixels) and ``centroid`` (x, y) are coverage-weighted,
    ``colour_fractions`` is the share of its pixels of each colour, ``fits`` the best fit of each ideal form, ``spot``
    the largest connected clump of pixels inside its edge that are not its majority colour.
    """

    pixels: int
    area: float
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    colour_fractions: dict[str, float]
    fits: dict[str, ShapeFit]
    spot: int = 0

    @property
    def colour(self) -> str | None:
        """The colour most of its pixels have (None when none has a hue)."""
        best = max(self.colour_fractions, key=self.colour_fractions.__getitem__)
        return best if self.colour_fractions[best] > 0 else None

    @property
    def best_fit(self) -> ShapeFit:
        return max(self.fits.values(), key=lambda f: f.iou)

    @property
    def shape(self) -> str:
        """The best-fitting form; a square fitting best nearer 45 degrees than upright is a diamond."""
        fit = self.best_fit
        if fit.shape == "square" and 22.5 < fit.angle % 90.0 < 67.5:
            return "diamond"
        return fit.shape

    @property
    def iou(self) -> float:
        return self.best_fit.iou

    @property
    def margin(self) -> float:
        """How much better the best form fits than the next: near 0 the blob is between two forms (a squircle)."""
        first, second = sorted((f.iou for f in self.fits.values()), reverse=True)[:2]
        return first - second

    @property
    def size(self) -> float:
        """Half-side of the best-fitting form's bounding box, pixels (as ``DetectedObject.size``)."""
        return math.sqrt(self.area / _unit_geometry(self.best_fit.shape)[0])


@dataclass(frozen=True)
class StrictVerdict:
    """Per-criterion results (None where the caption is silent), the blobs, stray pixels, and which blob (index into
    ``blobs``, None for a missing object) each caption object was matched to."""

    criteria: dict[str, bool | None]
    blobs: tuple[Blob, ...]
    stray_pixels: int
    matched: tuple[int | None, ...] = field(default=())
    faint_pixels: int = 0

    @property
    def clean(self) -> bool:
        """Every criterion of :data:`STRICT_CRITERIA` holds (or does not apply)."""
        return all(self.criteria[k] is not False for k in STRICT_CRITERIA)

    @property
    def flawless(self) -> bool:
        """Clean, and no blemish (:data:`BLEMISH_CRITERIA`)."""
        return self.clean and all(self.criteria[k] is not False for k in BLEMISH_CRITERIA)

    def as_dict(self) -> dict[str, bool | None]:
        return {**self.criteria, "clean": self.clean, "flawless": self.flawless}


# --- ideal shapes -----------------------------------------------------------------------------------------------------


def ideal_coverage(
    shape: str, cx: float, cy: float, area: float, angle: float, height: int, width: int, *, ss: int = 4
) -> np.ndarray:
    """Per-pixel coverage of the renderer's ``shape`` with the given area (pixels), its area centroid at (cx, cy),
    rotated by ``angle`` degrees about that centroid; ``ss`` x ``ss`` samples per pixel as the renderer takes.

    Sample points are turned back into the shape's upright frame and tested with the renderer's own distance
    function, so at angle 0 this is exactly what the renderer draws.
    """
    unit_area, y_offset = _unit_geometry(shape)
    r = math.sqrt(area / unit_area)
    offsets = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(width)[:, None] + offsets[None, :]).ravel()[None, :] - cx
    ys = (np.arange(height)[:, None] + offsets[None, :]).ravel()[:, None] - cy
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    u, v = cx + c * xs + s * ys, cy - s * xs + c * ys
    inside = _signed_distance(shape, u, v, cx, cy - y_offset * r, r) <= 0
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else 0.0


def fit_shape(alpha: np.ndarray, shape: str) -> ShapeFit:
    """Best rotation of the ideal ``shape`` (same area and centroid as ``alpha``, an HxW coverage map) and its IoU."""
    area = float(alpha.sum())
    h, w = alpha.shape
    cx, cy = coverage_centroid(alpha)
    # A window around the centroid holding the shape at any rotation (a triangle's apex is 4/3 r away), zero-padded
    # where it leaves the image so a cut-off object is not flattered.
    reach = int(math.ceil(1.5 * math.sqrt(area / _unit_geometry(shape)[0]))) + 2
    x0, y0 = int(math.floor(cx)) - reach, int(math.floor(cy)) - reach
    size = 2 * reach + 1
    crop = np.zeros((size, size))
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = alpha[sy0:sy1, sx0:sx1]
    ccx, ccy = cx - x0, cy - y0

    def iou(angle: float, ss: int) -> float:
        return _soft_iou(crop, ideal_coverage(shape, ccx, ccy, area, angle, size, size, ss=ss))

    period = _PERIOD[shape]
    if period == 0:
        return ShapeFit(shape, iou(0.0, 4), 0.0)
    coarse = np.arange(0.0, period, _COARSE_STEP)
    best = float(coarse[int(np.argmax([iou(a, 2) for a in coarse]))])
    fine = best + np.arange(-_COARSE_STEP + _FINE_STEP, _COARSE_STEP, _FINE_STEP)  # 45 degrees lies on it
    scores = [iou(a, 4) for a in fine]
    k = int(np.argmax(scores))
    return ShapeFit(shape, scores[k], float(fine[k] % period))


# --- blobs ------------------------------------------------------------------------------------------------------------


def find_blobs(img: ImageLike) -> tuple[list[Blob], int]:
    """The image's blobs, largest first, and the number of stray foreground pixels outside them."""
    arr = to_array(img)
    h, w, _ = arr.shape
    scale = h * w / (64 * 64)
    bg = _background_rgb(arr)
    mask = _object_mask(arr, bg, OBJECT_THRESHOLD)
    labels, n = connected_components(mask)
    counts = np.bincount(labels[labels >= 0], minlength=n)
    keep = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= MIN_BLOB_PIXELS * scale]
    stray = int(counts.sum() - counts[keep].sum()) if n else 0
    cls = _hue_classes(arr)
    blobs = []
    for i in keep:
        region = labels == i
        hues = cls[region]
        fractions = {name: float((hues == k).mean()) for k, name in enumerate(COLOURS)}
        # Inside the edge (anti-aliased edge pixels take mixed hues), a pixel of another hue, or more than half-way
        # from the object's own colour (a whitish dot in blue keeps a blue hue), belongs to a spot; shading does not.
        majority = int(np.argmax([fractions[c] for c in COLOURS]))
        unlike = (cls != majority) | (np.abs(arr - full_colour(arr, bg, region)).max(axis=-1) > SPOT_LEVEL)
        off = ~_dilate(~region, 1) & unlike
        off_labels, n_off = connected_components(off)
        spot = int(np.bincount(off_labels[off_labels >= 0]).max()) if n_off else 0
        alpha = region_coverage(arr, bg, region, mask)  # stray pixels are not the blob's either
        # The shape is the silhouette: a darker or lighter interior (shading, a dot) is the colour check's business,
        # so pixels inside the blob (not on its edge) count as fully covered; edges keep their sub-pixel coverage.
        alpha[~_dilate(~region, 1)] = 1.0
        ys, xs = np.nonzero(region)
        blobs.append(
            Blob(
                pixels=int(counts[i]),
                area=float(alpha.sum()),
                centroid=coverage_centroid(alpha),
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                colour_fractions=fractions,
                fits={s: fit_shape(alpha, s) for s in FIT_SHAPES},
                spot=spot,
            )
        )
    return blobs, stray


# --- verdict ----------------------------------------------------------------------------------------------------------


def _check_caption(caption: str) -> None:
    spec = parse_caption(caption)
    for o in spec.objects:
        if o.colour is not None and o.colour not in HUE_CENTRES:
            raise StrictEvaluationError(
                f"caption {caption!r}: the strict evaluator tells only the colours {', '.join(HUE_CENTRES)} apart, "
                f"not {o.colour!r}"
            )
        if o.shape is not None and o.shape not in STRICT_SHAPES:
            raise StrictEvaluationError(
                f"caption {caption!r}: the strict evaluator fits only the shapes {', '.join(STRICT_SHAPES)}, "
                f"not {o.shape!r}"
            )


def _object_checks(o: ObjectSpec, blob: Blob | None, width: int, height: int) -> dict[str, bool | None]:
    if blob is None:
        return {
            "colour": False,
            "shape": False,
            "position": False if o.position else None,
            "size": False if o.size else None,
        }
    fraction = blob.colour_fractions[o.colour] if o.colour else max(blob.colour_fractions.values())
    size_ok = None
    if o.size:
        size_ok = blob.size < SIZE_THRESHOLD * width if o.size == "small" else blob.size > SIZE_THRESHOLD * width
    return {
        "colour": fraction >= MIN_COLOUR_FRACTION,
        "shape": blob.iou >= MIN_IOU and o.shape in (None, blob.shape),
        "position": in_named_half(blob.centroid, o.position, width, height) if o.position else None,
        "size": size_ok,
    }


def faint_pixels(img: ImageLike) -> int:
    """Background pixels 2 px or more away from any foreground that are more than :data:`FAINT_LEVEL` off the
    background colour: a faint frame, panel or smudge (stronger ones are foreground)."""
    arr = to_array(img)
    bg = _background_rgb(arr)
    far = ~_dilate(_object_mask(arr, bg, OBJECT_THRESHOLD), 2)
    return int((far & (np.abs(arr - bg).max(axis=-1) > FAINT_LEVEL)).sum())


def _pure_background(img: ImageLike) -> bool:
    bg = _background_rgb(to_array(img))
    return any(np.abs(bg - np.asarray(rgb)).max() <= OBJECT_THRESHOLD * 255.0 for rgb in BACKGROUND_RGB.values())


def strict_verdict(img: ImageLike, caption: str) -> StrictVerdict:
    """Judge an image against a shapes-world caption strictly (module docstring); details for diagnosis.

    Caption objects are matched to blobs by the assignment passing most per-object checks (ties: larger blobs).
    """
    _check_caption(caption)
    spec = parse_caption(caption)
    h, w, _ = to_array(img).shape
    blobs, stray = find_blobs(img)
    wanted = spec.objects
    pool: list[int | None] = [*range(min(len(blobs), 5)), *[None] * len(wanted)]
    best: tuple[int | None, ...] = (None,) * len(wanted)
    best_checks = [_object_checks(o, None, w, h) for o in wanted]
    best_score = -1
    for perm in itertools.permutations(range(len(pool)), len(wanted)):
        picks = tuple(pool[i] for i in perm)
        checks = [_object_checks(o, None if b is None else blobs[b], w, h) for o, b in zip(wanted, picks)]
        score = sum(v is True for c in checks for v in c.values())
        if score > best_score:
            best_score, best, best_checks = score, picks, checks
    scale = h * w / (64 * 64)
    criteria: dict[str, bool | None] = dict.fromkeys(STRICT_CRITERIA + BLEMISH_CRITERIA)
    criteria["count"] = len(blobs) == len(wanted)
    criteria["stray"] = stray < MAX_STRAY_PIXELS * scale
    for key in ("colour", "shape", "position", "size"):
        values = [c[key] for c in best_checks if c[key] is not None]
        criteria[key] = all(values) if values else None
    if spec.background:
        criteria["background"] = background_colour(img) == spec.background
    faint = faint_pixels(img)
    criteria["plain"] = _pure_background(img) and faint < MAX_FAINT_PIXELS * scale
    criteria["solid"] = all(b.spot < MIN_SPOT_PIXELS * scale for b in blobs)
    return StrictVerdict(criteria, tuple(blobs), stray, best, faint)


def evaluate_strict(img: ImageLike, caption: str) -> dict[str, bool | None]:
    """Per-criterion booleans (:data:`STRICT_CRITERIA` and :data:`BLEMISH_CRITERIA`, None where the caption is
    silent), ``clean`` and ``flawless``."""
    return strict_verdict(img, caption).as_dict()


def clean_rate(images: list[ImageLike], captions: list[str] | str) -> float:
    """Fraction of images that are clean for their captions (one caption for all, or one each)."""
    if isinstance(captions, str):
        captions = [captions] * len(images)
    if len(captions) != len(images):
        raise StrictEvaluationError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise StrictEvaluationError("no images to judge")
    return sum(strict_verdict(im, c).clean for im, c in zip(images, captions)) / len(images)
