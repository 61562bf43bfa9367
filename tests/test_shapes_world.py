"""Shapes world: generator, control images, edit pairs, tokenizer and evaluators (accuracy figures print with -s)."""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffsteer.shapes import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_SHAPES,
    SHAPES,
    VOCAB_WORDS,
    CaptionSpec,
    Scene,
    ShapeObject,
    ShapesDataset,
    background_colour,
    bbox,
    build_tokenizer,
    load_tokenizer,
    caption,
    centroid,
    connected_components,
    dominant_colour,
    dominant_colours,
    edit_pair,
    evaluate_caption,
    format_caption,
    mask_iou,
    object_count,
    object_mask,
    objects,
    parse_caption,
    render,
    render_depth,
    render_mask,
    render_outline,
    sample_scene,
    scene_from_caption,
    shape_class,
    vocab_size,
)
from diffsteer.shapes.world import MIN_SIZE, PAIR_GAP

N_SCENES = 300


def degrade(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Slight blur plus mild Gaussian noise, like a soft generated image."""
    blurred = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.0))))
    noisy = np.asarray(blurred, dtype=np.float64) + rng.normal(0.0, 8.0, (img.height, img.width, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _rate(hits: list[bool]) -> float:
    return sum(hits) / max(len(hits), 1)


def _accuracy(degraded: bool, shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """Per-criterion accuracy of the evaluators on N_SCENES random scenes with known labels, classifying
    shapes among ``shapes``."""
    rng = np.random.default_rng(1234 + degraded)
    hits: dict[str, list[bool]] = {}

    def add(key: str, ok: object) -> None:
        hits.setdefault(key, []).append(bool(ok))

    for _ in range(N_SCENES):
        scene = sample_scene(rng)
        img = render(scene)
        arr = degrade(img, rng) if degraded else img
        add("background_colour", background_colour(arr) == scene.background)
        if len(scene.objects) == 1:
            add("dominant_colour", dominant_colour(arr) == scene.objects[0].colour)
        found = objects(arr, shapes=shapes)
        add("object_count", len(found) == len(scene.objects))
        for obj in scene.objects:
            # the detected object nearest the true centroid must have the true colour and shape
            tx, ty = (v * 64 for v in obj.centroid)
            near = min(found, key=lambda d: math.hypot(d.centroid[0] - tx, d.centroid[1] - ty), default=None)
            ok = near is not None and math.hypot(near.centroid[0] - tx, near.centroid[1] - ty) < 1.5
            add("object_colour", ok and near.colour == obj.colour)
            add("shape_class", ok and near.shape == obj.shape)
        # full caption (every attribute named) and the sampled, partial caption
        for text in (caption(scene), scene.caption):
            result = evaluate_caption(arr, text, shapes)
            for key, value in result.items():
                if value is not None:
                    add(f"caption.{key}", value)
    return {k: _rate(v) for k, v in hits.items()}


def _report(title: str, acc: dict[str, float]) -> None:
    print(f"\n{title} ({N_SCENES} scenes):")
    for key, value in acc.items():
        print(f"  {key:24s} {value:.3f}")


# --- generator --------------------------------------------------------------------------------------------------------


def test_scenes_are_valid_and_match_their_captions() -> None:
    rng = np.random.default_rng(0)
    n_two = 0
    for _ in range(200):
        scene = sample_scene(rng)
        n_two += len(scene.objects) == 2
        assert scene.background in BACKGROUNDS and 1 <= len(scene.objects) <= 2
        for o in scene.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size >= MIN_SIZE - 1e-9
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 and 0 < y0 and x1 < 1 and y1 < 1
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.size + b.size + PAIR_GAP - 1e-9
            assert (a.shape, a.colour) != (b.shape, b.colour)
        # the caption only says true things
        spec = parse_caption(scene.caption)
        assert len(spec.objects) == len(scene.objects)
        for s, o in zip(spec.objects, scene.objects):
            assert s.colour in (None, o.colour) and s.shape in (None, o.shape)
        assert spec.background in (None, scene.background)
    assert 50 < n_two < 110  # default style: 40% two-object scenes


def test_sampling_is_deterministic_and_caption_specs_round_trip() -> None:
    assert sample_scene(7) == sample_scene(np.random.default_rng(7))
    assert sample_scene(7) != sample_scene(8)
    rng = np.random.default_rng(1)
    for _ in range(100):
        text = sample_scene(rng).caption
        assert format_caption(parse_caption(text)) == text
    spec = parse_caption("A BIG Red circle, on the left; and a tiny blue square at the top, on a Black background.")
    assert spec.background == "black"
    assert [(o.size, o.colour, o.shape, o.position) for o in spec.objects] == [
        ("large", "red", "circle", "left"),
        ("small", "blue", "square", "top"),
    ]
    assert parse_caption("a red shape").objects[0].shape is None
    assert parse_caption("make the circle blue").objects[0].colour == "blue"


def test_scene_from_caption_renders_what_it_says() -> None:
    rng = np.random.default_rng(2)
    for text in [
        "a red circle",
        "a small blue square on the left on a black background",
        "a large yellow triangle at the bottom on a white background",
        "a red circle on the left and a yellow triangle on the right",
        "a green square at the top and a blue circle at the bottom on a black background",
        "a circle and a circle",
    ]:
        for _ in range(10):
            scene = scene_from_caption(text, rng)
            assert evaluate_caption(render(scene), text)["all"], (text, scene)
    with pytest.raises(ValueError):
        scene_from_caption("on a white background", rng)


def test_render_is_antialiased_and_control_images_agree() -> None:
    scene = Scene(
        [ShapeObject("circle", "red", 0.3, 0.5, 10 / 64), ShapeObject("square", "blue", 0.75, 0.3, 7 / 64)], "white"
    )
    img = np.asarray(render(scene))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    mask = np.asarray(render_mask(scene), dtype=np.float64) / 255
    # anti-aliased: edge pixels have intermediate coverage; circle area is pi r^2 to within 1%
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 40
    circle = np.asarray(render_mask(scene, index=0), dtype=np.float64) / 255
    assert circle.sum() == pytest.approx(math.pi * 10**2, rel=0.01)
    assert np.array_equal(np.asarray(render_mask(scene, size=128)).shape, (128, 128))
    # image differs from the background exactly where the mask is
    diff = np.abs(img.astype(float) - 255).max(-1) / 255
    assert np.abs(diff - mask).max() < 0.02
    # outline: a thin ring on the mask boundary
    outline = np.asarray(render_outline(scene), dtype=np.float64) / 255
    assert outline[32, 14:25].max() < 0.05  # hollow: the circle is centred at x = 19.2 with radius 10
    assert outline[32, 8:11].max() > 0.9  # ring on its left edge, x = 9.2
    ring = 1.5 * (2 * math.pi * 10 + 8 * 7)  # width x (circle + square perimeters)
    assert 0.8 * ring < outline.sum() < 1.2 * ring
    # depth: background far (0), bigger object nearer (brighter), flat plateaus
    depth = np.asarray(render_depth(scene))
    assert depth[0, 0] == 0 and depth[32, 19] > depth[20, 48] > 100


def test_extra_shapes_render_and_classify() -> None:
    candidates = SHAPES + EXTRA_SHAPES
    for shape in candidates:
        scene = Scene([ShapeObject(shape, "orange" if shape == "star" else "red", 0.5, 0.5, 14 / 64)], "white")
        cover = np.asarray(render_mask(scene), dtype=np.float64) / 255
        assert shape_class(cover, candidates) == shape


def test_edit_pairs_change_exactly_one_thing() -> None:
    rng = np.random.default_rng(3)
    kinds = Counter()
    for _ in range(60):
        before, after, instruction = edit_pair(rng)
        assert len(before.objects) == len(after.objects)
        changed = [(a, b) for a, b in zip(before.objects, after.objects) if a != b]
        if before.background != after.background:
            kinds["background"] += 1
            assert not changed and "background" in instruction and after.background in instruction
        else:
            (a, b), = changed
            assert (a.cx, a.cy, a.size) == (b.cx, b.cy, b.size)
            if a.colour != b.colour:
                kinds["colour"] += 1
                assert a.shape == b.shape and instruction.split()[-1] == b.colour
            else:
                kinds["shape"] += 1
                assert instruction.split()[-1] == b.shape
            assert a.shape in instruction
        assert evaluate_caption(render(after), after.caption)["all"]
        assert not evaluate_caption(render(before), after.caption)["all"]
    assert set(kinds) == {"background", "colour", "shape"}
    with pytest.raises(ValueError):
        edit_pair(rng, kinds=("move",))


def test_dataset_items() -> None:
    ds = ShapesDataset(10, seed=5, conditioning=("outline", "mask", "depth"))
    item = ds[3]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    for name in ("outline", "mask", "depth"):
        assert item[name].shape == (1, 64, 64) and 0.0 <= item[name].min() and item[name].max() <= 1.0
    assert item["caption"] == ds.scene(3).caption
    assert torch.equal(ShapesDataset(seed=5)[3]["pixel_values"], item["pixel_values"])  # per index, any length
    assert ShapesDataset(seed=6)[3]["caption"] != item["caption"] or not torch.equal(
        ShapesDataset(seed=6)[3]["pixel_values"], item["pixel_values"]
    )
    assert len(ds) == 10 and len(ShapesDataset()) == 2**31 - 1
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError):
        ShapesDataset(conditioning=("canny",))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    edits = ShapesDataset(4, edits=True, size=32)[1]
    assert edits["original_pixel_values"].shape == (3, 32, 32)
    assert edits["edited_pixel_values"] is edits["pixel_values"]
    assert not torch.equal(edits["original_pixel_values"], edits["pixel_values"])
    assert isinstance(edits["edit_prompt"], str)


# --- tokenizer --------------------------------------------------------------------------------------------------------


def test_tokenizer_loads_and_round_trips(tmp_path) -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    path = build_tokenizer(tmp_path / "tokenizer")
    build_tokenizer(path)  # rebuilding over an existing folder replaces it atomically
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]  # no temporary folders left behind
    tok = CLIPTokenizer.from_pretrained(str(path))
    assert tok.model_max_length == 77 and len(tok) == vocab_size()
    assert tok.eos_token_id == vocab_size() - 1 and tok.pad_token_id == tok.eos_token_id
    for word in VOCAB_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    fast = CLIPTokenizerFast.from_pretrained(str(path))
    rng = np.random.default_rng(4)
    texts = [sample_scene(rng).caption for _ in range(50)] + [edit_pair(rng)[2] for _ in range(20)]
    for text in texts:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77 and ids[0] == tok.bos_token_id
        assert len(tok.tokenize(text)) == len(text.split())  # one token per word
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert fast(text).input_ids == tok(text).input_ids
    assert load_tokenizer(path).get_vocab() == tok.get_vocab()  # loads an existing folder as is
    assert len(load_tokenizer(tmp_path / "fresh")) == vocab_size()  # builds a missing one
    # unknown words still tokenize (sub-words / characters), never to the unknown token
    ids = tok("a zebra-striped Dodecahedron!").input_ids
    assert tok.unk_token_id not in ids[1:-1] and max(ids) < vocab_size()


# --- evaluators -------------------------------------------------------------------------------------------------------


def test_evaluators_accuracy_clean() -> None:
    acc = _accuracy(degraded=False)
    _report("evaluator accuracy, clean renders", acc)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_evaluators_accuracy_degraded() -> None:
    acc = _accuracy(degraded=True)
    _report("evaluator accuracy, blur 0.5-1 px + noise sigma 8", acc)
    assert all(v >= 0.95 for v in acc.values()), acc


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_strict_shape_check_keeps_its_accuracy(degraded: bool) -> None:
    """With diamond, hexagon and star as distractors, true circles, squares and triangles still pass."""
    acc = _accuracy(degraded, SHAPES + EXTRA_SHAPES)
    _report(f"strict evaluator accuracy, {'degraded' if degraded else 'clean'} renders", acc)
    assert all(v >= (0.95 if degraded else 0.99) for v in acc.values()), acc


def _corrupt(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A caption wrong in exactly one criterion, and that criterion's name."""
    spec = parse_caption(caption(scene))
    kind = ["colour", "shape", "background", "position"][int(rng.integers(4))]
    objs = list(spec.objects)
    if kind == "background":
        return format_caption(replace(spec, background=next(b for b in BACKGROUNDS if b != spec.background))), kind
    if kind == "position":
        i = next((i for i, o in enumerate(objs) if o.position), None)
        if i is None:
            kind = "colour"
        else:
            flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
            objs[i] = replace(objs[i], position=flip[objs[i].position])
            return format_caption(CaptionSpec(tuple(objs), spec.background)), kind
    # change one object's colour / shape to one no object in the scene has, so even a multiset check fails
    i = int(rng.integers(len(objs)))
    attr, options = ("colour", COLOURS) if kind == "colour" else ("shape", SHAPES)
    used = {getattr(o, attr) for o in scene.objects}
    new = [v for v in options if v not in used]  # never empty: at most 2 of >= 3 options are used
    objs[i] = replace(objs[i], **{attr: new[int(rng.integers(len(new)))]})
    return format_caption(CaptionSpec(tuple(objs), spec.background)), kind


def test_evaluators_reject_wrong_captions() -> None:
    rng = np.random.default_rng(9)
    caught: dict[str, list[bool]] = {}
    for _ in range(200):
        scene = sample_scene(rng)
        text, kind = _corrupt(scene, rng)
        result = evaluate_caption(render(scene), text)
        caught.setdefault(kind, []).append(result[kind] is False and result["all"] is False)
    rates = {k: _rate(v) for k, v in caught.items()}
    print("\nwrong-caption rejection rates:", {k: f"{v:.3f} (n={len(caught[k])})" for k, v in rates.items()})
    assert all(v >= 0.99 for v in rates.values()), rates


def test_shape_class_rounded_square_and_pixel_masks() -> None:
    ss = 8
    yy, xx = (np.mgrid[0 : 64 * ss, 0 : 64 * ss] + 0.5) / ss
    for r in (6.0, 12.0):
        for rho in (0.0, 0.3, 0.5):  # corner radius as a fraction of the half-side
            q = r * rho
            dx = np.maximum(np.abs(xx - 31.7) - (r - q), 0)
            dy = np.maximum(np.abs(yy - 30.2) - (r - q), 0)
            inside = (np.abs(xx - 31.7) <= r) & (np.abs(yy - 30.2) <= r) & (dx**2 + dy**2 <= q**2)
            cover = inside.reshape(64, ss, 64, ss).mean(axis=(1, 3))
            assert shape_class(cover) == "square", (r, rho)
            assert shape_class(cover > 0.5) == "square", (r, rho)  # plain boolean masks work too
    for shape in SHAPES:  # blurred shapes keep their class
        img = render(Scene([ShapeObject(shape, "green", 0.5, 0.5, 7 / 64)], "black"))
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        assert objects(img)[0].shape == shape


def test_connected_components_matches_flood_fill() -> None:
    rng = np.random.default_rng(11)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 50)) < density
        labels, n = connected_components(mask)
        # reference: breadth-first flood fill, 8-connected
        ref = np.full(mask.shape, -1)
        count = 0
        for start in zip(*np.nonzero(mask)):
            if ref[start] >= 0:
                continue
            queue = deque([start])
            ref[start] = count
            while queue:
                y, x = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < 40 and 0 <= nx < 50 and mask[ny, nx] and ref[ny, nx] < 0:
                            ref[ny, nx] = count
                            queue.append((ny, nx))
            count += 1
        assert n == count and np.array_equal(labels >= 0, mask)
        # same partition: a bijection between label ids
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n
    labels, n = connected_components(np.zeros((5, 5), dtype=bool))
    assert n == 0 and (labels == -1).all()


