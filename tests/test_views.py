"""Per-view UNet passes (diffsteer.views, the ``diffsteer_plan_views`` seam): a small MultiDiffusion test plugin.

Parity with diffusers 0.42.1's StableDiffusionPanoramaPipeline on tiny random weights (with a factor-8 VAE:
the reference hard-codes 8), for a stateless and a multistep scheduler, with circular padding and with view
batching; then the contract itself: views that do not overlap are independent generations, with regions,
SEGA's momentum and canvas-wide conditioning cropped per view; and bad plans are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsteer import Pipeline, Plugin, hookimpl
from diffsteer.errors import PluginError
from diffsteer.testing import diffusers_pipeline, max_abs_diff
from diffsteer.views import View, ViewBatch, ViewPlan

TOL = 1e-4


class Grid(Plugin):
    """MultiDiffusion's views: ``window`` latent cells every ``stride`` cells (the panorama plugin's geometry)."""

    name = "grid-views"
    contract = "1.2"

    def __init__(self, window: int, stride: int, batch_size: int = 1, wrap: bool = False) -> None:
        super().__init__()
        self.window, self.stride, self.batch_size, self.wrap = window, stride, batch_size, wrap

    @hookimpl
    def diffsteer_plan_views(self, call):
        return ViewPlan.grid(call.latent_shape[-2:], self.window, self.stride, batch_size=self.batch_size,
                             wrap=self.wrap)


class Planned(Plugin):
    """Returns a fixed plan (or anything else, to test the checks)."""

    name = "planned"
    contract = "1.2"

    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan

    @hookimpl
    def diffsteer_plan_views(self, call):
        return self.plan


@pytest.fixture(scope="module")
def tiny_f8(tiny_sd1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd1`` with a four-block (factor-8) VAE, which the reference's hard-coded 8 needs."""
    from diffusers import AutoencoderKL

    pipe = diffusers_pipeline(tiny_sd1)
    torch.manual_seed(1)
    pipe.vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
    )
    out = tmp_path_factory.mktemp("tiny-f8") / "sd1"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# The reference's views are 64 latent cells wide, every 8 cells (fixed in diffusers); a 16x1024 px canvas is
# 2x128 cells: 9 views, or 16 wrapping ones.
CANVAS = dict(height=16, width=1024)


@pytest.mark.parametrize(
    ("scheduler", "diffusers_class", "options"),
    [
        ("ddim", "DDIMScheduler", {}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
        ("ddim", "DDIMScheduler", {"circular_padding": True}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"view_batch_size": 3}),
        ("ddim", "DDIMScheduler", {"circular_padding": True, "view_batch_size": 4}),
    ],
)
def test_views_match_diffusers_panorama(tiny_f8, scheduler, diffusers_class, options):
    ref_pipe = diffusers_pipeline(tiny_f8, "StableDiffusionPanoramaPipeline", diffusers_class)
    latents = torch.randn(1, 4, 2, 128, generator=torch.Generator().manual_seed(3))
    ref = ref_pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                   output_type="latent", **CANVAS, **options).images
    pipe = Pipeline.from_pretrained(tiny_f8, scheduler=scheduler)
    grid = Grid(64, 8, batch_size=options.get("view_batch_size", 1), wrap=options.get("circular_padding", False))
    mine = pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                output_type="latent", plugins=[grid], **CANVAS).images
    d = max_abs_diff(ref, mine)
    print(f"panorama {scheduler} {options}: max|Δ| = {d:.2e}")
    assert d <= TOL


def test_one_view_of_the_whole_canvas_is_no_plan(tiny_pipe):
    plain = tiny_pipe("a red circle", num_inference_steps=3, seed=0, output_type="latent").images
    viewed = tiny_pipe("a red circle", num_inference_steps=3, seed=0, output_type="latent",
                       plugins=[Grid(16, 16)]).images
    assert torch.equal(plain, viewed)


def test_schedulers_are_kept_per_view_batch(tiny_pipe):
    """A multistep scheduler (DPM++ 2M keeps the last prediction) with one shared instance would mix the views'
    histories, as diffusers#3494 did: views that do not overlap must equal independent generations."""
    pipe = tiny_pipe.with_scheduler("dpmpp_2m")
    _assert_tiles_are_independent(pipe, [])


def _assert_tiles_are_independent(pipe, plugins_for, *, steps: int = 4, tol: float = 1e-5) -> None:
    """Two side-by-side views that do not overlap (stride = window) denoise as two separate generations of
    their halves: ``plugins_for(half)`` gives each run's plugins (``None``: the whole canvas)."""
    make = plugins_for if callable(plugins_for) else (lambda half: list(plugins_for))
    latents = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(5))
    whole = pipe("a red circle", num_inference_steps=steps, latents=latents, width=64, height=32,
                 output_type="latent", plugins=[*make(None), Grid(16, 16)]).images
    for half in (0, 1):
        cols = slice(16 * half, 16 * (half + 1))
        alone = pipe("a red circle", num_inference_steps=steps, latents=latents[..., cols], width=32, height=32,
                     output_type="latent", plugins=make(half)).images
        d = max_abs_diff(whole[..., cols], alone)
        print(f"half {half}: max|Δ| against its own generation = {d:.2e}")
        assert d <= tol


