"""Procedural shapes world: seeded scenes of one or two shapes on a plain background, with captions.

Coordinates in :class:`ShapeObject` are resolution-free: ``cx, cy`` is the centre of the object's bounding box as a
fraction of the image width/height, ``size`` is half the bounding-box side as a fraction of the width (squares are
axis-aligned, triangles upright and isoceles with base = height, so every shape's bounding box is a square).
Rendering is analytic with 4x4 supersampling per pixel, so edges are anti-aliased and all render_* images agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .vocab import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    format_caption,
    parse_caption,
)

# Sizes are half bounding-box sides as a fraction of the image width (x64 gives pixels at 64x64).
MIN_SIZE = 6 / 64  # smaller objects fall under colour-presence thresholds
SMALL_MAX = 8.5 / 64  # "small" objects are in [MIN_SIZE, SMALL_MAX]
LARGE_MIN = 11.5 / 64  # "large" objects are in [LARGE_MIN, max]
SIZE_THRESHOLD = 10 / 64  # evaluators call an object small/large on either side of this
MAX_SIZE_SINGLE = 16 / 64
MAX_SIZE_PAIR = 13 / 64
EDGE_MARGIN = 1.5 / 64  # objects stay this far inside the image
PAIR_GAP = 4 / 64  # bounding boxes of two objects are this far apart: no overlap, and blur does not merge them
POSITION_LIMIT = 0.36  # an object "on the left" has its box centre at x <= 0.36 (its centroid < 0.5 for any shape)
DESCRIBE_POSITION = 0.4  # caption(scene) names a position when the centroid is this far into a half

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``cx, cy, size`` are fractions of the image side (see module docstring)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def centroid(self) -> tuple[float, float]:
        """Area centroid (x, y) as fractions; a triangle's lies a third of ``size`` below its box centre."""
        return self.cx, self.cy + (self.size / 3 if self.shape == "triangle" else 0.0)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions."""
        return self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size


@dataclass
class Scene:
    """Objects (in caption order), background name and caption."""

    objects: list[ShapeObject]
    background: str
    caption: str = ""


@dataclass(frozen=True)
class CaptionStyle:
    """Probabilities with which sampled captions mention each attribute (unmentioned ones are still random).

    Omitted colours teach the model that "a circle" may be any colour (needed by SEGA / TIME style tests); named
    positions and sizes are what layout and size techniques are measured on.
    """

    p_two: float = 0.4
    p_colour: float = 0.9
    p_shape: float = 0.95
    p_background: float = 0.6
    p_position: float = 0.3
    p_size: float = 0.2


# --- geometry ---------------------------------------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    """Vertices (E, 2) of a polygonal shape with box centre (cx, cy) and half-side r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        v = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        v = [(0.0, -r), (r, r), (-r, r)]
    elif shape == "diamond":
        v = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    elif shape == "hexagon":
        v = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "star":
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]  # alternating tips and inner corners
        v = [(q * math.sin(k * math.pi / 5), -q * math.cos(k * math.pi / 5)) for k, q in enumerate(radii)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(v, dtype=np.float64) + np.array([cx, cy])


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Signed distance from points to the shape boundary (negative inside), in the units of x and y."""
    poly = shape_polygon(shape, cx, cy, r)
    x, y = np.broadcast_arrays(x, y)
    if poly is None:
        return np.hypot(x - cx, y - cy) - r
    dist = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * ex + (y - y0) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(x - x0 - t * ex, y - y0 - t * ey))
        # even-odd crossing rule: works for the non-convex star too
        crosses = ((y0 > y) != (y1 > y)) & (x < x0 + (y - y0) * ex / (ey if ey != 0 else 1e-12))
        inside ^= crosses
    return np.where(inside, -dist, dist)


def shape_coverage(
    shape: str, cx: float, cy: float, r: float, height: int, width: int, *, band: float | None = None, ss: int = 4
) -> np.ndarray:
    """Per-pixel coverage in [0, 1] of a shape given in pixel units (pixel (i, j) spans [j, j+1) x [i, i+1)).

    With ``band`` it is the coverage of the outline band |distance to boundary| <= band / 2 instead of the interior.
    Only the shape's window is sampled, ``ss`` x ``ss`` points per pixel.
    """
    out = np.zeros((height, width), dtype=np.float64)
    pad = r + (band or 0.0) + 1.0
    x0, x1 = max(0, int(math.floor(cx - pad))), min(width, int(math.ceil(cx + pad)))
    y0, y1 = max(0, int(math.floor(cy - pad))), min(height, int(math.ceil(cy + pad)))
    if x0 >= x1 or y0 >= y1:
        return out
    offsets = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).ravel()
    d = _signed_distance(shape, xs[None, :], ys[:, None], cx, cy, r)
    hit = (np.abs(d) <= band / 2) if band is not None else (d <= 0)
    out[y0:y1, x0:x1] = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def _draw_order(scene: Scene) -> list[ShapeObject]:
    # Larger objects count as nearer (see render_depth), so they are drawn last and occlude smaller ones.
    return sorted(scene.objects, key=lambda o: o.size)


def _coverage(obj: ShapeObject, size: int, band: float | None = None) -> np.ndarray:
    return shape_coverage(
        obj.shape, obj.cx * size, obj.cy * size, obj.size * size, size, size, band=band, ss=_SUPERSAMPLE
    )


# --- rendering --------------------------------------------------------------------------------------------------------


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Anti-aliased RGB image of the scene."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUND_RGB[scene.background]
    for obj in _draw_order(scene):
        a = _coverage(obj, size)[..., None]
        img = img * (1.0 - a) + np.asarray(COLOUR_RGB[obj.colour], dtype=np.float64) * a
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB")


def render_outline(scene: Scene, size: int = 64, width: float = 1.5) -> Image.Image:
    """White object outlines (``width`` pixels at ``size``, centred on the boundary) on black, mode "L"."""
    out = np.zeros((size, size))
    for obj in scene.objects:
        out = np.maximum(out, _coverage(obj, size, band=width * size / 64))
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "L")


def render_mask(scene: Scene, size: int = 64, index: int | None = None) -> Image.Image:
    """White object silhouettes on black, mode "L"; ``index`` selects one object (caption order), else all."""
    objs = scene.objects if index is None else [scene.objects[index]]
    out = np.zeros((size, size))
    for obj in objs:
        out = np.maximum(out, _coverage(obj, size))
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "L")


def object_depth(obj: ShapeObject) -> float:
    """Depth-map value in [0.5, 1] of an object: larger objects are nearer, hence brighter."""
    t = (obj.size - MIN_SIZE) / (MAX_SIZE_SINGLE - MIN_SIZE)
    return 0.5 + 0.5 * float(np.clip(t, 0.0, 1.0))


def render_depth(scene: Scene, size: int = 64) -> Image.Image:
    """Depth map, mode "L": background is far (0), each object a flat plateau of :func:`object_depth`."""
    out = np.zeros((size, size))
    for obj in _draw_order(scene):
        a = _coverage(obj, size)
        out = out * (1.0 - a) + object_depth(obj) * a
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "L")


# --- captions and sampling --------------------------------------------------------------------------------------------


def describe_object(obj: ShapeObject) -> ObjectSpec:
    """Full description of an object: size and position words only where they are unambiguous."""
    size = "small" if obj.size <= SMALL_MAX else "large" if obj.size >= LARGE_MIN else None
    x, y = obj.centroid
    dx, dy = x - 0.5, y - 0.5
    position = None
    if max(abs(dx), abs(dy)) >= 0.5 - DESCRIBE_POSITION:
        position = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom")
    return ObjectSpec(shape=obj.shape, colour=obj.colour, size=size, position=position)


def caption(scene: Scene) -> str:
    """Full caption of a scene from its geometry (every colour, shape and the background are named)."""
    return format_caption(CaptionSpec(tuple(describe_object(o) for o in scene.objects), scene.background))


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_spec(rng: np.random.Generator, n: int, style: CaptionStyle) -> list[ObjectSpec]:
    """Which size/position words the caption will use (colour/shape mention flags are applied later)."""
    sizes = [_choice(rng, SIZES) if rng.random() < style.p_size else None for _ in range(n)]
    if rng.random() >= style.p_position:
        positions: list[str | None] = [None] * n
    elif n == 1:
        positions = [_choice(rng, POSITIONS)]
    else:  # two objects on opposite sides of one axis
        pair = ["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]
        positions = pair if rng.random() < 0.5 else pair[::-1]
    return [ObjectSpec(size=s, position=p) for s, p in zip(sizes, positions)]


def _axis_range(position: str | None, axis: str, r: float) -> tuple[float, float]:
    """Allowed box-centre range along one axis for a (possibly positioned) object of half-side r."""
    lo, hi = r + EDGE_MARGIN, 1.0 - r - EDGE_MARGIN
    low_side, high_side = ("left", "right") if axis == "x" else ("top", "bottom")
    if position == low_side:
        hi = min(hi, POSITION_LIMIT)
    elif position == high_side:
        lo = max(lo, 1.0 - POSITION_LIMIT)
    return lo, hi


def _place(
    rng: np.random.Generator, specs: Sequence[ObjectSpec], shapes: Sequence[str], colours: Sequence[str]
) -> list[ShapeObject]:
    max_size = MAX_SIZE_SINGLE if len(specs) == 1 else MAX_SIZE_PAIR
    for _ in range(200):
        objs: list[ShapeObject] = []
        for spec, shape, colour in zip(specs, shapes, colours):
            lo, hi = {"small": (MIN_SIZE, SMALL_MAX), "large": (LARGE_MIN, max_size)}.get(
                spec.size or "", (MIN_SIZE, max_size)
            )
            r = float(rng.uniform(lo, hi))
            xr, yr = _axis_range(spec.position, "x", r), _axis_range(spec.position, "y", r)
            if xr[0] > xr[1] or yr[0] > yr[1]:
                break
            objs.append(ShapeObject(shape, colour, float(rng.uniform(*xr)), float(rng.uniform(*yr)), r))
        if len(objs) == len(specs) and all(
            max(a.cx - b.cx, b.cx - a.cx, a.cy - b.cy, b.cy - a.cy) >= a.size + b.size + PAIR_GAP
            for i, a in enumerate(objs)
            for b in objs[i + 1 :]
        ):
            return objs
    raise ValueError(f"cannot place objects {list(specs)} without overlap")


def sample_scene(
    rng: np.random.Generator | int | None = None,
    *,
    spec: CaptionSpec | str | None = None,
    n_objects: int | None = None,
    style: CaptionStyle = CaptionStyle(),
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> Scene:
    """Sample a random scene and its caption.

    Without ``spec``, the number of objects and the words the caption uses follow ``style``; objects are placed to
    agree with every mentioned word (a "small" object is small, one "on the left" is on the left) and are otherwise
    uniform. With ``spec`` (a :class:`CaptionSpec` or caption text) the scene matches that caption, unmentioned
    attributes drawn at random, and the caption is its canonical text. Two objects never share both shape and colour.
    """
    rng = _as_rng(rng)
    if isinstance(spec, str):
        spec = parse_caption(spec)
    if spec is not None:
        if not 1 <= len(spec.objects) <= 2:
            raise ValueError(f"a caption must describe one or two objects, got {len(spec.objects)}")
        specs = list(spec.objects)
        background = spec.background or _choice(rng, backgrounds)
        mentioned = spec
    else:
        n = n_objects or (2 if rng.random() < style.p_two else 1)
        specs = _sample_spec(rng, n, style)
        background = _choice(rng, backgrounds)
    for _ in range(100):
        shape_list = [s.shape or _choice(rng, shapes) for s in specs]
        colour_list = [s.colour or _choice(rng, colours) for s in specs]
        if len(set(zip(shape_list, colour_list))) == len(specs):
            break
    else:
        raise ValueError(f"cannot make {len(specs)} distinct objects from {spec}")
    objs = _place(rng, specs, shape_list, colour_list)
    if spec is None:
        mentioned = CaptionSpec(
            tuple(
                replace(
                    s,
                    shape=o.shape if rng.random() < style.p_shape else None,
                    colour=o.colour if rng.random() < style.p_colour else None,
                )
                for s, o in zip(specs, objs)
            ),
            background if rng.random() < style.p_background else None,
        )
    return Scene(objs, background, format_caption(mentioned))


def scene_from_caption(text: str, rng: np.random.Generator | int | None = None) -> Scene:
    """A random scene matching a caption (e.g. to make a control image for a prompt)."""
    return sample_scene(rng, spec=text)


# --- edits (instruct-pix2pix) -----------------------------------------------------------------------------------------

_COLOUR_EDITS = ("make the {ref} {new}", "turn the {ref} {new}", "change the colour of the {ref} to {new}")
_SHAPE_EDITS = ("turn the {ref} into a {new}", "make the {ref} a {new}", "change the {ref} into a {new}")
_BACKGROUND_EDITS = ("make the background {new}", "change the background to {new}")
EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "background")


def edit_pair(
    rng: np.random.Generator | int | None = None,
    kinds: Sequence[str] = EDIT_KINDS,
    *,
    style: CaptionStyle = CaptionStyle(),
) -> tuple[Scene, Scene, str]:
    """(before, after, instruction) where ``after`` differs from ``before`` only by the instruction's edit.

    Objects are referred to as "the circle", or "the red circle" when the shape alone is ambiguous. Both scenes get
    full captions (:func:`caption`), so evaluate_caption(after_image, after.caption) checks an edit.
    """
    unknown = set(kinds) - set(EDIT_KINDS)
    if unknown or not kinds:
        raise ValueError(f"edit kinds must be a non-empty subset of {EDIT_KINDS}, got {list(kinds)}")
    rng = _as_rng(rng)
    before = sample_scene(rng, style=style)
    before.caption = caption(before)
    kind = _choice(rng, kinds)
    if kind == "background":
        new = next(b for b in BACKGROUNDS if b != before.background)
        after = Scene(list(before.objects), new)
        instruction = _choice(rng, _BACKGROUND_EDITS).format(new=new)
    else:
        i = int(rng.integers(len(before.objects)))
        obj = before.objects[i]
        others = {(o.shape, o.colour) for j, o in enumerate(before.objects) if j != i}
        ambiguous = any(o.shape == obj.shape for j, o in enumerate(before.objects) if j != i)
        ref = f"{obj.colour} {obj.shape}" if ambiguous else obj.shape
        if kind == "colour":
            options = [c for c in COLOURS if c != obj.colour and (obj.shape, c) not in others]
            new_obj = replace(obj, colour=_choice(rng, options))
            instruction = _choice(rng, _COLOUR_EDITS).format(ref=ref, new=new_obj.colour)
        else:
            options = [s for s in SHAPES if s != obj.shape and (s, obj.colour) not in others]
            new_obj = replace(obj, shape=_choice(rng, options))
            instruction = _choice(rng, _SHAPE_EDITS).format(ref=ref, new=new_obj.shape)
        after = Scene([new_obj if j == i else o for j, o in enumerate(before.objects)], before.background)
    after.caption = caption(after)
    return before, after, instruction


# --- dataset ----------------------------------------------------------------------------------------------------------

UNLIMITED = 2**31 - 1
CONDITIONINGS: tuple[str, ...] = ("outline", "mask", "depth")
_RENDER_CONDITIONING = {"outline": render_outline, "mask": render_mask, "depth": render_depth}


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW tensor in [-1, 1] (the VAE's input range)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def conditioning_to_tensor(img: Image.Image) -> torch.Tensor:
    """Mode "L" control image -> float32 1xHxW tensor in [0, 1] (repeat to 3 channels if a model wants RGB)."""
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic, unlimited shapes-world dataset: item ``i`` depends only on (seed, i).

    Items are dicts with ``pixel_values`` (3xHxW in [-1, 1]) and ``caption``; each name in ``conditioning``
    ("outline", "mask", "depth") adds a 1xHxW tensor in [0, 1] under that key. With ``edits=True`` items are
    instruct-pix2pix triples: ``original_pixel_values``, ``edited_pixel_values`` (= ``pixel_values``) and
    ``edit_prompt``, with ``caption`` describing the edited image. ``length=None`` means effectively unlimited
    (2**31 - 1): iterate sequentially, since shuffling fresh random scenes gains nothing.
    """

    def __init__(
        self,
        length: int | None = None,
        *,
        seed: int = 0,
        size: int = 64,
        conditioning: Sequence[str] = (),
        edits: bool = False,
        style: CaptionStyle = CaptionStyle(),
        shapes: Sequence[str] = SHAPES,
        colours: Sequence[str] = COLOURS,
        backgrounds: Sequence[str] = BACKGROUNDS,
    ) -> None:
        unknown = set(conditioning) - set(CONDITIONINGS)
        if unknown:
            raise ValueError(f"unknown conditioning {sorted(unknown)}; expected some of {CONDITIONINGS}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.length = UNLIMITED if length is None else int(length)
        self.seed, self.size, self.conditioning, self.edits = int(seed), int(size), tuple(conditioning), edits
        self.style = style
        self.shapes, self.colours, self.backgrounds = tuple(shapes), tuple(colours), tuple(backgrounds)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        return np.random.default_rng([self.seed, index])

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (the edited scene when ``edits=True``)."""
        if self.edits:
            return self.edit(index)[1]
        return sample_scene(
            self._rng(index), style=self.style, shapes=self.shapes, colours=self.colours, backgrounds=self.backgrounds
        )

    def edit(self, index: int) -> tuple[Scene, Scene, str]:
        """(before, after, instruction) of item ``index`` (edit datasets)."""
        return edit_pair(self._rng(index), style=self.style)

    def __getitem__(self, index: int) -> dict[str, object]:
        item: dict[str, object] = {}
        if self.edits:
            before, scene, instruction = self.edit(index)
            item["original_pixel_values"] = image_to_tensor(render(before, self.size))
            item["edit_prompt"] = instruction
        else:
            scene = self.scene(index)
        item["pixel_values"] = image_to_tensor(render(scene, self.size))
        if self.edits:
            item["edited_pixel_values"] = item["pixel_values"]
        item["caption"] = scene.caption
        for name in self.conditioning:
            item[name] = conditioning_to_tensor(_RENDER_CONDITIONING[name](scene, self.size))
        return item
