"""Measure how well a model draws the shapes world: colour, shape, two-object, background and position accuracy.

``diffsteer eval shapes [--model DIR]`` prints the table that the model card reports. Settings follow
the model card: DDIM, 20 steps, CFG 7.5, generation seeds from 10_000 up (training never draws them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .evaluate import evaluate_caption
from .vocab import BACKGROUNDS, COLOURS, EXTRA_SHAPES, POSITION_PHRASE, POSITIONS, SHAPES

EVAL_SEED_BASE = 10_000


def eval_prompts(n_single: int = 144, n_double: int = 72, n_position: int = 96) -> list[str]:
    """Balanced prompts: every (colour, shape, background) single-object combination, then pairs, then
    single objects with a position ("a red circle on the left on a white background")."""
    singles = [
        f"a {c} {s} on a {b} background" for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)
    ]
    combos = [
        (c1, s1, c2, s2)
        for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLOURS, SHAPES), 2)
        if c1 != c2 and s1 != s2
    ]
    # An even spread through the ordered pairs keeps every colour and shape represented without randomness;
    # the background alternates so that both backgrounds get half the pairs.
    pairs = [
        "a {} {} and a {} {} on a {} background".format(
            *combos[i * len(combos) // max(n_double, 1) % len(combos)], BACKGROUNDS[i % len(BACKGROUNDS)]
        )
        for i in range(n_double)
    ]
    placed = [
        f"a {c} {s} {POSITION_PHRASE[p]} on a {b} background"
        for p, c, s, b in itertools.product(POSITIONS, COLOURS, SHAPES, BACKGROUNDS)
    ]
    # Interleave the positions so a short run still covers all four.
    placed = [placed[(i % len(POSITIONS)) * (len(placed) // len(POSITIONS)) + i // len(POSITIONS)]
              for i in range(len(placed))]
    return (
        [singles[i % len(singles)] for i in range(n_single)]
        + pairs
        + [placed[i % len(placed)] for i in range(n_position)]
    )


@dataclass
class ShapesScore:
    colour: float
    shape: float
    #: shape accuracy when a diamond, hexagon or star is also a possible answer (a kite-like "circle" fails)
    shape_strict: float
    two_object: float
    background: float
    position: float
    n_single: int
    n_double: int
    n_position: int

    def table(self) -> str:
        return (
            "| metric | value | images |\n|---|---|---|\n"
            f"| colour (single object) | {100 * self.colour:.1f}% | {self.n_single} |\n"
            f"| shape (single object) | {100 * self.shape:.1f}% | {self.n_single} |\n"
            f"| shape, strict (diamond, hexagon, star also possible) | {100 * self.shape_strict:.1f}% "
            f"| {self.n_single} |\n"
            f"| two-object (both colours present) | {100 * self.two_object:.1f}% | {self.n_double} |\n"
            f"| background | {100 * self.background:.1f}% | {self.n_single + self.n_double + self.n_position} |\n"
            f"| position (centroid in the named half) | {100 * self.position:.1f}% | {self.n_position} |"
        )


def score_model(
    pipe: Any,
    *,
    n_single: int = 144,
    n_double: int = 72,
    n_position: int = 96,
    steps: int = 20,
    guidance_scale: float = 7.5,
    batch: int = 24,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ShapesScore:
    """Generate one image per prompt (seed ``EVAL_SEED_BASE + i``) and score it."""
    import torch

    prompts = eval_prompts(n_single, n_double, n_position)
    results = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(EVAL_SEED_BASE + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens).images
        results += [
            {**evaluate_caption(img, p), "shape_strict": evaluate_caption(img, p, SHAPES + EXTRA_SHAPES)["shape"]}
            for img, p in zip(images, chunk)
        ]
        if progress:
            progress(min(start + batch, len(prompts)), len(prompts))
    single, double, placed = (
        results[:n_single], results[n_single : n_single + n_double], results[n_single + n_double :]
    )

    def rate(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / max(len(vals), 1)

    return ShapesScore(
        colour=rate(single, "colour"),
        shape=rate(single, "shape"),
        shape_strict=rate(single, "shape_strict"),
        two_object=rate(double, "both_colours"),
        background=rate(results, "background"),
        position=rate(placed, "position"),
        n_single=len(single),
        n_double=len(double),
        n_position=len(placed),
    )
