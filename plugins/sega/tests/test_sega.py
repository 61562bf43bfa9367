"""The sega plugin on a tiny random model: plumbing, composition, two instances, bad input, entry point, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diffsteer import PluginError, SettingsError
from diffsteer.cli import read_parameters
from diffsteer.pipeline import Pipeline
from diffsteer.testing import PlainCfg, max_abs_diff, run
from diffsteer_sega import Sega

TOL = 1e-4
RED = dict(prompt="red", guidance_scale=6, warmup_steps=1, threshold=0.8)
BLUE = dict(prompt="blue", reverse=True, guidance_scale=4, warmup_steps=1, threshold=0.7, weight=2.0)


@pytest.fixture
def pipe(tiny_pipe):
    """The fixture kit's tiny SD1 pipeline (DDIM), loaded once per session."""
    return tiny_pipe


# -- plumbing ------------------------------------------------------------------------------------------------


def test_concepts_are_branches_of_the_one_batched_unet_call(pipe, partners):
    log = []
    out = run(pipe, [Sega(concepts=[RED, BLUE]), partners.Hint(log, strength=0.0)], prompt=["a circle", "a square"],
              num_images_per_prompt=2)
    assert out.images.shape[0] == 4
    assert log and all(names == ["uncond", "cond", "sega:0", "sega:1"] for names in log)
    assert len(log) == 4  # one UNet pass per step: no extra passes for the concepts


def test_sega_changes_the_result_and_no_concepts_is_plain_generation(pipe):
    plain = run(pipe).images
    assert torch.equal(run(pipe, [Sega()]).images, plain)  # like editing_prompt=None
    assert max_abs_diff(run(pipe, [Sega(concepts=[RED])]).images, plain) > 1e-2


def test_one_instance_serves_two_calls_alike(pipe):
    """Momentum is per-call state: a second call with the same plugin object starts from zero."""
    sega = Sega(concepts=[RED, BLUE], momentum_scale=0.5)
    assert torch.equal(run(pipe, [sega]).images, run(pipe, [sega]).images)


def test_applied_guidance_is_reported_and_replays_the_call(pipe):
    sega = Sega(concepts=[RED, BLUE], momentum_scale=0.3, momentum_beta=0.5)
    out = run(pipe, [sega], prompt=["a circle", "a square"])
    applied = out.extras["sega"]["sem_guidance"]
    assert applied.shape == (4, 2, 4, 16, 16)  # (steps, images, channels, h, w)
    assert applied[0].abs().max() == 0 and applied[1:].abs().amax(dim=(1, 2, 3, 4)).min() > 0  # warm-up 1
    replay = run(pipe, [Sega(sem_guidance=applied)], prompt=["a circle", "a square"]).images
    d = max_abs_diff(replay, out.images)
    print(f"replaying sem_guidance without concept branches: max|Δ| = {d:.2e}")
    assert d <= TOL


def test_bf16_runs_and_stays_close_to_fp32(tiny_sd1, pipe):
    bf16 = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", torch_dtype=torch.bfloat16)
    sega = Sega(concepts=[RED, BLUE])
    low, full = run(bf16, [sega]).images, run(pipe, [sega]).images
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert max_abs_diff(low, full) < 0.1 * float(full.abs().max())


# -- composition -------------------------------------------------------------------------------------------


def test_stacks_with_a_residual_plugin_and_another_branch_plugin(pipe, partners):
    """Residuals follow SEGA's rows; another plugin's branch sits beside them; each keeps its effect."""
    sega = Sega(concepts=[RED, BLUE], momentum_scale=0.2)
    alone = run(pipe, [sega]).images
    # Inert partners (zero residuals, zero push) leave SEGA's result as it was (up to batch-size rounding).
    inert = run(pipe, [partners.Hint(strength=0.0), sega, partners.Push(scale=0.0)]).images
    assert max_abs_diff(inert, alone) <= TOL
    # Active partners: SEGA still moves the result, by about as much as it does alone.
    log = []
    stack = [partners.Hint(log, strength=0.5), partners.Push(scale=2.0)]
    without = run(pipe, stack).images
    with_sega = run(pipe, [stack[0], sega, stack[1]]).images
    assert log[-1] == ["uncond", "cond", "sega:0", "sega:1", "push"]
    own, stacked = max_abs_diff(alone, run(pipe).images), max_abs_diff(with_sega, without)
    print(f"SEGA's effect alone {own:.3f}, on top of hint + push {stacked:.3f}")
    assert stacked > 0.3 * own


def test_stacks_with_a_plugin_that_replaces_the_guidance_formula(pipe, partners):
    sega = Sega(concepts=[RED])
    assert max_abs_diff(run(pipe, [PlainCfg(), sega]).images, run(pipe, [sega]).images) <= 1e-6


