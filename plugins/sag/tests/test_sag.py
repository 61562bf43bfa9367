"""The sag plugin on a tiny random model: its extra pass, per-call state, samplers, bad input, entry point, CLI."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import diffsteer_sag
from diffsteer import Plugin, PluginError, SettingsError, hookimpl
from diffsteer.cli import read_parameters
from diffsteer.pipeline import Pipeline
from diffsteer.testing import PlainCfg, max_abs_diff, run
from diffsteer_sag import Sag, map_size

TOL = 1e-4


@pytest.fixture
def pipe(tiny_pipe):
    """The fixture kit's tiny SD1 pipeline (DDIM), loaded once per session."""
    return tiny_pipe


class Passes(Plugin):
    """Records every UNet pass: its name, branches and rows."""

    name = "passes"

    def __init__(self, log):
        super().__init__()
        self.log = log

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        self.log.append((step.index, inputs.pass_name, list(inputs.layout.names), inputs.sample.shape[0]))


# -- the extra pass -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale, branch", [(7.5, "uncond"), (1.0, "cond")])
def test_one_extra_pass_per_step_over_the_degraded_branch(pipe, guidance_scale, branch):
    log = []
    run(pipe, [Sag(), Passes(log)], prompt=["a circle", "a square"], num_images_per_prompt=2,
        guidance_scale=guidance_scale)
    main = ["uncond", "cond"] if guidance_scale > 1 else ["cond"]
    expected = [(i, name, names, rows) for i in range(4)
                for name, names, rows in (("main", main, 4 * len(main)), ("sag", [branch], 4))]
    assert log == expected


def test_zero_scale_adds_no_pass_and_changes_nothing(pipe):
    log = []
    out = run(pipe, [Sag(sag_scale=0), Passes(log)])
    assert [p[1] for p in log] == ["main"] * 4
    assert torch.equal(out.images, run(pipe).images)
    assert "sag" not in out.extras


def test_sag_changes_the_result_in_proportion_to_its_scale(pipe):
    plain = run(pipe).images
    small = max_abs_diff(run(pipe, [Sag(sag_scale=0.1)], num_inference_steps=1).images,
                         run(pipe, num_inference_steps=1).images)
    double = max_abs_diff(run(pipe, [Sag(sag_scale=0.2)], num_inference_steps=1).images,
                          run(pipe, num_inference_steps=1).images)
    print(f"one step: SAG 0.1 moves the latents by {small:.3e}, 0.2 by {double:.3e}")
    assert double == pytest.approx(2 * small, rel=1e-3)  # one step: the term is linear in sag_scale
    assert max_abs_diff(run(pipe, [Sag()]).images, plain) > 1e-2


def test_masks_are_reported_per_step_and_image(pipe):
    out = run(pipe, [Sag()], prompt=["a circle", "a square"], height=24, width=40)
    masks = out.extras["sag"]["masks"]
    assert masks.dtype == torch.bool and masks.shape == (4, 2, 6, 10)  # (steps, images, mid-block h, w)
    fraction = masks.float().mean().item()
    print(f"blurred fraction of the latents: {fraction:.2f}")
    assert 0 < fraction < 1


def test_map_size_follows_the_down_blocks():
    assert map_size((16, 16), 64) == (8, 8)
    assert map_size((12, 20), 60) == (6, 10)
    assert map_size((15, 9), 40) == (8, 5)  # odd sizes round up, like the stride-2 convolutions
    assert map_size((64, 64), 64) == (8, 8)  # SD 1.5 at 512 px
    with pytest.raises(ValueError, match="no halving"):
        map_size((16, 16), 50)


class Peek(Plugin):
    """Runs extra UNet passes of its own on other latents, before and after the main pass."""

    name = "peek"

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        call.predict(step.latents * 0.5, step.timestep, call.layout.subset(["cond"]), pass_name="peek-before")

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        noise = torch.randn(step.latents.shape, generator=torch.Generator().manual_seed(step.index))
        call.predict(noise, step.timestep, pass_name="peek-after")  # all branches, other attention


def test_attention_of_other_passes_is_ignored(pipe):
    """Only the main pass's attention makes the mask, whatever passes other plugins run around it."""
    alone = run(pipe, [Sag()])
    peeked = run(pipe, [Peek(), Sag()])
    assert torch.equal(peeked.images, alone.images)
    assert torch.equal(peeked.extras["sag"]["masks"], alone.extras["sag"]["masks"])


def test_one_instance_serves_two_calls_alike_and_concurrently(pipe):
    sag = Sag(sag_scale=1.0)
    first = [run(pipe, [sag], prompt=p).images for p in ("a circle", "a green square")]
    assert torch.equal(run(pipe, [sag], prompt="a circle").images, first[0])  # no state left from a call
    results = {}

    def work(p):
        results[p] = run(pipe, [sag], prompt=p).images

    threads = [threading.Thread(target=work, args=(p,)) for p in ("a circle", "a green square")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results["a circle"], first[0]) and torch.equal(results["a green square"], first[1])


def test_two_instances_add_up(pipe):
    """Two Sag plugins see the same attention and degrade alike: their terms sum to one of the summed scale."""
    log = []
    two = run(pipe, [Sag(sag_scale=0.3), Sag(sag_scale=0.5), Passes(log)])
    one = run(pipe, [Sag(sag_scale=0.8)])
    assert set(two.extras) == {"sag", "sag#2"}
    assert [p[1] for p in log[:3]] == ["main", "sag", "sag"]
    d = max_abs_diff(two.images, one.images)
    print(f"Sag(0.3) + Sag(0.5) vs Sag(0.8): max|Δ| = {d:.2e}")
    assert d <= TOL


