"""Automatic checks of generated shapes-world images: background, colours, objects, shapes, positions, captions.

Every function takes a PIL image or an HxWx3 numpy array (uint8, or float in [0, 1]) of any resolution.
Coordinates are pixels with (0, 0) the top-left corner; a pixel (i, j) spans [j, j+1) x [i, i+1).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .vocab import COLOURS, SHAPES, ObjectSpec, parse_caption
from .world import SIZE_THRESHOLD, shape_coverage, shape_polygon

ImageLike = Image.Image | np.ndarray

#: Hue (degrees) of each classified colour; a chromatic pixel takes the nearest one.
HUE_CENTRES: dict[str, float] = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}
OBJECT_THRESHOLD = 0.25  # a pixel is "object" when some channel differs from the background by this (of 255)
CHROMA_MIN = 0.2  # below this chroma (max - min channel, of 255) a pixel has no reliable hue
MIN_AREA_FRACTION = 0.004  # smaller components are noise (16 px at 64x64; the smallest object is ~72 px)


@dataclass(frozen=True)
class DetectedObject:
    """A connected region of one colour.

    ``centroid`` (x, y) and ``area`` are coverage-weighted (sub-pixel; area in pixels), ``bbox`` is (x0, y0, x1, y1)
    with exclusive ends, ``size`` is the half-side of the shape's bounding box estimated from area and shape (the
    same quantity as ``ShapeObject.size`` times the image width).
    """

    colour: str
    shape: str
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: float
    size: float


def to_array(img: ImageLike) -> np.ndarray:
    """Image -> float64 HxWx3 array in [0, 255]."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float64)
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image array, got shape {img.shape}")
        arr = img[..., :3]
        if arr.dtype == np.uint8:
            return arr.astype(np.float64)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ValueError("image array contains NaN or inf")
            return np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
        raise TypeError(f"expected a uint8 or float image array, got dtype {arr.dtype}")
    raise TypeError(f"expected a PIL image or numpy array, got {type(img).__name__}")


def _border(arr: np.ndarray, width: int = 2) -> np.ndarray:
    sides = (arr[:width], arr[-width:], arr[:, :width], arr[:, -width:])
    return np.concatenate([side.reshape(-1, 3) for side in sides])


def _background_rgb(arr: np.ndarray) -> np.ndarray:
    return np.median(_border(arr), axis=0)


def background_rgb(img: ImageLike) -> np.ndarray:
    """Estimated background colour (0-255): per-channel median of the 2-pixel border (robust to objects touching it)."""
    return _background_rgb(to_array(img))


def background_colour(img: ImageLike) -> str:
    """``"white"`` or ``"black"``, from the border's median luminance."""
    r, g, b = background_rgb(img)
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b > 127.5 else "black"


def _object_mask(arr: np.ndarray, bg: np.ndarray, threshold: float) -> np.ndarray:
    return np.abs(arr - bg).max(axis=-1) > threshold * 255.0


def object_mask(img: ImageLike, threshold: float = OBJECT_THRESHOLD) -> np.ndarray:
    """Boolean HxW mask of pixels far from the background colour."""
    arr = to_array(img)
    return _object_mask(arr, _background_rgb(arr), threshold)


def hue_classes(img: ImageLike) -> np.ndarray:
    """Per-pixel index into :data:`COLOURS` by nearest hue, or -1 where the pixel is too grey to have a hue."""
    return _hue_classes(to_array(img))


def _hue_classes(arr: np.ndarray) -> np.ndarray:
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    mx, mn = arr.max(axis=-1), arr.min(axis=-1)
    chroma = mx - mn
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    centres = np.array([HUE_CENTRES[name] for name in COLOURS])
    diff = np.abs(hue[..., None] - centres)
    cls = np.minimum(diff, 360.0 - diff).argmin(axis=-1)
    return np.where(chroma >= CHROMA_MIN * 255.0, cls, -1)


def colour_areas(img: ImageLike, threshold: float = OBJECT_THRESHOLD) -> dict[str, int]:
    """Number of object pixels of each colour."""
    arr = to_array(img)
    cls = _hue_classes(arr)[_object_mask(arr, _background_rgb(arr), threshold)]
    return {name: int((cls == k).sum()) for k, name in enumerate(COLOURS)}


def dominant_colours(img: ImageLike, min_fraction: float = 0.1) -> list[str]:
    """Colours making up at least ``min_fraction`` of the coloured object pixels, most pixels first."""
    areas = colour_areas(img)
    total = sum(areas.values())
    if total == 0:
        return []
    ranked = sorted(areas, key=lambda k: -areas[k])
    return [c for c in ranked if areas[c] >= min_fraction * total]