def test_two_instances_are_independent_and_add_up(pipe, partners):
    """Two Sega plugins in one call: own branches, own momentum; with equal warm-ups their terms add
    up to one Sega holding both concepts (the momentum recursion is linear)."""
    kw = dict(momentum_scale=0.3, momentum_beta=0.6)
    log = []
    two = run(pipe, [Sega(concepts=[RED], **kw), Sega(concepts=[BLUE], **kw), partners.Hint(log, strength=0.0)])
    one = run(pipe, [Sega(concepts=[RED, BLUE], **kw)])
    assert log[0] == ["uncond", "cond", "sega:0", "sega#2:0"]
    assert set(two.extras) == {"sega", "sega#2"}
    d = max_abs_diff(two.images, one.images)
    print(f"two instances vs one with both concepts: max|Δ| = {d:.2e}")
    assert d <= TOL


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(concepts=[dict(prompt="red", threshold=1.0)]), r"sega\.concepts\.0\.threshold"),
        (dict(concepts=[dict(prompt="red", threshold=-0.1)]), r"sega\.concepts\.0\.threshold"),
        (dict(concepts=["red", dict(prompt="blue", treshold=0.5)]), r"sega\.concepts\.1\.treshold"),
        (dict(concepts=[dict(prompt="")]), r"sega\.concepts\.0\.prompt"),
        (dict(concepts=[dict(prompt="red", weight=-1)]), r"sega\.concepts\.0\.weight"),
        (dict(concepts=[dict(prompt="red", guidance_scale=float("nan"))]), r"sega\.concepts\.0\.guidance_scale"),
        (dict(concepts=[dict(prompt="red", warmup_steps=-1)]), r"sega\.concepts\.0\.warmup_steps"),
        (dict(concepts=[dict(prompt="red", warmup_steps=5, cooldown_steps=5)]), r"sega\.concepts\.0: .*cooldown_steps"),
        (dict(concepts=["red"], momentum_beta=1.5), r"sega\.momentum_beta"),
        (dict(concepts=["red"], momentum_scale=-0.1), r"sega\.momentum_scale"),
        (dict(concepts=["red"], mom_beta=0.5), r"sega\.mom_beta"),
        (dict(concepts=[3]), r"sega\.concepts\.0"),
    ],
)
def test_bad_settings_name_plugin_and_field(settings, field):
    with pytest.raises(SettingsError, match=field):
        Sega(**settings)


def test_from_diffusers_checks_list_lengths():
    with pytest.raises(SettingsError, match=r"sega\.edit_weights: has 3 values for 2 editing prompts"):
        Sega.from_diffusers(["red", "blue"], edit_weights=[1, 1, 1])


def test_needs_classifier_free_guidance(pipe):
    with pytest.raises(PluginError, match=r"plugin 'sega': .*guidance_scale > 1 \(got 1\)"):
        run(pipe, [Sega(concepts=["red"])], guidance_scale=1.0)


def test_a_warmup_longer_than_the_call_is_an_error(pipe):
    with pytest.raises(PluginError, match=r"plugin 'sega': concept 0 \('red'\) has warmup_steps=10 .* runs 4 steps"):
        run(pipe, [Sega(concepts=["red"])])  # the reference's default warm-up of 10 steps


def test_bad_sem_guidance_is_refused(pipe):
    with pytest.raises(SettingsError, match=r"sega\.sem_guidance"):
        Sega(sem_guidance=[])
    with pytest.raises(PluginError, match="sem_guidance has 2 steps but this call runs 4"):
        run(pipe, [Sega(sem_guidance=torch.zeros(2, 1, 4, 16, 16))])
    with pytest.raises(PluginError, match=r"sem_guidance\[0\] has shape \(1, 3, 16, 16\)"):
        run(pipe, [Sega(sem_guidance=torch.zeros(4, 1, 3, 16, 16))])


# -- entry point and CLI -------------------------------------------------------------------------------------


def test_loads_by_entry_point_name(pipe):
    settings = dict(concepts=[RED], momentum_scale=0.2)
    by_name = run(pipe, [("sega", settings)]).images
    assert torch.equal(by_name, run(pipe, [Sega(**settings)]).images)
    assert torch.equal(run(pipe, ["sega"]).images, run(pipe).images)


def test_cli_runs_sega_and_records_its_settings(tiny_sd1, tmp_path):
    def generate(out, *extra):
        cmd = [sys.executable, "-m", "diffsteer.cli", "generate", "a circle", "--model", str(tiny_sd1),
               "--steps", "4", "--seed", "0", "-o", str(out), "-q", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    concepts = json.dumps([{"prompt": "red", "warmup_steps": 1}])
    res = generate(tmp_path / "sega.png", "--plugin", "sega", "--set", f"sega.concepts={concepts}",
                   "--set", "sega.momentum_scale=0.2")
    assert res.returncode == 0, res.stderr
    plugins = read_parameters(tmp_path / "sega.png")["plugins"]
    assert plugins[0]["name"] == "sega" and plugins[0]["settings"]["concepts"][0]["prompt"] == "red"
    assert plugins[0]["settings"]["momentum_scale"] == 0.2

    bad = generate(tmp_path / "bad.png", "--plugin", "sega", "--set", 'sega.concepts=[{"prompt":"red","threshold":2}]')
    assert bad.returncode == 2 and "sega.concepts.0.threshold" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.png").exists()
