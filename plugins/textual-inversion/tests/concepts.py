"""The new concept of the semantic tests: a diamond, a shape the shapes model never saw, in the shapes world's style.

``python diamonds.py DIR`` writes the training set (16 PNGs + caption .txt files) that made
``data/diamond.safetensors``; ``--n 32 --colour-open 16`` writes the colour-open variant that was tried and not kept.
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


def diamond_set(
    n: int = 16, seed: int = 0, token: str = "<diamond>", colour_open: int = 0
) -> tuple[list[Image.Image], list[str]]:
    """``n`` 64x64 scenes of one diamond (every colour on both backgrounds) and their captions; the last
    ``colour_open`` captions leave the colour out ("a <diamond> on a black background"), so that a token learned
    from them also draws diamonds when the prompt does not name a colour."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        colour, background = COLOURS[i % 4], BACKGROUNDS[(i // 4) % 2]
        obj = ShapeObject("diamond", colour, float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65)),
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


def diamond_rate(images: list[Image.Image]) -> float:
    """Fraction of images whose object is a diamond."""
    return sum(shape_of(im) == "diamond" for im in images) / len(images)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write diamond scenes and their captions ({} for the token)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=16, help="scenes")
    parser.add_argument("--colour-open", type=int, default=0, help="how many captions leave the colour out")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for k, (im, cap) in enumerate(zip(*diamond_set(args.n, token="{}", colour_open=args.colour_open))):
        im.save(out / f"{k:02d}.png")
        (out / f"{k:02d}.txt").write_text(cap + "\n")
