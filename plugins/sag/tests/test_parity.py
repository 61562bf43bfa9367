"""Parity with diffusers 0.42.1's StableDiffusionSAGPipeline on the same tiny random weights (fp32).

SD 1.x-like (epsilon) and SD 2.x-like (v-prediction, zero terminal SNR, trailing timesteps) models, with
and without classifier-free guidance, a batch of several prompts and images, and the other samplers the
reference accepts. The reference runs its degraded pass without ``scale_model_input``; that is the
identity for all of them, so the comparison is exact math.
"""

from __future__ import annotations

import pytest
import torch

from diffsteer.pipeline import Pipeline
from diffsteer.testing import diffusers_pipeline, max_abs_diff
from diffsteer_sag import Sag, attended_keys, degrade, gaussian_blur_2d

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOL = 1e-4
STEPS = 8


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sd2):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2}


def pipes(folders, kind, ours="ddim", theirs="DDIMScheduler", **scheduler_config):
    ref = diffusers_pipeline(folders[kind], "StableDiffusionSAGPipeline", theirs, **scheduler_config)
    return ref, Pipeline.from_pretrained(folders[kind], scheduler=ours, **scheduler_config)


def run_both(ref, mine, sag_scale=0.75, **kw):
    args = dict(prompt="a circle", num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent")
    args.update(kw)
    expected = ref(generator=torch.Generator().manual_seed(0), sag_scale=sag_scale, **args).images
    got = mine(generator=torch.Generator().manual_seed(0), plugins=[Sag(sag_scale=sag_scale)], **args).images
    plain = mine(generator=torch.Generator().manual_seed(0), **args).images
    return expected, got, plain


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_latents_match_diffusers(folders, kind, guidance_scale):
    ref, mine = pipes(folders, kind)
    expected, got, plain = run_both(ref, mine, guidance_scale=guidance_scale)
    d, effect = max_abs_diff(expected, got), max_abs_diff(plain, got)
    print(f"{kind} guidance {guidance_scale}: max|Δ| vs diffusers = {d:.2e} (SAG moved the latents by {effect:.2e})")
    assert d <= TOL
    assert effect > 100 * TOL  # the comparison is not vacuous: SAG changed the result


BATCH = dict(
    prompt=["a circle", "a green triangle"], negative_prompt=["yellow", "white background"],
    num_images_per_prompt=2, height=24, width=40,
)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_batch_negative_prompt_nonsquare_match_diffusers(folders, kind, guidance_scale):
    """Two prompts x two images at 24x40 (a 6x10 mid-block map): every image gets its own mask and rows."""
    ref, mine = pipes(folders, kind)
    for output_type in ("latent", "np"):
        expected, got, plain = run_both(ref, mine, sag_scale=1.0, guidance_scale=guidance_scale,
                                        output_type=output_type, **BATCH)
        d = max_abs_diff(expected, got)
        print(f"{kind} batch 2x2, 24x40, guidance {guidance_scale} ({output_type}): max|Δ| = {d:.2e}, "
              f"SAG effect {max_abs_diff(plain, got):.2e}")
        assert len(got) == 4 and tuple(got.shape[1:]) == ((4, 12, 20) if output_type == "latent" else (24, 40, 3))
        assert d <= TOL


@pytest.mark.parametrize(
    "ours, theirs, config",
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
        ("ddpm", "DDPMScheduler", {}),
        # Our PNDM defaults to skipping the Runge-Kutta warm-up, diffusers' does not: pin it for both.
        ("pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    ],
)
def test_other_samplers_match_diffusers(folders, ours, theirs, config):
    ref, mine = pipes(folders, "sd1", ours, theirs, **config)
    expected, got, plain = run_both(ref, mine, sag_scale=1.0, prompt=["a circle", "a square"])
    d = max_abs_diff(expected, got)
    print(f"{ours}: max|Δ| vs diffusers = {d:.2e} (SAG moved the latents by {max_abs_diff(plain, got):.2e})")
    assert d <= TOL


def test_zero_scale_is_plain_generation(folders):
    ref, mine = pipes(folders, "sd1")
    expected, got, plain = run_both(ref, mine, sag_scale=0.0)
    assert torch.equal(got, plain)  # no observer, no extra pass: the fused path, bit for bit
    assert max_abs_diff(expected, got) <= TOL


def test_masking_matches_the_reference_sag_masking(folders):
    """The mask, blur and re-noising on the same inputs, against the reference's own ``sag_masking``."""
    ref, mine = pipes(folders, "sd2")
    ref.scheduler.set_timesteps(STEPS)
    sched = mine.scheduler.fresh()
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(3)
    b, heads, (h, w) = 3, ref.unet.config.attention_head_dim[-1], (16, 16)
    x0, eps = torch.randn(b, 4, h, w, generator=g), torch.randn(b, 4, h, w, generator=g)
    probs = torch.randn(b, heads, 64, 64, generator=g).mul(3).softmax(-1)  # an 8x8 mid-block map
    t = sched.timesteps[2]
    expected = ref.sag_masking(x0, probs.reshape(b * heads, 64, 64), (8, 8), t, eps)
    keys = attended_keys(probs)
    got = sched.renoise(degrade(x0, keys, kernel_size=9, sigma=1.0), eps, t)
    print(f"{int(keys.sum())} of {keys.numel()} positions attended; max|Δ| = {max_abs_diff(expected, got):.2e}")
    assert 0 < keys.sum() < keys.numel()
    assert torch.equal(got, expected)


def test_blur_is_the_reference_blur():
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        gaussian_blur_2d as reference_blur,
    )

    x = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(0))
    for kernel, sigma in ((9, 1.0), (5, 0.5), (17, 2.0)):
        assert torch.equal(gaussian_blur_2d(x, kernel, sigma), reference_blur(x, kernel, sigma))
