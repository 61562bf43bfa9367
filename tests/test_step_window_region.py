"""The two settings every plugin has, applied by the core: a step window and a region."""

from __future__ import annotations

import pytest
import torch

from diffsteer import AttentionPatch, Plugin, PluginError, SettingsError, hookimpl
from diffsteer.plugins import resolve_plugins
from diffsteer.testing.doubles import run as shared_run


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 4, **kw}).images


class Busy(Plugin):
    """Records the step of every per-step hook it gets, and observes the cross-attention."""

    name = "busy"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list = []

    @hookimpl
    def diffsteer_attention_patches(self, call, register):
        register(AttentionPatch(self.name, "mid_block.*attn2", observe=lambda layer, p: self.log.append(("attn", call.step.index))))

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        self.log.append(("pre", step.index))

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        self.log.append(("inputs", step.index))

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        self.log.append(("pred", step.index))

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        self.log.append(("guidance", step.index))

    @hookimpl
    def diffsteer_post_step(self, call, step):
        self.log.append(("post", step.index))


def test_a_plugin_acts_only_inside_its_step_window(tiny_pipe):
    full, windowed = Busy(), Busy(window_start=0.25, window_end=0.75)
    run(tiny_pipe, [full, windowed])
    assert {i for _, i in full.log} == {0, 1, 2, 3}
    assert {i for _, i in windowed.log} == {1, 2}  # of 4 steps: i/4 >= 0.25 and (i+1)/4 <= 0.75
    kinds = {k for k, _ in windowed.log}
    assert kinds == {"attn", "pre", "inputs", "pred", "guidance", "post"}  # every per-step hook, patches too


class Push(Plugin):
    """A constant guidance term."""

    name = "push"

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        return torch.full_like(predictions["cond"], 0.5)


class PushBySteps(Push):
    name = "push-by-steps"

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        return torch.full_like(predictions["cond"], 0.5) if step.index in self.steps else None


def test_the_window_equals_the_plugin_skipping_those_steps_itself(tiny_pipe):
    assert torch.equal(run(tiny_pipe, [Push(window_start=0.5)]), run(tiny_pipe, [PushBySteps({2, 3})]))
    assert torch.equal(run(tiny_pipe, [Push(window_end=0.5)]), run(tiny_pipe, [PushBySteps({0, 1})]))


def left_half(pipe) -> torch.Tensor:
    size = pipe.default_size
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1.0
    return mask


class Shift(Plugin):
    name = "shift"

    @hookimpl
    def diffsteer_post_step(self, call, step):
        step.latents = step.latents + 1.0


def test_a_region_confines_guidance_terms_and_latent_edits(tiny_pipe):
    base = run(tiny_pipe, num_inference_steps=1)
    half = tiny_pipe.default_size // tiny_pipe.vae_scale_factor // 2
    for plugin in (Push(region=left_half(tiny_pipe)), Shift(region=left_half(tiny_pipe))):
        diff = (run(tiny_pipe, [plugin], num_inference_steps=1) - base).abs()
        assert float(diff[..., half:].max()) == 0.0, plugin.name  # outside the region: untouched
        assert float(diff[..., :half].min()) > 0.0, plugin.name
    shifted = run(tiny_pipe, [Shift(region=left_half(tiny_pipe))], num_inference_steps=1)
    assert torch.allclose(shifted[..., :half] - base[..., :half], torch.ones(1), atol=1e-6)


