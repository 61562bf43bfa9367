"""Parity with diffusers 0.42.1's SemanticStableDiffusionPipeline on the same tiny random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from diffsteer.pipeline import Pipeline
from diffsteer.testing import diffusers_pipeline, max_abs_diff
from diffsteer_sega import Sega, sega_step

TOL = 1e-4
STEPS = 8

CASES = {
    # One concept, reference defaults for everything but the warm-up (10 would outlast 8 steps).
    "one-concept": dict(concepts=[dict(prompt="red", warmup_steps=2)]),
    # Mixed directions, warm-ups, thresholds, weights, a cool-down; no momentum. The warm-ups differ,
    # so steps 1-3 take the reference's "some concepts warmed up" branch (normalised weights).
    "mixed": dict(
        concepts=[
            dict(prompt="red", guidance_scale=6, warmup_steps=1, threshold=0.9, weight=1.0),
            dict(prompt="a blue square", reverse=True, guidance_scale=4, warmup_steps=3, threshold=0.7, weight=2.0,
                 cooldown_steps=6),
            dict(prompt="circle", guidance_scale=3, warmup_steps=0, threshold=0.5, weight=0.5),
        ],
        momentum_scale=0.0,
    ),
    # The same with momentum: it builds up from step 0 and is applied once every concept is warm.
    "momentum": dict(
        concepts=[
            dict(prompt="red", guidance_scale=6, warmup_steps=1, threshold=0.9, weight=1.0),
            dict(prompt="a blue square", reverse=True, guidance_scale=4, warmup_steps=3, threshold=0.7, weight=2.0,
                 cooldown_steps=6),
            dict(prompt="circle", guidance_scale=3, warmup_steps=0, threshold=0.5, weight=0.5),
        ],
        momentum_scale=0.4,
        momentum_beta=0.6,
    ),
}


def reference_kwargs(sega: Sega) -> dict:
    """Our settings as SemanticStableDiffusionPipeline arguments (written out independently of the plugin)."""
    s = sega.settings
    cs = s.concepts
    return dict(
        editing_prompt=[c.prompt for c in cs],
        reverse_editing_direction=[c.reverse for c in cs],
        edit_guidance_scale=[c.guidance_scale for c in cs],
        edit_warmup_steps=[c.warmup_steps for c in cs],
        # The reference compares the step index with each list entry, so "never" is a large number.
        edit_cooldown_steps=[10**6 if c.cooldown_steps is None else c.cooldown_steps for c in cs],
        edit_threshold=[c.threshold for c in cs],
        edit_momentum_scale=s.momentum_scale,
        edit_mom_beta=s.momentum_beta,
        edit_weights=[c.weight for c in cs],
    )


@pytest.fixture(scope="module")
def pipes(tiny_sd1, tiny_sd2):
    out = {}
    for kind, folder in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        ref = diffusers_pipeline(folder, "SemanticStableDiffusionPipeline", "DDIMScheduler")
        out[kind] = (ref, Pipeline.from_pretrained(folder, scheduler="ddim"))
    return out


def run_both(pipes, kind, sega, output_type="latent", **kw):
    ref, mine = pipes[kind]
    args = dict(prompt="a circle", num_inference_steps=STEPS, guidance_scale=7.5, output_type=output_type)
    args.update(kw)
    expected = ref(generator=torch.Generator().manual_seed(0), **args, **reference_kwargs(sega)).images
    got = mine(generator=torch.Generator().manual_seed(0), plugins=[sega], **args).images
    return expected, got


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_latents_match_diffusers(pipes, kind, case):
    expected, got = run_both(pipes, kind, Sega(**CASES[case]))
    plain = pipes[kind][1]("a circle", num_inference_steps=STEPS, seed=0, output_type="latent").images
    d, effect = max_abs_diff(expected, got), max_abs_diff(plain, got)
    print(f"{kind} {case}: max|Δ| vs diffusers = {d:.2e} (SEGA moved the latents by {effect:.2e})")
    assert d <= TOL
    assert effect > 100 * TOL  # the comparison is not vacuous: SEGA changed the result


BATCH = dict(
    prompt=["a circle", "a green triangle"], negative_prompt=["yellow", "white background"],
    num_images_per_prompt=2, height=24, width=40,
)


def test_batch_negative_prompt_nonsquare_match_diffusers(pipes):
    """Two prompts x two images, negative prompts, 24x40: every image's concept rows line up.

    Thresholds are 0 here (every entry kept) so the comparison is continuous in the UNet outputs; the
    thresholded math on this batch is compared exactly below, on the reference's own predictions.
    """
    settings = CASES["momentum"]
    sega = Sega(**{**settings, "concepts": [{**c, "threshold": 0.0} for c in settings["concepts"]]})
    for output_type in ("latent", "np"):
        expected, got = run_both(pipes, "sd1", sega, output_type=output_type, **BATCH)
        d = max_abs_diff(expected, got)
        print(f"batch 2x2, 24x40, negative prompts ({output_type}): max|Δ| = {d:.2e}")
        assert len(got) == 4 and tuple(got.shape[1:]) == ((4, 12, 20) if output_type == "latent" else (24, 40, 3))
        assert d <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_math_matches_diffusers_on_its_own_predictions(pipes, case):
    """sega_step on the reference's recorded UNet outputs gives the reference's recorded guidance.

    End to end, the thresholding is discontinuous: the reference keeps entries ``>=`` a quantile of
    the magnitudes, and float32 often ties two entries at the cut (differences of UNet outputs near
    1 are multiples of ~1e-7), so a last-bit difference between two UNets can flip one entry. Fed the
    same predictions, the two implementations must agree to rounding, ties included.
    """
    ref = pipes["sd1"][0]
    sega = Sega(**CASES[case])
    ref(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, guidance_scale=7.5,
        output_type="latent", **BATCH, **reference_kwargs(sega))
    momentum, worst = None, 0.0
    for i in range(STEPS):
        term, momentum = sega_step(sega.settings, i, ref.uncond_estimates[i], list(ref.edit_estimates[i]), momentum)
        applied = torch.zeros_like(ref.uncond_estimates[i]) if term is None else term
        worst = max(worst, max_abs_diff(applied, ref.sem_guidance[i]))
    print(f"{case}: step math vs diffusers' sem_guidance, max|Δ| = {worst:.2e}")
    assert worst <= 1e-6


def test_from_diffusers_builds_the_same_settings():
    sega = Sega(**CASES["mixed"])
    kwargs = reference_kwargs(sega)
    kwargs["edit_cooldown_steps"] = [c.cooldown_steps or 10**6 for c in sega.settings.concepts]
    again = Sega.from_diffusers(**kwargs)
    for a, b in zip(again.settings.concepts, sega.settings.concepts):
        assert a.model_dump(exclude={"cooldown_steps"}) == b.model_dump(exclude={"cooldown_steps"})
    assert Sega.from_diffusers("red").settings == Sega(concepts=["red"]).settings  # same defaults
