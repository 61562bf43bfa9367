"""Parity with diffusers 0.42.1's StableDiffusionControlNetPipeline (one ControlNet and a list of them) on the
same tiny random weights, fp32, DDIM: the output latents agree to max |Δ| <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from diffsteer.pipeline import Pipeline
from diffsteer.testing import diffusers_pipeline, max_abs_diff
from diffsteer_controlnet import ControlNet

TOL = 1e-4
STEPS = 6
SIZE = 32  # pixels: the tiny UNet's 16x16 latents times the tiny VAE's factor 2


def reference(sd_folder, controlnet_folders):
    """diffusers' ControlNet pipeline on the tiny SD folder; a list of folders makes a multi-ControlNet."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = diffusers_pipeline(sd_folder, scheduler="DDIMScheduler")
    nets = [ControlNetModel.from_pretrained(f) for f in controlnet_folders]
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=nets if len(nets) > 1 else nets[0], scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_sd1, tiny_sd2, tiny_controlnets):
    return {
        "sd1": (reference(tiny_sd1, [tiny_controlnets["sd1", 0]]), Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")),
        "sd2": (reference(tiny_sd2, [tiny_controlnets["sd2", 0]]), Pipeline.from_pretrained(tiny_sd2, scheduler="ddim")),
        "multi": (
            reference(tiny_sd1, [tiny_controlnets["sd1", 0], tiny_controlnets["sd1", 1]]),
            Pipeline.from_pretrained(tiny_sd1, scheduler="ddim"),
        ),
    }


CASES = {
    "scale": dict(conditioning_scale=0.7),
    "guess-mode": dict(conditioning_scale=1.3, guess_mode=True),
    "start-end": dict(conditioning_scale=1.0, control_guidance_start=0.2, control_guidance_end=0.7),
}
COMMON = dict(prompt="a red circle", num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")


def run_pair(ref, mine, plugins, ref_kwargs, **kw):
    args = {**COMMON, **kw}
    expected = ref(generator=torch.Generator().manual_seed(0), **args, **ref_kwargs).images
    got = mine(generator=torch.Generator().manual_seed(0), plugins=plugins, **args).images
    plain = mine(generator=torch.Generator().manual_seed(0), **args).images
    return max_abs_diff(expected, got), max_abs_diff(plain, got)


def single_kwargs(image, s: dict) -> dict:
    """Our settings as the reference pipeline's arguments (written out independently of the plugin)."""
    return dict(
        image=image, controlnet_conditioning_scale=s.get("conditioning_scale", 1.0), guess_mode=s.get("guess_mode", False),
        control_guidance_start=s.get("control_guidance_start", 0.0), control_guidance_end=s.get("control_guidance_end", 1.0),
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_controlnet_matches_diffusers(pipes, tiny_controlnets, make_control, kind, case):
    image = make_control(1, SIZE, seed=1)
    settings = CASES[case]
    cn = ControlNet(model=str(tiny_controlnets[kind, 0]), image=image, **settings)
    d, effect = run_pair(*pipes[kind], [cn], single_kwargs(image, settings), guidance_scale=7.5)
    print(f"{kind} {case}: max|Δ| vs diffusers = {d:.2e} (the ControlNet moved the latents by {effect:.2e})")
    assert d <= TOL
    assert effect > 100 * TOL  # not vacuous: the residuals changed the result


@pytest.mark.parametrize("guess_mode", [False, True])
def test_without_cfg_matches_diffusers(pipes, tiny_controlnets, make_control, guess_mode):
    """guidance_scale 1: one branch; in guess mode the ControlNet then runs on every row (no uncond to skip)."""
    image = make_control(1, SIZE, seed=2)
    settings = dict(conditioning_scale=0.9, guess_mode=guess_mode)
    cn = ControlNet(model=str(tiny_controlnets["sd1", 0]), image=image, **settings)
    d, effect = run_pair(*pipes["sd1"], [cn], single_kwargs(image, settings), guidance_scale=1.0)
    print(f"no CFG, guess_mode={guess_mode}: max|Δ| = {d:.2e} (effect {effect:.2e})")
    assert d <= TOL and effect > 100 * TOL


def test_batch_per_prompt_images_match_diffusers(pipes, tiny_controlnets, make_control):
    """Two prompts x two images with one control image per prompt and negative prompts."""
    images = make_control(2, SIZE, seed=3)
    cn = ControlNet(model=str(tiny_controlnets["sd1", 0]), image=list(images), conditioning_scale=0.8)
    d, effect = run_pair(
        *pipes["sd1"], [cn], single_kwargs(images, dict(conditioning_scale=0.8)), guidance_scale=6.0,
        prompt=["a red circle", "a blue square"], negative_prompt=["green", "white background"], num_images_per_prompt=2,
    )
    print(f"batch 2x2, per-prompt control images: max|Δ| = {d:.2e} (effect {effect:.2e})")
    assert d <= TOL and effect > 100 * TOL


@pytest.mark.parametrize("guess_mode", [False, True])
def test_multi_controlnet_matches_diffusers(pipes, tiny_controlnets, make_control, guess_mode):
    """Two plugin instances = diffusers' MultiControlNetModel: own images, scales and start/end windows."""
    a, b = make_control(1, SIZE, seed=4), make_control(1, SIZE, seed=5)
    first = dict(conditioning_scale=0.6, control_guidance_start=0.0, control_guidance_end=0.8)
    second = dict(conditioning_scale=1.2, control_guidance_start=0.3, control_guidance_end=1.0)
    plugins = [
        ControlNet(model=str(tiny_controlnets["sd1", 0]), image=a, guess_mode=guess_mode, **first),
        ControlNet(model=str(tiny_controlnets["sd1", 1]), image=b, guess_mode=guess_mode, **second),
    ]
    ref_kwargs = dict(
        image=[a, b], controlnet_conditioning_scale=[0.6, 1.2], guess_mode=guess_mode,
        control_guidance_start=[0.0, 0.3], control_guidance_end=[0.8, 1.0],
    )
    d, effect = run_pair(*pipes["multi"], plugins, ref_kwargs, guidance_scale=7.5)
    print(f"multi-ControlNet, guess_mode={guess_mode}: max|Δ| = {d:.2e} (effect {effect:.2e})")
    assert d <= TOL and effect > 100 * TOL
