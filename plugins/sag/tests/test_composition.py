"""sag stacked with conditioning plugins (residuals, extra input channels), sega and prompt-weighting, on tiny models.

The batch-layout lesson: PAG + ControlNet broke in diffusers because the extra guidance pass stacked a
different number of rows than the conditioning network assumed. Here the degraded pass goes through
``call.predict`` with its own layout, so a conditioning plugin that reads ``inputs.layout`` gives it exactly the
rows of the branch SAG degrades; one that assumes uncond + cond is refused with an error naming it.
"""

from __future__ import annotations

import pytest
import torch

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.models import UNet2DConditionModel
from diffsteer.pipeline import Pipeline
from diffsteer.testing import diffusers_pipeline, max_abs_diff, pass_recorder, residual_shapes
from diffsteer_sag import Sag

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOL = 1e-4
STEPS = 6



def branch_residuals(config, batch, height, width, seed=0, strength=0.5):
    """Per-branch residuals: ``{"uncond": (down, mid), "cond": (down, mid)}``, each with ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    down_shapes, mid_shape = residual_shapes(config, height, width)
    out = {}
    for name in ("uncond", "cond"):
        down = [strength * torch.randn(batch, *s, generator=g) for s in down_shapes]
        out[name] = (down, strength * torch.randn(batch, *mid_shape, generator=g))
    return out


class BranchHint(Plugin):
    """A ControlNet stand-in whose residuals differ per branch (as a real one's do: it sees each branch's text)."""

    name = "branch-hint"

    def __init__(self, residuals, log=None):
        super().__init__()
        self.residuals, self.log = residuals, log if log is not None else []

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        names = inputs.layout.names
        self.log.append((inputs.pass_name, list(names), inputs.sample.shape[0]))
        down = [torch.cat([self.residuals[n][0][i] for n in names]) for i in range(len(self.residuals["cond"][0]))]
        mid = torch.cat([self.residuals[n][1] for n in names])
        inputs.add_residuals(self.name, [d.to(call.device, call.dtype) for d in down], mid.to(call.device, call.dtype))


def with_residuals(unet, residuals, do_cfg, batch):
    """Make the diffusers UNet add the same per-branch residuals. Its SAG pipeline stacks [uncond, cond] in the
    main pass and runs the degraded pass on one branch (uncond with CFG, cond without), which only the row count
    tells apart: exactly the bookkeeping a conditioning network has to get right there."""
    plain_forward = unet.forward

    def forward(sample, timestep, encoder_hidden_states, **kw):
        if sample.shape[0] == 2 * batch:
            names = ["uncond", "cond"]
        else:
            names = [forward.degraded_branch] if do_cfg else ["cond"]
        down = [torch.cat([residuals[n][0][i] for n in names]) for i in range(len(residuals["cond"][0]))]
        mid = torch.cat([residuals[n][1] for n in names])
        return plain_forward(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, **kw)

    forward.degraded_branch = "uncond"
    unet.forward = forward
    return forward


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_residuals_follow_the_degraded_pass_and_match_diffusers(tiny_sd1, guidance_scale):
    """diffsteer + SAG + a residual plugin equals diffusers' SAG pipeline with the same residuals injected."""
    batch, do_cfg = 2, guidance_scale > 1
    mine = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    residuals = branch_residuals(mine.unet.config, batch, 16, 16)
    ref = diffusers_pipeline(tiny_sd1, "StableDiffusionSAGPipeline", "DDIMScheduler")
    forward = with_residuals(ref.unet, residuals, do_cfg, batch)
    args = dict(prompt=["a circle", "a square"], num_inference_steps=STEPS, guidance_scale=guidance_scale,
                output_type="latent")

    def reference():
        return ref(generator=torch.Generator().manual_seed(0), sag_scale=1.0, **args).images

    log = []
    got = mine(generator=torch.Generator().manual_seed(0), plugins=[Sag(sag_scale=1.0), BranchHint(residuals, log)],
               **args).images
    branch = "uncond" if do_cfg else "cond"
    main = ["uncond", "cond"] if do_cfg else ["cond"]
    assert log == [("main", main, batch * len(main)), ("sag", [branch], batch)] * STEPS
    expected = reference()
    d = max_abs_diff(expected, got)
    hint_only = mine(generator=torch.Generator().manual_seed(0), plugins=[BranchHint(residuals)], **args).images
    print(f"guidance {guidance_scale}: SAG + residuals vs diffusers max|Δ| = {d:.2e}; "
          f"SAG's effect with the residuals on {max_abs_diff(got, hint_only):.2e}")
    assert d <= TOL
    assert max_abs_diff(got, hint_only) > 100 * TOL
    if do_cfg:
        # Sensitivity: giving the degraded pass the cond rows' residuals instead is a visible difference.
        forward.degraded_branch = "cond"
        wrong = max_abs_diff(reference(), got)
        print(f"  with the cond residuals in the degraded pass instead: max|Δ| = {wrong:.2e}")
        assert wrong > 100 * TOL


class DepthChannel(Plugin):
    """An extra input channel per image (depth-like), tiled over the rows of each pass."""

    name = "depth-channel"

    def __init__(self, log):
        super().__init__()
        self.log = log

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        h, w = inputs.sample.shape[-2:]
        ramp = torch.linspace(-1, 1, w).expand(call.batch_size, 1, h, w) * torch.arange(1, call.batch_size + 1).view(-1, 1, 1, 1)
        inputs.add_channels(self.name, inputs.layout.repeat(ramp))
        self.log.append((inputs.pass_name, list(inputs.layout.names), inputs.sample.shape[0]))


