"""The controlnet plugin's behaviour on tiny random models: residuals on every branch and every UNet pass,
guess mode's zero rows, the start/end window, per-call state, metadata, and errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffsteer import Plugin, PluginError, SettingsError, hookimpl
from diffsteer.commands import plugin_train_commands
from diffsteer_controlnet import ControlNet, ControlNetModel, load_controlnet

SIZE = 32
STEPS = 4


class Spy(Plugin):
    """Listed after the ControlNet(s): records, per UNet pass, the branches and the residual rows' magnitudes."""

    name = "spy"

    def __init__(self):
        super().__init__()
        self.passes = []

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        per_branch = {}
        for name in inputs.layout.names:
            rows = inputs.layout.rows(name)
            per_branch[name] = None if inputs.down_residuals is None else float(
                sum(d[rows].abs().sum() for d in inputs.down_residuals) + inputs.mid_residual[rows].abs().sum()
            )
        self.passes.append(dict(step=step.index, pass_name=inputs.pass_name, branches=per_branch))


class ExtraPass(Plugin):
    """Runs an extra UNet pass over the cond branch each step (as SAG's degraded pass does); adds nothing."""

    name = "extra-pass"

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        call.predict(step.latents, step.timestep, call.layout.subset(["cond"]), pass_name="degraded")
        return None


class Concept(Plugin):
    """Adds a guidance branch of its own (as SEGA does)."""

    name = "concept"

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        branches.add("concept", call.encode_per_image(["green"] * len(call.request.prompts)), owner=self.name)


@pytest.fixture
def pipe(tiny_pipe):
    """The fixture kit's tiny SD1 pipeline (DDIM), loaded once per session."""
    return tiny_pipe


@pytest.fixture(scope="module")
def net_folder(controlnet_for):
    return controlnet_for()


def run(pipe, plugins, **kw):
    args = dict(prompt="a red circle", num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=0, output_type="latent")
    args.update(kw)
    return pipe(plugins=plugins, **args).images


def test_residuals_follow_extra_branches_and_extra_passes(pipe, net_folder, make_control):
    spy = Spy()
    cn = ControlNet(model=str(net_folder), image=make_control(1, SIZE, 0))
    run(pipe, [Concept(), ExtraPass(), cn, spy])
    main = [p for p in spy.passes if p["pass_name"] == "main"]
    extra = [p for p in spy.passes if p["pass_name"] == "degraded"]
    assert len(main) == STEPS and len(extra) == STEPS
    assert all(set(p["branches"]) == {"uncond", "cond", "concept"} for p in main)
    assert all(v > 0 for p in main for v in p["branches"].values())
    assert all(list(p["branches"]) == ["cond"] and p["branches"]["cond"] > 0 for p in extra)


def test_each_branch_gets_residuals_from_its_own_text(pipe, net_folder, make_control):
    """The concept branch's residuals are the ControlNet's output for the concept's embeddings, not a copy of cond's."""
    seen = {}

    class Capture(Spy):
        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            if step.index == 0 and inputs.pass_name == "main":
                seen.update(sample=inputs.sample.clone(), t=inputs.timestep, hidden=inputs.encoder_hidden_states.clone(),
                            mid=inputs.mid_residual.clone(), layout=inputs.layout)

    image = make_control(1, SIZE, 0)
    run(pipe, [Concept(), ControlNet(model=str(net_folder), image=image), Capture()])
    net = load_controlnet(net_folder)
    _, mid = net(seen["sample"], seen["t"], seen["hidden"], image.repeat(3, 1, 1, 1))
    torch.testing.assert_close(seen["mid"], mid, rtol=0, atol=1e-6)
    layout = seen["layout"]
    assert not torch.allclose(mid[layout.rows("concept")], mid[layout.rows("cond")])


def test_guess_mode_leaves_uncond_without_residuals(pipe, net_folder, make_control):
    spy = Spy()
    run(pipe, [Concept(), ControlNet(model=str(net_folder), image=make_control(1, SIZE, 0), guess_mode=True), spy])
    for p in spy.passes:
        assert p["branches"]["uncond"] == 0
        assert p["branches"]["cond"] > 0 and p["branches"]["concept"] > 0


def test_start_end_window_selects_the_steps(pipe, net_folder, make_control):
    spy = Spy()
    cn = ControlNet(model=str(net_folder), image=make_control(1, SIZE, 0), control_guidance_start=0.25,
                    control_guidance_end=0.75)
    run(pipe, [cn, spy])
    active = [p["step"] for p in spy.passes if p["branches"]["cond"] is not None]
    assert active == [1, 2]  # of 4 steps: i/4 >= 0.25 and (i+1)/4 <= 0.75


def test_scale_zero_is_plain_generation_and_scale_matters(pipe, net_folder, make_control):
    image = make_control(1, SIZE, 0)
    plain = run(pipe, [])
    assert torch.equal(run(pipe, [ControlNet(model=str(net_folder), image=image, conditioning_scale=0.0)]), plain)
    a = run(pipe, [ControlNet(model=str(net_folder), image=image, conditioning_scale=0.5)])
    b = run(pipe, [ControlNet(model=str(net_folder), image=image, conditioning_scale=1.0)])
    assert float((a - plain).abs().max()) > 1e-3 and float((a - b).abs().max()) > 1e-3


