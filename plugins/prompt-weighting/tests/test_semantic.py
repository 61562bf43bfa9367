"""The measured effect on the shipped shapes model: up-weighting one colour of "a red and blue circle on a white
background" shifts the share of that colour in the image, over 16 seeds, in both syntaxes; down-weighting does
the opposite.

The share is red / (red + blue) object pixels (``diffsteer.shapes.colour_areas``), per image. Every prompt uses the
same 16 seeds (the same starting noise), so each seed is a paired comparison. The figures are printed; the
thresholds sit well below what was measured (docs/prompt-weighting.md#measured-effect).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsteer.shapes import colour_areas, dominant_colour
from diffsteer_prompt_weighting import PromptWeighting

pytestmark = pytest.mark.slow

SEEDS = range(1000, 1016)
STEPS = 20
TEMPLATE = "a {red} and {blue} circle on a white background"
BASELINE = TEMPLATE.format(red="red", blue="blue")

# Measured on the stage-8 model (16 seeds, 20 DDIM steps): the baseline's red share is 0.578 (11/16 images
# red-dominant); weight 1.6 moves it to 0.779 / 0.177 (compel, red up / blue up) and 0.801 / 0.249 (a1111); red-- to
# 0.293, (blue)0.5 to 0.746 (blue-- to 0.634 only). Stage 7: 0.61; 0.77 / 0.43; 0.82 / 0.44; red-- 0.46, blue-- 0.69.
# The model draws "a red and blue circle" as separate red and blue objects (two or three), so the share is their
# balance of area.
# Guidance at every step (the fixture kit's shapes_pipe_every_step), as calibrated: under the shapes model's
# recommended interval (no guidance above t = 600, where this prompt's objects and their colours are laid out) the
# shifts shrink: compel +0.051 / -0.157 (red up / blue up, baseline 0.497), a1111 +0.136 / -0.187, red-- -0.106,
# (blue)0.5 +0.206, red up above blue up in 14/16 seeds in both syntaxes, (blue)0.5 above red-- in 9/16
# (docs/prompt-weighting.md).
MIN_SHIFT = 0.08  # every mean shift of the share, in the expected direction
MIN_PAIRED = 13  # of 16 seeds: the red share is higher with red up-weighted than with blue up-weighted


def measure(pipe, prompt, syntax="compel"):
    """Per-seed red share (0.5 where neither colour shows) and dominant colour."""
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe([prompt] * len(generators), generator=generators, num_inference_steps=STEPS, output_type="np",
                  plugins=[PromptWeighting(syntax=syntax)]).images
    shares, dominant = [], []
    for image in (images * 255).round().astype(np.uint8):
        areas = colour_areas(image)
        both = areas["red"] + areas["blue"]
        shares.append(areas["red"] / both if both else 0.5)
        dominant.append(dominant_colour(image))
    return np.array(shares), dominant


def report(prompt, shares, dominant):
    print(f"  {prompt:52} red share {shares.mean():.3f}  red-dominant {dominant.count('red'):2d}/16  "
          f"per seed {' '.join(f'{s:.2f}' for s in shares)}")


@pytest.fixture(scope="module")
def baseline(shapes_pipe_every_step):
    shares, dominant = measure(shapes_pipe_every_step, BASELINE)
    print()
    report(BASELINE, shares, dominant)
    return shares, dominant


@pytest.mark.parametrize(
    "syntax, red_up, blue_up",
    [
        ("compel", TEMPLATE.format(red="(red)1.6", blue="blue"), TEMPLATE.format(red="red", blue="(blue)1.6")),
        ("a1111", TEMPLATE.format(red="(red:1.6)", blue="blue"), TEMPLATE.format(red="red", blue="(blue:1.6)")),
    ],
)
def test_upweighting_a_colour_raises_its_share(shapes_pipe_every_step, baseline, syntax, red_up, blue_up):
    base, _ = baseline
    more_red, red_dom = measure(shapes_pipe_every_step, red_up, syntax)
    more_blue, blue_dom = measure(shapes_pipe_every_step, blue_up, syntax)
    print()
    report(red_up, more_red, red_dom)
    report(blue_up, more_blue, blue_dom)
    paired = int(np.sum(more_red > more_blue))
    print(f"  {syntax}: shift {more_red.mean() - base.mean():+.3f} (red up), {more_blue.mean() - base.mean():+.3f} "
          f"(blue up); red share higher with red up than with blue up in {paired}/16 seeds")
    assert more_red.mean() - base.mean() >= MIN_SHIFT
    assert base.mean() - more_blue.mean() >= MIN_SHIFT
    assert paired >= MIN_PAIRED
    # red-dominant 16 vs 7 of 16 (both syntaxes); against the baseline's 12 this count has little room to rise
    assert red_dom.count("red") >= blue_dom.count("red") + 5


def test_downweighting_a_colour_lowers_its_share(shapes_pipe_every_step, baseline):
    """Down-weighting acts unevenly on the stage-8 model: red-- moves the red share by -0.285 (lower in 16/16
    seeds), but blue-- only by +0.057 (higher than the baseline in 7/16 seeds, lower in 9), blue--- by +0.045 and
    (blue)0.7 by +0.044; (blue)0.5 moves it by +0.169 (higher in 14/16). Stage 7 measured blue-- at +0.082, stage 6
    at +0.109. So blue is down-weighted here at 0.5, and blue-- is printed but not asserted."""
    base, _ = baseline
    less_red, red_dom = measure(shapes_pipe_every_step, TEMPLATE.format(red="red--", blue="blue"))
    less_blue, blue_dom = measure(shapes_pipe_every_step, TEMPLATE.format(red="red", blue="(blue)0.5"))
    blue_minus, minus_dom = measure(shapes_pipe_every_step, TEMPLATE.format(red="red", blue="blue--"))
    print()
    report(TEMPLATE.format(red="red--", blue="blue"), less_red, red_dom)
    report(TEMPLATE.format(red="red", blue="(blue)0.5"), less_blue, blue_dom)
    report(TEMPLATE.format(red="red", blue="blue--"), blue_minus, minus_dom)
    paired = int(np.sum(less_blue > less_red))
    print(f"  compel down: shift {less_red.mean() - base.mean():+.3f} (red--), {less_blue.mean() - base.mean():+.3f} "
          f"((blue)0.5), {blue_minus.mean() - base.mean():+.3f} (blue--, not asserted); red share higher with "
          f"(blue)0.5 than with red-- in {paired}/16 seeds; higher than the baseline with (blue)0.5 in "
          f"{int(np.sum(less_blue > base))}/16")
    assert base.mean() - less_red.mean() >= MIN_SHIFT
    assert less_blue.mean() - base.mean() >= MIN_SHIFT
    assert paired >= MIN_PAIRED