@pytest.fixture(scope="module")
def five_channel_pipe(tiny_pipe):
    """The tiny model with a 5-input-channel UNet (latents + one conditioning channel, like depth2img)."""
    torch.manual_seed(0)
    config = {**tiny_pipe.unet.config.to_diffusers_dict(), "in_channels": 5}
    unet = UNet2DConditionModel.from_config(config)
    return Pipeline(unet, tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.scheduler)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_extra_channels_follow_the_degraded_pass(five_channel_pipe, guidance_scale):
    log = []
    kw = dict(prompt=["a circle", "a square"], num_inference_steps=3, seed=0, output_type="latent",
              guidance_scale=guidance_scale)
    plain = five_channel_pipe(plugins=[DepthChannel([])], **kw).images
    out = five_channel_pipe(plugins=[DepthChannel(log), Sag()], **kw).images
    branch = "uncond" if guidance_scale > 1 else "cond"
    assert [entry for entry in log if entry[0] == "sag"] == [("sag", [branch], 2)] * 3
    assert torch.isfinite(out).all() and max_abs_diff(out, plain) > 1e-3


class TwoBranchHint(Plugin):
    """Wrong on purpose: assumes every pass stacks uncond + cond (the PAG + ControlNet bug)."""

    name = "two-branch-hint"

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        (down_shapes, mid_shape) = residual_shapes(call.unet.config, *inputs.sample.shape[-2:])
        rows = 2 * call.batch_size
        inputs.add_residuals(self.name, [torch.zeros(rows, *s) for s in down_shapes], torch.zeros(rows, *mid_shape))


def test_a_plugin_that_assumes_two_branches_is_named_on_the_degraded_pass(tiny_pipe):
    run = dict(prompt="a circle", num_inference_steps=2, seed=0, output_type="latent")
    tiny_pipe(plugins=[TwoBranchHint()], **run)  # fine while every pass is uncond + cond
    with pytest.raises(PluginError, match=r"plugin 'two-branch-hint': .* 2 rows but this UNet pass \('sag'\) "
                                          r"stacks 1 rows for branches \['uncond'\]"):
        tiny_pipe(plugins=[Sag(), TwoBranchHint()], **run)


# -- sega -----------------------------------------------------------------------------------------------------

def need(module):
    """A partner plugin's package; its tests skip where that distribution is not installed."""
    return pytest.importorskip(module, reason=f"{module} (plugins/) is not installed")



def test_sag_and_sega_in_one_call_keep_their_effects(tiny_pipe):
    """SEGA's concept rows ride in the main pass only; SAG degrades the uncond branch alone; each still acts."""
    sega = need("diffsteer_sega")
    concept = dict(prompt="red", guidance_scale=6, warmup_steps=1, threshold=0.8)
    kw = dict(prompt="a circle", num_inference_steps=4, seed=0, output_type="latent")
    log = []
    both = tiny_pipe(plugins=[sega.Sega(concepts=[concept]), Sag(), pass_recorder(log)], **kw)
    assert [(p["pass_name"], p["layout"].names) for p in log[:2]] == [
        ("main", ["uncond", "cond", "sega:0"]), ("sag", ["uncond"])]
    assert both.extras["sega"]["sem_guidance"].shape[0] == 4 and both.extras["sag"]["masks"].shape[0] == 4
    plain = tiny_pipe(**kw).images
    sega_only = tiny_pipe(plugins=[sega.Sega(concepts=[concept])], **kw).images
    sag_only = tiny_pipe(plugins=[Sag()], **kw).images
    sag_alone, sag_stacked = max_abs_diff(sag_only, plain), max_abs_diff(both.images, sega_only)
    sega_alone, sega_stacked = max_abs_diff(sega_only, plain), max_abs_diff(both.images, sag_only)
    print(f"SAG's effect alone {sag_alone:.3f}, with SEGA {sag_stacked:.3f}; "
          f"SEGA's alone {sega_alone:.3f}, with SAG {sega_stacked:.3f}")
    assert sag_stacked > 0.3 * sag_alone and sega_stacked > 0.3 * sega_alone


# -- prompt-weighting --------------------------------------------------------------------------------------------

LONG = " ".join(["a red circle and a blue square on a white background."] * 9)  # 2 chunks of 77 tokens


def test_degraded_pass_uses_the_weighted_long_negative_embeddings(tiny_pipe):
    weighting = need("diffsteer_prompt_weighting")
    negative = "a (yellow triangle)1.5"
    log = []
    kw = dict(num_inference_steps=3, seed=0, output_type="latent", negative_prompt=negative)
    out = tiny_pipe(LONG, plugins=[weighting.PromptWeighting(), Sag(), pass_recorder(log)], **kw).images
    encoder = weighting.WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    expected = encoder.encode([negative], chunks=2)
    sag_passes = [p["hidden"] for p in log if p["pass_name"] == "sag"]
    assert len(sag_passes) == 3 and all(s.shape == (1, 154, 32) for s in sag_passes)
    assert all(torch.equal(s, expected) for s in sag_passes)
    assert torch.isfinite(out).all()


def test_weighting_keeps_its_effect_with_sag(tiny_pipe):
    weighting = need("diffsteer_prompt_weighting")
    kw = dict(num_inference_steps=4, seed=0, output_type="latent")
    plain = [tiny_pipe("a red circle", plugins=p, **kw).images for p in ([weighting.PromptWeighting()], [Sag()])]
    weighted = [tiny_pipe("a (red)1.8 circle", plugins=[weighting.PromptWeighting(), *p], **kw).images
                for p in ([], [Sag()])]
    alone, stacked = max_abs_diff(weighted[0], plain[0]), max_abs_diff(weighted[1], plain[1])
    print(f"weighting's effect alone {alone:.3f}, with SAG {stacked:.3f}")
    assert stacked > 0.3 * alone
