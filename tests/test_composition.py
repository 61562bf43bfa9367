"""All five first plugins in one call on the shipped shapes model, each keeping its measured effect.

textual-inversion, sega, sag, controlnet and prompt-weighting act on different things, and each is
measured on its own axis while the other four stay in the call:

* textual-inversion: the shape: "<wedge>" (a token learned from pictures of triangles) gives triangles, the word
  "shape" in its place does not;
* controlnet: the position: the object's centroid lands on the outline control's centre;
* sega: "+red" turns the prompt's blue object red;
* prompt-weighting: the prompt's colour against SEGA's: "(blue)0.8" yields to "+red", "(blue)1.4" holds;
* sag: the latents' high-frequency energy (their distance to their own SAG blur) goes down.

The prompt is one the world's captions could hold ("a blue <wedge> on a white background"): an object of two
colours ("a red and blue <wedge>") is outside the caption grammar, and the shipped model draws it as two objects.

Every condition draws the same starting noise from the same seeds, so each comparison is paired. The
figures print; the thresholds sit below what was measured (quoted beside each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffsteer.shapes import centroid, colour_areas, render_outline
from diffsteer.shapes.world import Scene, ShapeObject
from diffsteer_controlnet import ControlNet, load_controlnet
from diffsteer_prompt_weighting import PromptWeighting
from diffsteer_sag import Sag, gaussian_blur_2d
from diffsteer_sega import Sega
from diffsteer_textual_inversion import TextualInversion

ROOT = Path(__file__).resolve().parents[1]
WEDGE = "wedge"  # the embedding shipped with the textual-inversion plugin
N, STEPS = 12, 15
SEEDS = range(3000, 3000 + N)
# Triangle outlines at spread-out places, at 0.2 strength: the control says where, the token says what. At full
# strength the outline alone draws triangles (12/12 with "shape" in the token's place on stage 8), leaving the token
# nothing to do; with stage 9's ControlNet half strength still drew 10/12 (token +0.17), and 0.35 drew 5/12 while
# keeping 12/12 within 4 px. With stage 12's ControlNet the outline alone draws 11/12 at 0.35 and 10/12 at 0.3 (token
# +0.08, +0.17); 0.25 draws 6/12 but leaves SAG 2.3 % of HF energy (3.1 % at sag_scale 1.0); 0.2 draws 6/12, keeps
# 8/12 within 4 px and every other effect (figures at the assertions).
PLACES = [(0.3 + 0.4 * ((i * 5) % N) / (N - 1), 0.3 + 0.4 * ((i * 7) % N) / (N - 1)) for i in range(N)]
OBJECTS = [ShapeObject("triangle", "red", x, y, 0.2) for x, y in PLACES]
OUTLINES = [render_outline(Scene([o], "white")) for o in OBJECTS]
CENTRES = np.array([o.centroid for o in OBJECTS]) * 64  # a triangle's centroid is a third of its size below the box's
CONTROL_SCALE = 0.2
# Guidance at every step (shapes_pipe_every_step), not the shapes model's recommended interval (guidance only at
# t <= 600): the stack's effects were calibrated so, and under the interval they weaken (measured at 0.2: triangles
# 1.00 vs 0.92 with "shape", near 0.50 vs 0.25, red share 0.75 vs 0.00 with (blue)1.4 in 9/12 and 0.75 vs 0.17
# without SEGA in 7/12, HF energy 0.167 vs 0.173 in 11/12): the layout, which the outline and "+red" steer, is drawn
# unguided there.
TEMPLATE = "a {blue} {thing} on a white background"


def triangle_rate(images: list) -> float:
    import sys

    sys.path.insert(0, str(ROOT / "plugins" / "textual-inversion" / "tests"))  # that suite's shape evaluator
    from concepts import shape_rate

    return shape_rate(images, "triangle")


class Run:
    """One call over N seeds with the given plugins: images, latents and the per-axis measures."""

    def __init__(self, pipe, plugins, *, blue="(blue)0.8", thing="<wedge>") -> None:
        prompt = TEMPLATE.format(blue=blue, thing=thing)
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        self.latents = pipe([prompt] * N, num_inference_steps=STEPS, generator=gens, plugins=plugins,
                            output_type="latent").images
        pixels = pipe.decode_latents(self.latents).clamp(-1, 1).add(1).mul(127.5).round()
        self.images = list(pixels.permute(0, 2, 3, 1).to(torch.uint8).numpy())
        self.hf = ((self.latents - gaussian_blur_2d(self.latents, 9, 1.0)) ** 2).mean(dim=(1, 2, 3)).numpy()

    def red_share(self) -> np.ndarray:
        shares = []
        for image in self.images:
            areas = colour_areas(image)
            both = areas["red"] + areas["blue"]
            shares.append(areas["red"] / both if both else 0.5)
        return np.array(shares)

    def near_control(self) -> float:
        """Fraction of images whose object centroid is within 4 px of its outline's centroid."""
        hits = 0
        for image, c in zip(self.images, CENTRES):
            g = centroid(image)
            hits += g is not None and float(np.hypot(g[0] - c[0], g[1] - c[1])) <= 4.0
        return hits / N

    def triangles(self) -> float:
        from PIL import Image

        return triangle_rate([Image.fromarray(i) for i in self.images])


