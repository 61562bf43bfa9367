"""ControlNet stacked with other plugins (tiny random models): SEGA's concept branches get residuals computed
from their own text, prompt weighting's embeddings reach the ControlNet, SAG's degraded pass gets the same
residuals as the branch it re-runs; every stack keeps each plugin's effect on the output."""

from __future__ import annotations

import pytest
import torch

from diffsteer.testing import pass_recorder
from diffsteer.testing.doubles import run as shared_run
from diffsteer_controlnet import ControlNet, load_controlnet

SIZE = 32
STEPS = 4



@pytest.fixture
def pipe(tiny_pipe):
    """The fixture kit's tiny SD1 pipeline (DDIM), loaded once per session."""
    return tiny_pipe


@pytest.fixture(scope="module")
def net_folder(controlnet_for):
    return controlnet_for()


def run(pipe, plugins, prompt="a red circle", **kw):
    return shared_run(pipe, plugins, prompt=prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kw).images


def recompute_mid(net, record, image):
    """The ControlNet's mid residual for a recorded pass, from that pass's own rows and embeddings."""
    n = record["sample"].shape[0]
    _, mid = net(record["sample"], record["timestep"], record["hidden"], image.repeat(n, 1, 1, 1))
    return mid


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sega_concept_branches_get_residuals_and_both_effects_stay(pipe, net_folder, make_control, guess_mode):
    from diffsteer_sega import Sega

    image = make_control(1, SIZE, 0)
    sega = dict(concepts=[dict(prompt="green", warmup_steps=0, guidance_scale=6.0), dict(prompt="square", warmup_steps=0)])
    passes = []
    cn = ControlNet(model=str(net_folder), image=image, guess_mode=guess_mode)
    both = run(pipe, [Sega(**sega), cn, pass_recorder(passes)])
    main = passes[0]
    concepts = [n for n in main["layout"].names if n not in ("uncond", "cond")]
    assert len(concepts) == 2
    net = load_controlnet(net_folder)
    expected = recompute_mid(net, main, image)
    layout = main["layout"]
    for name in concepts + ["cond"]:
        rows = layout.rows(name)
        # (guess mode scales the mid residual by the last of its log-spaced factors, which is 1)
        torch.testing.assert_close(main["mid"][rows], expected[rows], rtol=0, atol=1e-5)
    assert float(main["mid"][layout.rows("uncond")].abs().max()) == (0.0 if guess_mode else pytest.approx(
        float(expected[layout.rows("uncond")].abs().max())))

    sega_only = run(pipe, [Sega(**sega)])
    cn_only = run(pipe, [ControlNet(model=str(net_folder), image=image, guess_mode=guess_mode)])
    plain = run(pipe, [])
    # Each plugin still acts in the stack: removing either one changes the result as much as it did alone.
    for alone, other in ((sega_only, cn_only), (cn_only, sega_only)):
        assert float((both - alone).abs().max()) > 0.3 * float((other - plain).abs().max())


def test_prompt_weighting_embeddings_reach_the_controlnet(pipe, net_folder, make_control):
    from diffsteer_prompt_weighting import PromptWeighting

    image = make_control(1, SIZE, 0)
    prompt = "a (red:1.8) circle"
    passes = []
    cn = ControlNet(model=str(net_folder), image=image)
    weighted = run(pipe, [PromptWeighting(syntax="a1111"), cn, pass_recorder(passes)], prompt=prompt)
    main = passes[0]
    # The recorded embeddings are the weighted ones, and the residuals were computed from exactly them.
    plain_hidden = pipe.text.encode([prompt])
    assert not torch.allclose(main["hidden"][main["layout"].rows("cond")], plain_hidden)
    torch.testing.assert_close(main["mid"], recompute_mid(load_controlnet(net_folder), main, image), rtol=0, atol=1e-5)
    unweighted = run(pipe, [PromptWeighting(syntax="a1111"), ControlNet(model=str(net_folder), image=image)],
                     prompt="a red circle")
    no_control = run(pipe, [PromptWeighting(syntax="a1111")], prompt=prompt)
    assert float((weighted - unweighted).abs().max()) > 1e-2  # the weighting still acts
    assert float((weighted - no_control).abs().max()) > 1e-2  # and so does the control


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sag_degraded_pass_gets_the_residuals_of_its_branch(pipe, net_folder, make_control, guess_mode):
    sag_module = pytest.importorskip("diffsteer_sag")
    image = make_control(1, SIZE, 0)
    passes = []
    cn = ControlNet(model=str(net_folder), image=image, guess_mode=guess_mode)
    both = run(pipe, [sag_module.Sag(sag_scale=1.0), cn, pass_recorder(passes)])
    degraded = [p for p in passes if p["pass_name"] == sag_module.PASS_NAME]
    assert len(degraded) == STEPS
    net = load_controlnet(net_folder)
    for p in degraded:
        (branch,) = p["layout"].names
        if guess_mode and branch == "uncond":
            assert p["mid"] is None  # like the uncond rows of the main pass: no residual
        else:
            torch.testing.assert_close(p["mid"], recompute_mid(net, p, image), rtol=0, atol=1e-5)
    sag_only = run(pipe, [sag_module.Sag(sag_scale=1.0)])
    cn_only = run(pipe, [ControlNet(model=str(net_folder), image=image, guess_mode=guess_mode)])
    assert float((both - sag_only).abs().max()) > 1e-2 and float((both - cn_only).abs().max()) > 1e-2
