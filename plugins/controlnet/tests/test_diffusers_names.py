"""What a user coming from diffusers hands the plugin: diffusers' ``ControlNetModel`` objects and diffusers' argument
names (``controlnet_conditioning_scale``, ``guess_mode``, ``control_guidance_start/end``), and the package example."""

from __future__ import annotations

import ast

import pytest
import torch

import diffsteer_controlnet
from diffsteer import PluginError, SettingsError
from diffsteer.testing.doubles import run as shared_run
from diffsteer_controlnet import ControlNet, ControlNetModel, load_controlnet

SIZE = 32
STEPS = 4


@pytest.fixture(scope="module")
def net_folder(controlnet_for):
    return controlnet_for()


@pytest.fixture(scope="module")
def diffusers_net(net_folder):
    from diffusers import ControlNetModel as DiffusersControlNet

    return DiffusersControlNet.from_pretrained(net_folder).eval()


def run(pipe, plugins, **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, **kw}).images


# -- a diffusers ControlNetModel object -------------------------------------------------------------------------


def test_a_diffusers_controlnet_converts_to_the_same_residuals(diffusers_net, make_control, tiny_pipe):
    cn = ControlNet(controlnet=diffusers_net, image=make_control(1, SIZE, 0))
    ours = cn.controlnet
    assert isinstance(ours, ControlNetModel) and ours.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    hidden_size = int(tiny_pipe.text_encoder.config.hidden_size)
    sample = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    hidden = torch.randn(2, 7, hidden_size, generator=g)
    cond = make_control(2, SIZE, 1)
    t = torch.tensor(401)
    worst = 0.0
    for scale, guess in ((0.7, False), (1.3, True)):
        with torch.no_grad():
            ref_down, ref_mid = diffusers_net(sample, t, encoder_hidden_states=hidden, controlnet_cond=cond,
                                              conditioning_scale=scale, guess_mode=guess, return_dict=False)
            down, mid = ours(sample, t, hidden, cond, conditioning_scale=scale, guess_mode=guess)
        assert len(down) == len(ref_down)
        for a, b in zip((*down, mid), (*ref_down, ref_mid)):
            worst = max(worst, float((a - b).abs().max()))
        assert float(ref_mid.abs().max()) > 1e-2  # the residuals are not all zero: the comparison means something
    print(f"converted diffusers ControlNet: max|Δ| residuals = {worst:.2e}")
    assert worst <= 1e-5
    # The conversion copies: the diffusers object is not changed or shared.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ours.parameters(), diffusers_net.parameters()))


def test_a_diffusers_controlnet_generates_as_its_folder_does(tiny_pipe, diffusers_net, net_folder, make_control):
    image = make_control(1, SIZE, 0)
    from_object = run(tiny_pipe, [ControlNet(controlnet=diffusers_net, image=image)])
    from_folder = run(tiny_pipe, [ControlNet(model=str(net_folder), image=image)])
    assert torch.equal(from_object, from_folder)
    assert float((from_object - run(tiny_pipe, [])).abs().max()) > 1e-3


def test_other_objects_get_an_error_saying_what_to_pass(net_folder, make_control, diffusers_net):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    image = make_control(1, 8, 0)
    with pytest.raises(PluginError, match=r"'controlnet': controlnet=: got a builtins\.str; pass a "
                                          r"diffsteer_controlnet\.ControlNetModel or a diffusers ControlNetModel.*model="):
        ControlNet(controlnet=str(net_folder), image=image)
    with pytest.raises(PluginError, match=r"'controlnet': controlnet=: got a torch\.nn\.modules\.linear\.Linear"):
        ControlNet(controlnet=torch.nn.Linear(2, 2), image=image)
    with pytest.raises(PluginError, match=r"MultiControlNetModel holds several ControlNets: pass each as its own"):
        ControlNet(controlnet=MultiControlNetModel([diffusers_net, diffusers_net]), image=image)
    ours = load_controlnet(net_folder)
    assert ControlNet(controlnet=ours, image=image).controlnet is ours


# -- diffusers' argument names ------------------------------------------------------------------------------------


def test_controlnet_conditioning_scale_is_conditioning_scale(tiny_pipe, net_folder, make_control):
    image = make_control(1, SIZE, 0)
    aliased = ControlNet(model=str(net_folder), image=image, controlnet_conditioning_scale=0.4)
    assert aliased.settings.conditioning_scale == 0.4
    assert aliased.settings_dict()["conditioning_scale"] == 0.4  # metadata records the field's own name
    by_name = run(tiny_pipe, [ControlNet(model=str(net_folder), image=image, conditioning_scale=0.4)])
    assert torch.equal(run(tiny_pipe, [aliased]), by_name)
    assert float((by_name - run(tiny_pipe, [ControlNet(model=str(net_folder), image=image)])).abs().max()) > 1e-3
    # Also as a settings mapping (what --set and recorded metadata give).
    assert ControlNet({"model": "x", "image": image, "controlnet_conditioning_scale": 0.4}).settings.conditioning_scale == 0.4
    with pytest.raises(SettingsError, match=r"controlnet\.controlnet_conditioning_scale"):
        ControlNet(model="x", image=image, controlnet_conditioning_scale="strong")
    with pytest.raises(SettingsError, match=r"conditioning_scale: is given twice, as conditioning_scale and "
                       r"controlnet_conditioning_scale: give one of them"):
        ControlNet(model="x", image=image, conditioning_scale=0.4, controlnet_conditioning_scale=0.5)


def test_guess_mode_is_diffusers_name(tiny_pipe, net_folder, make_control):
    image = make_control(1, SIZE, 0)
    cn = ControlNet(model=str(net_folder), image=image, guess_mode=True)
    assert cn.settings.guess_mode is True
    assert not torch.equal(run(tiny_pipe, [cn]), run(tiny_pipe, [ControlNet(model=str(net_folder), image=image)]))


def test_control_guidance_start_end_are_the_step_window(tiny_pipe, net_folder, make_control):
    image = make_control(1, SIZE, 0)
    aliased = ControlNet(model=str(net_folder), image=image, control_guidance_start=0.25, control_guidance_end=0.75)
    assert (aliased.scope.window_start, aliased.scope.window_end) == (0.25, 0.75)
    by_name = ControlNet(model=str(net_folder), image=image, window_start=0.25, window_end=0.75)
    windowed = run(tiny_pipe, [aliased])
    assert torch.equal(windowed, run(tiny_pipe, [by_name]))
    assert not torch.equal(windowed, run(tiny_pipe, [ControlNet(model=str(net_folder), image=image)]))


def test_package_example_constructs(tmp_path, monkeypatch, make_control):
    """The ``ControlNet(...)`` line of the package docstring runs as written (it once used ``scale=``)."""
    from PIL import Image

    calls = [ln.split(">>> ", 1)[1].split("#")[0] for ln in diffsteer_controlnet.__doc__.splitlines()
             if ln.startswith(">>> cn = ControlNet(")]
    assert len(calls) == 1
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in ast.parse(calls[0].split("=", 1)[1].strip()).body[0].value.keywords}
    monkeypatch.chdir(tmp_path)
    Image.new("L", (64, 64)).save(kwargs["image"])
    cn = ControlNet(**kwargs)
    assert cn.settings.model == "shapes-outline" and cn.settings.conditioning_scale == kwargs["conditioning_scale"]