def test_evaluator_inputs_and_helpers() -> None:
    scene = Scene([ShapeObject("triangle", "yellow", 0.25, 0.7, 9 / 64)], "black")
    img = render(scene)
    arr = np.asarray(img)
    for form in (img, arr, arr / 255.0, np.dstack([arr, np.full((64, 64), 255, np.uint8)])):
        assert background_colour(form) == "black" and dominant_colours(form) == ["yellow"]
        assert [(o.colour, o.shape) for o in objects(form)] == [("yellow", "triangle")]
    cx, cy = centroid(img)
    assert abs(cx - 16) < 0.5 and abs(cy - (0.7 * 64 + 3)) < 0.5  # triangle centroid is r/3 below the box centre
    x0, y0, x1, y1 = bbox(img)
    assert (x0, x1) == (7, 25) and (y0, y1) == (36, 54)
    assert object_mask(img).sum() == pytest.approx(2 * 9**2, rel=0.15)
    assert object_count(np.zeros((64, 64, 3), np.uint8)) == 0 and centroid(np.zeros((64, 64, 3), np.uint8)) is None
    assert dominant_colour(np.full((64, 64, 3), 255, np.uint8)) is None
    assert mask_iou(img, render_mask(scene)) > 0.99
    assert mask_iou(img, render_mask(replace(scene, objects=[replace(scene.objects[0], cx=0.75)]))) == 0.0
    result = evaluate_caption(img, "a yellow triangle on the left on a black background")
    assert result["all"] and result["size"] is None and result["both_colours"] is None
    with pytest.raises(TypeError):
        objects([[0, 0, 0]])
    with pytest.raises(ValueError):
        objects(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        objects(np.full((8, 8, 3), np.nan))
    with pytest.raises(ValueError):
        shape_class(np.zeros((8, 8)))