def test_regions_momentum_and_guidance_are_per_view(tiny_pipe):
    """SEGA (momentum kept per view) confined to a region that covers part of each half, and SAG (its extra
    pass over the view's branch, its attention map of the view): with views the region is cropped per window,
    exactly as a run on that half with the half of the mask."""
    pytest.importorskip("diffsteer_sega")
    pytest.importorskip("diffsteer_sag")
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega

    mask = torch.zeros(32, 64)
    mask[4:20, 10:40] = 1.0

    def plugins(half):
        region = mask if half is None else mask[:, 32 * half:32 * (half + 1)]
        return [Sega(concepts=[{"prompt": "blue", "guidance_scale": 5, "warmup_steps": 0}], momentum_scale=0.5,
                     region=region), Sag(sag_scale=0.75)]

    _assert_tiles_are_independent(tiny_pipe, plugins)


def test_canvas_wide_controlnet_image_is_cropped_per_view(tiny_pipe):
    pytest.importorskip("diffsteer_controlnet")
    from diffsteer_controlnet import ControlNet, ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(4, 8))
    for p in net.parameters():  # zero convs start at zero: give them weights so the control shows
        p.data.add_(0.05 * torch.randn_like(p))
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(2))

    def plugins(half):
        img = image if half is None else image[..., 32 * half:32 * (half + 1)]
        return [ControlNet(controlnet=net, image=img, conditioning_scale=1.0)]

    _assert_tiles_are_independent(tiny_pipe, plugins)


def test_view_batch_crops_and_adds_with_wrap():
    batch = ViewBatch((View(0, 6, 2, 4), View(0, 0, 2, 4)), canvas=(2, 8), rows=1)
    canvas = torch.arange(16.0).reshape(1, 1, 2, 8)
    crops = batch.crop("t", canvas)
    assert crops[0, 0, 0].tolist() == [6, 7, 0, 1] and crops[1, 0, 0].tolist() == [0, 1, 2, 3]
    pixels = torch.arange(16.0 * 64).reshape(1, 1, 16, 64)  # the same canvas at 8 pixels per cell
    assert batch.crop("t", pixels).shape == (2, 1, 16, 32)
    total = torch.zeros(1, 1, 2, 8)
    batch.add_into(total, torch.ones(2, 1, 2, 4))
    assert total[0, 0, 0].tolist() == [2, 2, 1, 1, 0, 0, 1, 1]
    with pytest.raises(PluginError, match="owner-x.*cannot crop a 3x8"):
        batch.crop("owner-x", torch.zeros(1, 1, 3, 8))


def test_grid_covers_the_canvas_where_the_stride_does_not_fit():
    plan = ViewPlan.grid((4, 30), 8, 8)
    assert [v.left for v in plan.views] == [0, 8, 16, 22]  # the last view ends at the edge
    assert {(v.height, v.width) for v in plan.views} == {(4, 8)}
    wrapped = ViewPlan.grid((4, 32), 8, 8, wrap=True)
    assert [v.left for v in wrapped.views] == [0, 8, 16, 24] and wrapped.wrap


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("views", "returned a str, not a ViewPlan"),
        (ViewPlan((View(0, 0, 16, 8),)), "leave 128 of the canvas's 256 latent cells without weight"),
        (ViewPlan((View(0, 0, 16, 8), View(0, 4, 16, 12))), "views must all be one size"),
        (ViewPlan((View(0, 12, 16, 8),)), "leaves the 16x16-cell canvas"),
        (ViewPlan((View(0, 0, 16, 16, weight=-torch.ones(16, 16)),)), "finite and non-negative"),
        (ViewPlan((View(0, 0, 16, 16, weight=torch.ones(4, 4)),)), "weight is \\(4, 4\\), its window 16x16"),
    ],
)
def test_bad_plans_are_refused_naming_the_plugin(tiny_pipe, plan, message):
    with pytest.raises(PluginError, match=f"planned.*{message}"):
        tiny_pipe("a red circle", num_inference_steps=2, seed=0, plugins=[Planned(plan)])


def test_two_planners_conflict(tiny_pipe):
    from diffsteer.errors import PluginConflictError

    with pytest.raises(PluginConflictError, match="grid-views.*planned|planned.*grid-views"):
        tiny_pipe("a red circle", num_inference_steps=2, seed=0, plugins=[Grid(8, 8), Planned(None)])


def test_weighted_views_average_by_weight(tiny_pipe):
    """Two views of the whole canvas with different prompts and weights 3:1 give the weighted average of the
    two single-prompt steps (region prompts); with DDIM the first step is linear in the prediction."""
    cond = tiny_pipe.text.encode(["a blue square"])
    w = torch.full((16, 16), 3.0)
    plan = ViewPlan((View(0, 0, 16, 16, weight=w), View(0, 0, 16, 16, embeddings={"cond": cond})))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mixed = tiny_pipe("a red circle", num_inference_steps=1, latents=latents, output_type="latent",
                      plugins=[Planned(plan)]).images
    red = tiny_pipe("a red circle", num_inference_steps=1, latents=latents, output_type="latent").images
    blue = tiny_pipe("a blue square", num_inference_steps=1, latents=latents, output_type="latent").images
    assert max_abs_diff(mixed, 0.75 * red + 0.25 * blue) <= 1e-5
