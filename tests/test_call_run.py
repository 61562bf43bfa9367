"""The call owns the run: timesteps before setup, a window plugins may narrow, and the call's latent-space services."""

from __future__ import annotations

import pytest
import torch

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.call import UNetInputs
from diffsteer.testing.doubles import run as shared_run


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 4, **kw}).images


def init_image(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, pipe.default_size, pipe.default_size, generator=g) * 2 - 1


class Inspect(Plugin):
    """Records what setup sees of the run, and the timesteps the loop then runs."""

    name = "inspect"

    def __init__(self, narrow=None, touch_init=False):
        super().__init__()
        self.narrow, self.touch_init = narrow, touch_init
        self.seen: dict = {}

    @hookimpl
    def diffsteer_setup(self, call):
        if self.narrow is not None:
            call.narrow_steps(self.name, self.narrow)
        self.seen.update(
            setup_timesteps=call.timesteps.tolist(), num_steps=call.num_steps, latent_shape=call.latent_shape,
            vae_scale_factor=call.vae_scale_factor,
        )
        if self.touch_init:
            self.seen["init_latents"] = call.init_latents.clone()
        self.seen["loop"] = []

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        self.seen["loop"].append((int(step.timestep), step.num_steps))


def test_setup_sees_the_timesteps_and_geometry_the_loop_uses(tiny_pipe):
    txt = Inspect()
    run(tiny_pipe, [txt])
    assert txt.seen["num_steps"] == 4 and [t for t, _ in txt.seen["loop"]] == txt.seen["setup_timesteps"]
    assert all(n == 4 for _, n in txt.seen["loop"])
    f = tiny_pipe.vae_scale_factor
    size = tiny_pipe.default_size
    assert txt.seen["vae_scale_factor"] == f
    assert txt.seen["latent_shape"] == (1, tiny_pipe.unet.config.out_channels, size // f, size // f)

    img = Inspect()
    run(tiny_pipe, [img], image=init_image(tiny_pipe), strength=0.5, num_images_per_prompt=2)
    assert img.seen["num_steps"] == 2  # img2img's window is set before setup
    assert img.seen["setup_timesteps"] == txt.seen["setup_timesteps"][2:]
    assert [t for t, _ in img.seen["loop"]] == img.seen["setup_timesteps"]
    assert img.seen["latent_shape"][0] == 2


def test_a_plugin_narrows_the_window_in_setup_and_the_narrowest_wins(tiny_pipe):
    image = init_image(tiny_pipe)
    plain_half = run(tiny_pipe, image=image, strength=0.5)
    narrowed = Inspect(narrow=0.5)
    # img2img asks for 0.75 (3 steps), the plugin for 0.5 (2 steps): the run is img2img at strength 0.5
    out = run(tiny_pipe, [narrowed], image=image, strength=0.75)
    assert narrowed.seen["num_steps"] == 2 and len(narrowed.seen["loop"]) == 2
    assert torch.equal(out, plain_half)
    wider = Inspect(narrow=0.9)  # wider than img2img's window: img2img's stays
    assert torch.equal(run(tiny_pipe, [wider], image=image, strength=0.5), plain_half)
    assert wider.seen["num_steps"] == 2

    txt = Inspect(narrow=0.25)  # txt2img: the last quarter of the schedule
    run(tiny_pipe, [txt])
    full = Inspect()
    run(tiny_pipe, [full])
    assert txt.seen["setup_timesteps"] == full.seen["setup_timesteps"][3:]


def test_narrowing_outside_setup_or_to_nothing_is_refused(tiny_pipe):
    class Late(Plugin):
        name = "late"

        @hookimpl
        def diffsteer_pre_step(self, call, step):
            call.narrow_steps(self.name, 0.5)

    with pytest.raises(PluginError, match="'late': can narrow the denoising steps only in diffsteer_setup"):
        run(tiny_pipe, [Late()])
    with pytest.raises(PluginError, match=r"'inspect': strength=0.1 leaves no denoising steps out of 4"):
        run(tiny_pipe, [Inspect(narrow=0.1)])
    with pytest.raises(PluginError, match=r"'inspect': strength must lie in \(0, 1\], got 0"):
        run(tiny_pipe, [Inspect(narrow=0)])


def test_init_latents_are_a_service_that_keeps_the_random_stream(tiny_pipe):
    image = init_image(tiny_pipe)
    plain = run(tiny_pipe, image=image, strength=0.5)
    early = Inspect(touch_init=True)
    # encoded in setup instead of before the first step: the same draws in the same order
    assert torch.equal(run(tiny_pipe, [early], image=image, strength=0.5), plain)
    g = torch.Generator().manual_seed(0)
    expected = tiny_pipe.encode_images(image, generator=g)
    assert torch.equal(early.seen["init_latents"], expected)


def test_vae_services_match_the_pipeline_and_the_posterior_mean(tiny_pipe):
    got: dict = {}

    class Codec(Plugin):
        name = "codec"

        @hookimpl
        def diffsteer_setup(self, call):
            pixels = init_image(tiny_pipe)
            got["mean"] = call.encode_images(pixels, sample=False)
            got["decoded"] = call.decode_latents(got["mean"])
            got["pixels"] = pixels

    run(tiny_pipe, [Codec()], num_inference_steps=1)
    vae = tiny_pipe.vae
    mean = vae.encode(got["pixels"]).mean.float() * vae.config.scaling_factor
    assert torch.equal(got["mean"], mean)
    assert torch.equal(got["decoded"], tiny_pipe.decode_latents(mean))


def test_sega_and_sag_refuse_in_setup_before_any_unet_pass(tiny_pipe, monkeypatch):
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega

    passes = []
    original = UNetInputs.run
    monkeypatch.setattr(UNetInputs, "run", lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    # img2img at 0.5 runs 2 of 4 steps: a warm-up of 3 never applies
    with pytest.raises(PluginError, match="'sega': concept 0 .*warmup_steps=3 but this call runs 2 steps"):
        run(tiny_pipe, [Sega(concepts=[{"prompt": "red", "warmup_steps": 3}])], image=init_image(tiny_pipe), strength=0.5)
    with pytest.raises(PluginError, match="'sag': the latents are .*too small"):
        run(tiny_pipe, [Sag(blur_sigma=8)])
    assert passes == []
    run(tiny_pipe, [Sega(concepts=[{"prompt": "red", "warmup_steps": 1}])], num_inference_steps=2)
    assert passes  # the UNet passes of generation go through UNetInputs.run, as training's do