def make_parts() -> dict:
    """The five plugins of the stack, by short name."""
    return dict(
        ti=TextualInversion(embeddings=[WEDGE]),
        sega=Sega(concepts=[dict(prompt="red", guidance_scale=3.0, warmup_steps=2, threshold=0.9)]),
        sag=Sag(),
        cn=ControlNet(controlnet=load_controlnet("shapes-outline"), image=OUTLINES, conditioning_scale=CONTROL_SCALE),
        pw=PromptWeighting(),
    )


def stack(parts: dict, without: str = "") -> list:
    return [p for k, p in parts.items() if k != without]


def make_runs(pipe, parts: dict) -> dict:
    """The whole stack, and each comparison run that takes one plugin out (or changes the weight)."""
    return {
        "all": Run(pipe, stack(parts)),
        "blue up": Run(pipe, stack(parts), blue="(blue)1.4"),
        "no ti": Run(pipe, stack(parts, "ti"), thing="shape"),
        "no sega": Run(pipe, stack(parts, "sega")),
        "no sag": Run(pipe, stack(parts, "sag")),
        "no cn": Run(pipe, stack(parts, "cn")),
    }


def figures(r: dict) -> list[str]:
    """One line per plugin: its measure with the whole stack against the run without it (bench/stack_sampling.py
    prints these too)."""
    share = {k: v.red_share() for k, v in r.items()}
    return [
        f"  textual-inversion: triangle rate {r['all'].triangles():.2f} with '<wedge>', "
        f"{r['no ti'].triangles():.2f} with 'shape' and no token",
        f"  controlnet: within 4 px of the control {r['all'].near_control():.2f}, without it "
        f"{r['no cn'].near_control():.2f}",
        f"  prompt-weighting: red share {share['all'].mean():.2f} with (blue)0.8, {share['blue up'].mean():.2f} with "
        f"(blue)1.4 (higher with 0.8 in {(share['all'] > share['blue up']).sum()}/{N})",
        f"  sega +red: red share {share['all'].mean():.2f}, without sega {share['no sega'].mean():.2f} "
        f"(higher with sega in {(share['all'] > share['no sega']).sum()}/{N})",
        f"  sag: latent HF energy {r['all'].hf.mean():.4f}, without sag {r['no sag'].hf.mean():.4f} "
        f"(lower with sag in {(r['all'].hf < r['no sag'].hf).sum()}/{N})",
    ]


@pytest.fixture(scope="module")
def parts():
    return make_parts()


@pytest.fixture(scope="module")
def runs(shapes_pipe_every_step, parts):
    return make_runs(shapes_pipe_every_step, parts)


def test_all_five_in_one_call_each_keep_their_effect(runs):
    r = runs
    share = {k: v.red_share() for k, v in r.items()}
    print(f"\nall five plugins, {N} seeds, DDIM {STEPS} steps")
    print("\n".join(figures(r)))
    # Measured on stage 12 at 0.2: triangles 1.00 vs 0.50; near 0.67 vs 0.08; red share 0.91 vs 0.05 (12/12) and
    # 0.91 vs 0.01 (12/12); HF energy 0.157 vs 0.166 (10/12). On stage 9 at 0.35: triangles 1.00 vs 0.42; near 1.00
    # vs 0.17; red share 0.92 vs 0.08 (11/12) and 0.92 vs 0.00 (11/12); HF energy 0.183 vs 0.203 (12/12). On stage 8
    # at 0.5: triangles 1.00 vs 0.67; near 1.00 vs 0.00; red share 0.92 vs 0.13 (12/12) with (blue)0.8 against
    # (blue)1.4 and 0.92 vs 0.00 (12/12) with sega; HF energy 0.147 vs 0.157 (12/12). On stage 7, with the <diamond>
    # token and diamond outlines at full strength: diamonds 0.75 vs 0.00; near 1.00 vs 0.08; red share 1.00 vs 0.28
    # and 1.00 vs 0.03; HF energy 0.170 vs 0.203.
    # The stack asked for "(blue)0.6" on the stage-6 model; on stage 7 that weight already lost to the colour-open
    # prior, and 0.8 keeps the object blue without sega while still yielding to "+red".
    assert r["all"].triangles() >= r["no ti"].triangles() + 0.2
    assert r["all"].near_control() >= 0.6 and r["all"].near_control() >= r["no cn"].near_control() + 0.4
    assert share["all"].mean() - share["blue up"].mean() >= 0.15 and (share["all"] > share["blue up"]).sum() >= 9
    assert share["all"].mean() - share["no sega"].mean() >= 0.15 and (share["all"] > share["no sega"]).sum() >= 9
    assert r["all"].hf.mean() <= 0.95 * r["no sag"].hf.mean() and (r["all"].hf < r["no sag"].hf).sum() >= 10


def test_plugin_order_does_not_change_the_stack(shapes_pipe_every_step, parts, runs):
    """The five touch different hooks or add up (guidance terms, residuals): listing them in reverse gives the
    same latents, bit for bit (the core sums guidance terms in the order of the plugins' names; summed in list
    order, the rounding differed by 1e-5 and flipped SEGA's percentile mask in one seed, 0.069 apart)."""
    forward = runs["all"]  # the same plugin instances in list order, run by the fixture
    backward = Run(shapes_pipe_every_step, stack(parts)[::-1])
    delta = float((forward.latents - backward.latents).abs().max())
    print(f"\nmax |Δ| of the latents, plugins listed in reverse: {delta:.2e}")
    assert delta == 0.0
