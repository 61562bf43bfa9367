"""The semantic tests' concepts, drawn in the shapes world's style, and their evaluator.

* The wedge: the world's triangle, of every colour on both backgrounds, captioned with the token in place of the
  shape ("a red <wedge> on a white background"). The shipped ``data/wedge.safetensors`` was learned from
  ``concept_set("triangle")``; starting from the word "shape", the token learns its form from the 16 pictures alone.
* The diamond: a shape the shipped model never saw. The training tests learn it for a few steps (mechanics); the
  stage-8 model cannot be taught to draw it through the text encoder (docs/textual-inversion.md, "A shape the model
  never drew").

``python concepts.py DIR`` writes the training set (16 PNGs + caption .txt files, ``{}`` for the token) of the
shipped wedge; ``--shape diamond`` the diamonds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffsteer.shapes import evaluate
from diffsteer.shapes.world import Scene, ShapeObject, render

COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("white", "black")
CANDIDATES = ("circle", "square", "triangle", "diamond")


def concept_set(
    shape: str = "triangle", n: int = 16, seed: int = 0, token: str = "<wedge>", colour_open: int = 0
) -> tuple[list[Image.Image], list[str]]:
    """``n`` 64x64 scenes of one ``shape`` (every colour on both backgrounds) and their captions, the token in the
    shape's place; the last ``colour_open`` captions leave the colour out ("a <wedge> on a black background")."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        colour, background = COLOURS[i % 4], BACKGROUNDS[(i // 4) % 2]
        obj = ShapeObject(shape, colour, float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65)),
                          float(rng.uniform(0.18, 0.28)))
        images.append(render(Scene([obj], background)))
        named = i < n - colour_open
        captions.append(f"a {colour + ' ' if named else ''}{token} on a {background} background")
    return images, captions


def shape_of(image: Image.Image) -> str | None:
    """The evaluator: the form (circle, square, triangle or diamond) best matching the image's object pixels,
    by template mismatch at the mask's own area and centroid (``diffsteer.shapes.evaluate.shape_scores``);
    None for an image with no object."""
    mask = evaluate.object_mask(image)
    if mask.sum() < evaluate.MIN_AREA_FRACTION * mask.size:
        return None
    return evaluate.shape_class(mask, CANDIDATES)


def shape_rate(images: list[Image.Image], shape: str) -> float:
    """Fraction of images whose object is ``shape``."""
    return sum(shape_of(im) == shape for im in images) / len(images)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write one-shape scenes and their captions ({} for the token)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="triangle", choices=("triangle", "diamond"))
    parser.add_argument("--n", type=int, default=16, help="scenes")
    parser.add_argument("--colour-open", type=int, default=0, help="how many captions leave the colour out")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    images, captions = concept_set(args.shape, args.n, token="{}", colour_open=args.colour_open)
    for k, (im, cap) in enumerate(zip(images, captions)):
        im.save(out / f"{k:02d}.png")
        (out / f"{k:02d}.txt").write_text(cap + "\n")