def test_term_is_added_on_top_of_a_replaced_guidance_formula(pipe):
    assert max_abs_diff(run(pipe, [PlainCfg(), Sag()]).images, run(pipe, [Sag()]).images) <= 1e-6


# -- samplers, img2img, precision -------------------------------------------------------------------------


SAMPLERS = ["ddim", "ddpm", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sag_is_consistent_with_every_sampler(request, kind, sampler, monkeypatch):
    """With the blur switched off, the degraded sample is the sample itself, so SAG must add nothing.

    That holds only if the x0 / noise split and the re-noising use the sampler's own sample space
    (Euler keeps x0 + sigma * eps, DDIM sqrt(abar) x0 + sqrt(1 - abar) eps) and the extra pass scales
    its input like the main pass. The reference refuses the sigma samplers (float timesteps).
    """
    pipe = Pipeline.from_pretrained(request.getfixturevalue(f"tiny_{kind}"), scheduler=sampler)
    kw = dict(num_inference_steps=5, prompt=["a circle", "a square"])
    plain, sag = run(pipe, **kw).images, run(pipe, [Sag(sag_scale=1.0)], **kw).images
    assert torch.isfinite(sag).all()
    effect = max_abs_diff(sag, plain)
    monkeypatch.setattr(diffsteer_sag, "degrade", lambda x0, keys, kernel_size, sigma: x0)
    identity = max_abs_diff(run(pipe, [Sag(sag_scale=1.0)], **kw).images, plain)
    scale = float(plain.abs().max())
    print(f"{kind} {sampler}: SAG moves the latents by {effect:.3e}; without the blur by {identity:.1e} "
          f"(latents up to {scale:.1f})")
    assert effect > 1e-2 * scale
    # float32 rounding only (largest under zero terminal SNR, where Euler starts at sigma ~4096); a split or
    # re-noising in the wrong sample space moves the latents by about as much as SAG itself.
    assert identity <= 1e-4 * max(scale, 1.0) and identity <= 1e-3 * effect


def test_img2img(pipe):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = run(pipe, image=image, strength=0.6, num_inference_steps=5).images
    out = run(pipe, [Sag()], image=image, strength=0.6, num_inference_steps=5)
    assert out.extras["sag"]["masks"].shape[0] == 3  # the 3 steps img2img runs
    assert max_abs_diff(out.images, plain) > 1e-3


def test_bf16_runs_and_stays_close_to_fp32(tiny_sd1, pipe):
    bf16 = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", torch_dtype=torch.bfloat16)
    low, full = run(bf16, [Sag()]).images, run(pipe, [Sag()]).images
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert max_abs_diff(low, full) < 0.1 * float(full.abs().max())


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(sag_scale=-0.5), r"sag\.sag_scale"),
        (dict(sag_scale=float("nan")), r"sag\.sag_scale"),
        (dict(sag_scale="strong"), r"sag\.sag_scale"),
        (dict(blur_sigma=0), r"sag\.blur_sigma"),
        (dict(blur_sigma=20), r"sag\.blur_sigma"),
        (dict(scale=1.0), r"sag\.scale: Extra inputs"),
    ],
)
def test_bad_settings_name_plugin_and_field(settings, field):
    with pytest.raises(SettingsError, match=field):
        Sag(**settings)


def test_latents_too_small_for_the_blur(pipe):
    log = []
    with pytest.raises(PluginError, match=r"plugin 'sag': the latents are 4x4, too small for a 9x9 blur"):
        run(pipe, [Sag(), Passes(log)], height=8, width=8)
    assert log == []  # refused before the first UNet pass
    assert torch.isfinite(run(pipe, [Sag(blur_sigma=0.5)], height=16, width=16).images).all()  # 5x5 on 8x8


def test_a_unet_without_mid_block_self_attention_is_refused(tiny_sd1, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    layers = [n for n in pipe.unet.attention_layers() if not n.startswith("mid_block")]
    monkeypatch.setattr(pipe.unet, "attention_layers", lambda: layers)
    with pytest.raises(PluginError, match=r"plugin 'sag': .*mid-block self-attention, and this UNet has none"):
        run(pipe, [Sag()])


# -- entry point and CLI -------------------------------------------------------------------------------------


def test_loads_by_entry_point_name(pipe):
    by_name = run(pipe, [("sag", {"sag_scale": 1.25})]).images
    assert torch.equal(by_name, run(pipe, [Sag(sag_scale=1.25)]).images)
    assert torch.equal(run(pipe, ["sag"]).images, run(pipe, [Sag()]).images)  # default settings


def test_cli_runs_sag_and_records_its_settings(tiny_sd1, tmp_path):
    def generate(out, *extra):
        cmd = [sys.executable, "-m", "diffsteer.cli", "generate", "a circle", "--model", str(tiny_sd1),
               "--steps", "4", "--seed", "0", "-o", str(out), "-q", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    res = generate(tmp_path / "sag.png", "--plugin", "sag", "--set", "sag.sag_scale=1.0")
    assert res.returncode == 0, res.stderr
    plugins = read_parameters(tmp_path / "sag.png")["plugins"]
    assert plugins == [{"name": "sag", "settings": {"sag_scale": 1.0, "blur_sigma": 1.0}}]

    bad = generate(tmp_path / "bad.png", "--plugin", "sag", "--set", "sag.sag_scale=-1")
    assert bad.returncode == 2 and "sag.sag_scale" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.png").exists()