def dominant_colour(img: ImageLike) -> str | None:
    """The colour with most object pixels, or None when there are no coloured object pixels."""
    colours = dominant_colours(img, min_fraction=0.0)
    return colours[0] if colours else None


def centroid(img: ImageLike) -> tuple[float, float] | None:
    """(x, y) mean of all object pixels (pixel centres), or None without object pixels."""
    ys, xs = np.nonzero(object_mask(img))
    return (float(xs.mean() + 0.5), float(ys.mean() + 0.5)) if len(xs) else None


def bbox(img: ImageLike) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of all object pixels, or None without object pixels."""
    ys, xs = np.nonzero(object_mask(img))
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


# --- connected components ---------------------------------------------------------------------------------------------


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels HxW with -1 outside the mask, number of components).

    Vectorised union-find: each round hooks the larger root of every edge whose ends disagree onto the smaller one,
    then flattens the trees by pointer jumping; a handful of rounds suffices for compact blobs.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    edges = []
    for a, b in (
        (idx[:, :-1], idx[:, 1:]),  # right
        (idx[:-1, :], idx[1:, :]),  # down
        (idx[:-1, :-1], idx[1:, 1:]),  # down-right
        (idx[:-1, 1:], idx[1:, :-1]),  # down-left
    ):
        keep = mask.ravel()[a.ravel()] & mask.ravel()[b.ravel()]
        edges.append((a.ravel()[keep], b.ravel()[keep]))
    ea = np.concatenate([e[0] for e in edges])
    eb = np.concatenate([e[1] for e in edges])
    parent = np.arange(h * w)
    while True:
        la, lb = parent[ea], parent[eb]
        differ = la != lb
        if not differ.any():
            break
        # parent[i] is always a root here, so hooking roots keeps every tree inside one component
        np.minimum.at(parent, np.maximum(la, lb)[differ], np.minimum(la, lb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots = parent[mask.ravel()]
    uniq, inverse = np.unique(roots, return_inverse=True)
    labels = np.full(h * w, -1)
    labels[mask.ravel()] = inverse
    return labels.reshape(h, w), len(uniq)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        out = m
    return out


def full_colour(arr: np.ndarray, bg: np.ndarray, region: np.ndarray) -> np.ndarray:
    """RGB (0-255) of the object in ``region`` where it covers whole pixels: the mean of its pixels farthest from
    the background (its interior, free of anti-aliasing)."""
    dist = np.abs(arr[region] - bg).max(axis=-1)
    return arr[region][dist >= 0.8 * dist.max()].mean(axis=0)


def region_coverage(arr: np.ndarray, bg: np.ndarray, region: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Sub-pixel coverage (HxW in [0, 1]) of the object in ``region`` of an HxWx3 [0, 255] image on background ``bg``.

    It is the pixels' share along the object's :func:`full_colour`, on the region grown by 2 px to catch faint
    anti-aliased edges but never on ``others`` (other objects' pixels), so anti-aliasing and blur do not bias area,
    centroid or shape.
    """
    full = full_colour(arr, bg, region) - bg
    support = _dilate(region, 2) & ~(others & ~region)
    return np.clip(((arr - bg) @ full) / max(float(full @ full), 1e-6), 0.0, 1.0) * support


def coverage_centroid(alpha: np.ndarray) -> tuple[float, float]:
    """(x, y) area centroid of an HxW coverage map, in pixels (pixel centres at +0.5)."""
    h, w = alpha.shape
    area = float(alpha.sum())
    return (
        float((alpha.sum(axis=0) * (np.arange(w) + 0.5)).sum() / area),
        float((alpha.sum(axis=1) * (np.arange(h) + 0.5)).sum() / area),
    )


# --- shape classification ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _unit_geometry(shape: str) -> tuple[float, float]:
    """(area, centroid y offset) of a shape with half-side 1 centred at its box centre."""
    poly = shape_polygon(shape, 0.0, 0.0, 1.0)
    if poly is None:
        return math.pi, 0.0
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), float(((y + yn) * cross).sum() / (6 * area))