def test_a_fresh_controlnet_changes_nothing(pipe, make_control):
    """The paper's zero convolutions: a ControlNet copied from the UNet adds exact zeros."""
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
    got = run(pipe, [ControlNet(controlnet=net, image=make_control(1, SIZE, 0))])
    assert torch.equal(got, run(pipe, []))


def test_pil_and_file_images_and_metadata(pipe, net_folder, tmp_path):
    img = Image.new("RGB", (16, 16), (255, 255, 255))
    img.paste((0, 0, 0), (4, 4, 12, 12))
    img.save(tmp_path / "control.png")
    by_file = ControlNet(model=str(net_folder), image=str(tmp_path / "control.png"))
    by_pil = ControlNet(model=str(net_folder), image=img)
    assert torch.equal(run(pipe, [by_file]), run(pipe, [by_pil]))  # both resized 16 -> 32 alike
    out = pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE, seed=0, plugins=[by_pil, by_file])
    settings = [p["settings"] for p in out.parameters["plugins"]]
    json.dumps(settings)  # reproducible metadata is JSON
    assert settings[0]["image"] == "<PIL RGB 16x16>" and settings[1]["image"] == str(tmp_path / "control.png")


def test_shared_instance_serves_calls_with_different_batches(pipe, net_folder, make_control):
    cn = ControlNet(model=str(net_folder), image=make_control(1, SIZE, 0))
    one = run(pipe, [cn])
    two = run(pipe, [cn], prompt=["a red circle", "a blue square"])
    assert two.shape[0] == 2 and torch.equal(run(pipe, [cn]), one)


def test_train_command_is_registered():
    assert "controlnet" in plugin_train_commands(ControlNet, owner="controlnet")


# -- bad input --------------------------------------------------------------------------------------------------


def test_settings_errors_name_the_field(tmp_path, make_control):
    with pytest.raises(SettingsError, match="control_guidance_start.*smaller than"):
        ControlNet(model="x", image=make_control(1, 8, 0), control_guidance_start=0.6, control_guidance_end=0.5)
    with pytest.raises(SettingsError, match=r"controlnet\.image: .*does not exist"):
        ControlNet(model="x", image=str(tmp_path / "nope.png"))
    with pytest.raises(SettingsError, match=r"controlnet\.image"):
        ControlNet(model="x", image=3)
    with pytest.raises(SettingsError, match=r"controlnet\.conditioning_scale"):
        ControlNet(model="x", image=make_control(1, 8, 0), conditioning_scale=float("nan"))
    with pytest.raises(PluginError, match="plugin 'controlnet': needs a ControlNet"):
        ControlNet(image=make_control(1, 8, 0))


def test_call_errors_name_the_plugin_and_the_reason(pipe, net_folder, make_control, tmp_path):
    with pytest.raises(PluginError, match=r"'controlnet'.*image: got 3 control images"):
        run(pipe, [ControlNet(model=str(net_folder), image=list(make_control(3, SIZE, 0)))],
            prompt=["a", "b"])
    with pytest.raises(PluginError, match=r"'controlnet'.*image: .*16x16 but the call makes 32x32"):
        run(pipe, [ControlNet(model=str(net_folder), image=make_control(1, 16, 0))])
    with pytest.raises(PluginError, match=r"'controlnet'.*values must lie in \[0, 1\]"):
        run(pipe, [ControlNet(model=str(net_folder), image=make_control(1, SIZE, 0) * 2 - 1)])
    with pytest.raises(PluginError, match=r"'controlnet': cannot load model=.*no such ControlNet"):
        run(pipe, [ControlNet(model=str(tmp_path / "missing"), image=make_control(1, SIZE, 0))])


def test_controlnet_for_another_unet_is_refused(pipe, make_control):
    config = {**pipe.unet.config.model_dump(), "block_out_channels": (16, 32), "conditioning_embedding_out_channels": (8, 16)}
    other = ControlNetModel({k: v for k, v in config.items() if k not in ("sample_size", "out_channels", "center_input_sample",
                                                                           "up_block_types", "conv_out_kernel")})
    with pytest.raises(PluginError, match=r"'controlnet'.*does not fit this UNet: block_out_channels \(16, 32\) but the UNet has \(32, 64\)"):
        run(pipe, [ControlNet(controlnet=other, image=make_control(1, SIZE, 0))])


def test_controlnet_for_another_vae_factor_is_refused(pipe, make_control):
    """Same UNet, but a control encoder made for SD's 8x VAE: the tiny model's VAE downsamples by 2."""
    net = ControlNetModel.from_unet(pipe.unet)  # diffusers' default widths (16, 32, 96, 256)
    with pytest.raises(PluginError, match=r"'controlnet'.*downsamples by 8 .* but this model's VAE by 2"):
        run(pipe, [ControlNet(controlnet=net, image=make_control(1, SIZE, 0))])