def test_a_region_confines_residuals_at_their_resolution(tiny_pipe):
    seen = {}

    class Mid(Plugin):
        name = "mid"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            n, _, h, w = inputs.sample.shape
            inputs.add_residuals(self.name, mid=torch.ones(n, 64, h // 2, w // 2))

    class Look(Plugin):
        name = "look"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            seen["mid"] = inputs.mid_residual.clone()

    run(tiny_pipe, [Mid(region=left_half(tiny_pipe)), Look()], num_inference_steps=1)
    mid = seen["mid"]
    w = mid.shape[-1]
    assert float(mid[..., : w // 2].min()) == 1.0 and float(mid[..., w // 2:].abs().max()) == 0.0


def test_sega_and_sag_confined_to_a_region(tiny_pipe):
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega

    half = tiny_pipe.default_size // tiny_pipe.vae_scale_factor // 2
    nowhere = torch.zeros(tiny_pipe.default_size, tiny_pipe.default_size)
    makers = (lambda region: Sega(concepts=[{"prompt": "blue", "warmup_steps": 0}], region=region),
              lambda region: Sag(sag_scale=2.0, blur_sigma=0.5, region=region))
    for make in makers:
        # an empty region runs the same UNet batches (SEGA's branch, SAG's explicit softmax) and changes nothing
        # one step: later UNet passes see the whole latent, so an edit inside the region spreads from there
        base = run(tiny_pipe, [make(nowhere)], num_inference_steps=1)
        plugin = make(left_half(tiny_pipe))
        diff = (run(tiny_pipe, [plugin], num_inference_steps=1) - base).abs()
        assert float(diff[..., half:].max()) == 0.0, plugin.name
        assert float(diff[..., :half].max()) > 1e-4, plugin.name


def test_effects_that_cannot_be_confined_refuse_a_region(tiny_pipe, tmp_path):
    from diffsteer_prompt_weighting import PromptWeighting
    from diffsteer_textual_inversion import TextualInversion, write_embedding

    region = left_half(tiny_pipe)
    with pytest.raises(PluginError, match="'prompt-weighting': cannot confine its prompt encoding"):
        run(tiny_pipe, [PromptWeighting(region=region)])
    path = tmp_path / "tok.safetensors"
    write_embedding(path, "<tok>", torch.zeros(tiny_pipe.text_encoder.config.hidden_size))
    with pytest.raises(PluginError, match="'textual-inversion': cannot confine added tokens"):
        run(tiny_pipe, [TextualInversion(embeddings=[path], region=region)], prompt="a <tok>")

    class EditAttention(Plugin):
        name = "edit-attention"

        @hookimpl
        def diffsteer_attention_patches(self, call, register):
            register(AttentionPatch(self.name, "*attn1", edit_output=lambda layer, out: out))

    with pytest.raises(PluginError, match=r"'edit-attention': cannot confine attention edits \(edit_output\)"):
        run(tiny_pipe, [EditAttention(region=region)])

    class Channels(Plugin):
        name = "channels"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            inputs.add_channels(self.name, inputs.sample[:, :1])

    with pytest.raises(PluginError, match="'channels': cannot confine extra input channels"):
        run(tiny_pipe, [Channels(region=region)])
    with pytest.raises(PluginError, match="'push': region is 8x8 but the call makes"):
        run(tiny_pipe, [Push(region=torch.ones(8, 8))])


def test_scope_settings_validate_record_and_replay():
    with pytest.raises(SettingsError, match=r"push\.window_start: window_start \(0.6\) must be smaller than window_end"):
        Push(window_start=0.6, window_end=0.5)
    with pytest.raises(SettingsError, match=r"push\.window_end: Input should be less than or equal to 1"):
        Push(window_end=1.5)
    with pytest.raises(SettingsError, match=r"push\.region: .*region file 'nope.png' does not exist"):
        Push(region="nope.png")
    with pytest.raises(SettingsError, match=r"push\.window_start: sets window_start again \(given as window_start too\)"):
        Push({"window_start": 0.1}, window_start=0.2)
    assert Push().settings_dict() == {}  # defaults are not recorded: old metadata stays as it was
    assert Push(window_start=0.25).settings_dict() == {"window_start": 0.25}

    from diffsteer_controlnet import ControlNet

    cn = ControlNet(model="x", image=torch.zeros(3, 8, 8), control_guidance_start=0.2, control_guidance_end=0.7)
    assert (cn.scope.window_start, cn.scope.window_end) == (0.2, 0.7)  # diffusers' names are the core window's
    recorded = cn.settings_dict()
    assert recorded["window_start"] == 0.2 and recorded["window_end"] == 0.7 and "control_guidance_start" not in recorded
    (again,) = resolve_plugins([("sega", {"concepts": ["red"], "window_start": 0.5})])
    assert again.scope.window_start == 0.5 and again.settings_dict()["window_start"] == 0.5


def test_a_plugin_may_not_reuse_a_scope_field_name():
    from pydantic import BaseModel

    class Clash(Plugin):
        name = "clash"

        class Settings(BaseModel):
            window_start: int = 0

    with pytest.raises(PluginError, match="'clash': its Settings define window_start"):
        Clash()


class CondOnly(Plugin):
    name = "cond-only"

    @hookimpl
    def diffsteer_combine_guidance(self, call, step, predictions):
        return predictions["cond"]


class Starts(Plugin):
    """Adds one to the initial latents."""

    name = "starts"

    @hookimpl
    def diffsteer_prepare_latents(self, call, latents):
        return latents + 1.0


class HalveCond(Plugin):
    name = "halve-cond"

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        predictions["cond"] = predictions["cond"] * 0.5


class FirstLatents(Plugin):
    name = "first-latents"

    def __init__(self):
        super().__init__()
        self.latents = None

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        if self.latents is None:
            self.latents = step.latents.clone()


def test_a_region_confines_a_formula_initial_latents_and_prediction_edits(tiny_pipe):
    half = tiny_pipe.default_size // tiny_pipe.vae_scale_factor // 2
    region = left_half(tiny_pipe)
    base = run(tiny_pipe, num_inference_steps=1)
    for make in (CondOnly, HalveCond):  # what a step's scheduler update receives is confined
        everywhere = run(tiny_pipe, [make()], num_inference_steps=1)
        confined = run(tiny_pipe, [make(region=region)], num_inference_steps=1)
        assert torch.equal(confined[..., half:], base[..., half:]), make.name
        assert torch.allclose(confined[..., :half], everywhere[..., :half], atol=1e-6), make.name

    plain, shifted = FirstLatents(), FirstLatents()
    run(tiny_pipe, [plain], num_inference_steps=1)
    run(tiny_pipe, [Starts(region=region), shifted], num_inference_steps=1)
    assert torch.equal(shifted.latents[..., half:], plain.latents[..., half:])
    assert torch.allclose(shifted.latents[..., :half], plain.latents[..., :half] + 1.0)