#: Blur levels (as fractions of the shape's half-side) the templates are also compared at: generated images are soft,
#: and a blurred square must still match "square" better than "circle".
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.15, 0.3)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT (the crop has a zero margin, so wrap-around is harmless)."""
    if sigma <= 0:
        return a
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.rfftfreq(a.shape[1])[None, :]
    gain = np.exp(-2.0 * math.pi**2 * sigma**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(a) * gain, s=a.shape)


def shape_scores(mask: np.ndarray, candidates: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """Mismatch (L1 / area, 0 = perfect) between a mask and each candidate shape of the same area and centroid.

    ``mask`` is HxW, boolean or float coverage in [0, 1] (coverage is more accurate). Each candidate is placed
    axis-aligned / upright, sized to the mask's area and centred on its centroid, so only the *form* is compared: a
    rounded square is nearer the square than the circle until its corner radius passes ~65% of its half-side.
    Each template is also tried blurred (:data:`TEMPLATE_BLURS`) and its best match counts.
    """
    a = np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)
    if a.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {a.shape}")
    area = a.sum()
    if area <= 0:
        raise ValueError("empty mask: no shape to classify")
    # Work on a crop around the mask with room for every template and its blur.
    ys, xs = np.nonzero(a)
    pad = int(math.ceil(math.sqrt(area))) + 2
    a = np.pad(a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], pad)
    h, w = a.shape
    cx, cy = coverage_centroid(a)
    scores: dict[str, float] = {}
    for shape in candidates:
        unit_area, y_offset = _unit_geometry(shape)
        r = math.sqrt(area / unit_area)
        ss = 4 if r < 16 else 2 if r < 64 else 1  # big shapes need fewer subsamples for the same accuracy
        template = shape_coverage(shape, cx, cy - y_offset * r, r, h, w, ss=ss)
        scores[shape] = min(float(np.abs(a - _blur(template, b * r)).sum() / area) for b in TEMPLATE_BLURS)
    return scores


def shape_class(mask: np.ndarray, candidates: tuple[str, ...] = SHAPES) -> str:
    """``"circle"``, ``"square"`` or ``"triangle"`` (or another candidate): the best-matching form for a mask."""
    scores = shape_scores(mask, candidates)
    return min(scores, key=scores.__getitem__)


# --- objects ----------------------------------------------------------------------------------------------------------


def objects(
    img: ImageLike, min_area: float | None = None, shapes: tuple[str, ...] = SHAPES
) -> list[DetectedObject]:
    """Objects as connected regions of one colour, largest first; regions under ``min_area`` pixels are dropped.

    ``shapes`` are the forms an object is classified among; adding distractors that the world never draws by
    default (``SHAPES + EXTRA_SHAPES``) makes the check strict: a diamond-like "circle" then counts as a diamond.

    Each region's coverage (sub-pixel alpha against the background, along the region's own colour) is what the
    shape, centroid, area and size are measured on, so anti-aliasing and blur do not bias them.
    """
    arr = to_array(img)
    h, w, _ = arr.shape
    min_area = MIN_AREA_FRACTION * h * w if min_area is None else min_area
    bg = _background_rgb(arr)
    mask = _object_mask(arr, bg, OBJECT_THRESHOLD)
    cls = _hue_classes(arr)
    regions: list[tuple[str, np.ndarray]] = []
    for k, name in enumerate(COLOURS):
        labels, n = connected_components(mask & (cls == k))
        if n == 0:
            continue
        counts = np.bincount(labels[labels >= 0], minlength=n)
        regions += [(name, labels == i) for i in np.nonzero(counts >= min_area)[0]]
    taken = np.zeros((h, w), dtype=bool)
    for _, region in regions:
        taken |= region
    found: list[DetectedObject] = []
    for name, region in regions:
        alpha = region_coverage(arr, bg, region, taken)
        area = float(alpha.sum())
        shape = shape_class(alpha, shapes)
        ys, xs = np.nonzero(region)
        cx, cy = coverage_centroid(alpha)
        size = math.sqrt(area / _unit_geometry(shape)[0])
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        found.append(DetectedObject(name, shape, (cx, cy), box, area, size))
    return sorted(found, key=lambda o: -o.area)


def object_count(img: ImageLike) -> int:
    """Number of detected objects."""
    return len(objects(img))


def mask_iou(img: ImageLike, mask: ImageLike | np.ndarray) -> float:
    """Intersection over union of the image's object pixels and a reference mask (e.g. ``render_mask(scene)``).

    Measures whether a spatially conditioned generation (ControlNet, T2I-Adapter, depth) put objects where the
    control image says. ``mask`` is an "L" image or HxW array, "on" above half its range.
    """
    ref = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask, dtype=np.float64)
    if ref.max(initial=0.0) > 1.0:  # 0-255 values
        ref = ref / 255.0
    # Half coverage in both: a saturated colour differs from white or black by 255 in some channel. Slightly under
    # 0.5 so the many exactly-half edge pixels (rounded up in one image, down in the other) count in both.
    ref_on = ref > 0.49
    got = object_mask(img, threshold=0.49)
    if got.shape != ref_on.shape:
        raise ValueError(f"image is {got.shape} but mask is {ref_on.shape}")
    union = (got | ref_on).sum()
    return float((got & ref_on).sum() / union) if union else 1.0


# --- captions ---------------------------------------------------------------------------------------------------------

CRITERIA: tuple[str, ...] = ("background", "count", "colour", "both_colours", "shape", "binding", "position", "size")


def in_named_half(point: tuple[float, float], position: str, width: int, height: int) -> bool:
    """Whether (x, y) lies in the half of a ``width`` x ``height`` image that a position word names."""
    x, y = point
    return {"left": x < width / 2, "right": x > width / 2, "top": y < height / 2, "bottom": y > height / 2}[position]


def _position_ok(obj: DetectedObject, position: str, width: int, height: int) -> bool:
    return in_named_half(obj.centroid, position, width, height)


def _size_ok(obj: DetectedObject, size: str, width: int) -> bool:
    return obj.size < SIZE_THRESHOLD * width if size == "small" else obj.size > SIZE_THRESHOLD * width


def _multiset_ok(wanted: list[str], have: list[str]) -> bool:
    return not (Counter(wanted) - Counter(have))


def evaluate_caption(img: ImageLike, caption: str, shapes: tuple[str, ...] = SHAPES) -> dict[str, bool | None]:
    """Check an image against a shapes-world caption, one boolean per criterion (None where the caption is silent).

    - ``background``: the named background colour;
    - ``count``: as many objects as the caption names;
    - ``colour``: one object, its dominant colour; two objects, every named colour present (as a multiset);
    - ``both_colours``: two objects with two named colours, both present (what attend-and-excite fixes);
    - ``shape``: every named shape present;
    - ``binding``: each named (colour, shape) pair is one object, e.g. the red thing is the circle;
    - ``position`` / ``size``: the object matched to each phrase is in the named half / on the named side of the
      small-large threshold;
    - ``all``: every applicable criterion holds.

    ``shapes`` are the forms each object is classified among (see :func:`objects`).
    Caption phrases are matched to detected objects by the assignment agreeing best (colour first, then shape,
    position, size).
    """
    h, w, _ = to_array(img).shape
    spec = parse_caption(caption)
    found = objects(img, shapes=shapes)
    wanted = spec.objects
    result: dict[str, bool | None] = dict.fromkeys(CRITERIA)
    if spec.background:
        result["background"] = background_colour(img) == spec.background
    if wanted:
        result["count"] = len(found) == len(wanted)

    def score(o: ObjectSpec, d: DetectedObject | None) -> int:
        if d is None:
            return 0
        return (
            8 * (o.colour in (None, d.colour))
            + 4 * (o.shape in (None, d.shape))
            + 2 * (o.position is None or _position_ok(d, o.position, w, h))
            + (o.size is None or _size_ok(d, o.size, w))
        )

    pool: list[DetectedObject | None] = [*found[:5], *[None] * len(wanted)]
    best: tuple[DetectedObject | None, ...] = (None,) * len(wanted)
    best_score = -1
    for perm in itertools.permutations(range(len(pool)), len(wanted)):
        total = sum(score(o, pool[i]) for o, i in zip(wanted, perm))
        if total > best_score:  # strict: ties keep the earlier (larger) objects
            best_score, best = total, tuple(pool[i] for i in perm)

    colours = [o.colour for o in wanted if o.colour]
    if colours:
        if len(wanted) == 1:
            result["colour"] = dominant_colour(img) == colours[0]
        else:
            result["colour"] = _multiset_ok(colours, [d.colour for d in found])
        if len(wanted) == 2 and len(colours) == 2:
            result["both_colours"] = _multiset_ok(colours, [d.colour for d in found])
    shapes = [o.shape for o in wanted if o.shape]
    if shapes:
        result["shape"] = _multiset_ok(shapes, [d.shape for d in found])
    pairs = [(o, d) for o, d in zip(wanted, best) if o.colour and o.shape]
    if pairs:
        result["binding"] = all(d is not None and (d.colour, d.shape) == (o.colour, o.shape) for o, d in pairs)
    placed = [(o, d) for o, d in zip(wanted, best) if o.position]
    if placed:
        result["position"] = all(d is not None and _position_ok(d, o.position, w, h) for o, d in placed)
    sized = [(o, d) for o, d in zip(wanted, best) if o.size]
    if sized:
        result["size"] = all(d is not None and _size_ok(d, o.size, w) for o, d in sized)
    checked = [v for v in result.values() if v is not None]
    result["all"] = bool(checked) and all(checked)
    return result

