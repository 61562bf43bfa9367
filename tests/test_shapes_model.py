"""The shipped shapes model: it loads offline by name, draws what captions say, and runs in bf16.

The full figures (≥200 images) come from `diffsteer eval shapes` and are in docs/shapes-model.md;
these tests use a smaller sample so CI stays fast, with thresholds a little under the card's.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from diffsteer.loading.pipeline_loader import shipped_model_dir
from diffsteer.pipeline import Pipeline
from diffsteer.schedulers import make_scheduler
from diffsteer.shapes import evaluate_caption
from diffsteer.shapes.benchmark import EVAL_SEED_BASE, eval_prompts, score_model, score_strict
from diffsteer.shapes.recipe import ShapesRecipe
from diffsteer.shapes.strict import strict_verdict
from diffsteer.shapes.vocab import BACKGROUNDS, COLOURS


def test_shapes_model_is_shipped_and_small():
    root = shipped_model_dir()
    index = json.loads((root / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"shipped shapes model: {size / 1e6:.1f} MB")
    assert size <= 20e6  # the limit on the shipped size
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] and sched["prediction_type"] == "v_prediction"
    # sampled with Euler ancestral (docs/shapes-model.md, "Sampler"); DDIM by name still samples as it did
    assert sched["_class_name"] == index["scheduler"][1] == "EulerAncestralDiscreteScheduler"
    assert sched == ShapesRecipe().scheduler_config()  # what the recipe writes when it trains the model again
    ddim = make_scheduler("ddim", sched).config  # what Pipeline.from_pretrained("shapes", scheduler="ddim") builds
    assert not ddim.clip_sample and not ddim.set_alpha_to_one and ddim.timestep_spacing == "trailing"


def test_a_local_folder_named_shapes_takes_precedence(tmp_path, monkeypatch, tiny_sd1):
    import shutil

    shutil.copytree(tiny_sd1, tmp_path / "shapes")
    monkeypatch.chdir(tmp_path)
    assert Pipeline.from_pretrained("shapes").unet.config.block_out_channels[0] == 32


def test_eval_pairs_cover_every_colour_and_both_backgrounds():
    for n in (24, 72):
        pairs = eval_prompts(n_single=0, n_double=n, n_position=0)
        assert len(pairs) == len(set(pairs)) == n
        for bg in BACKGROUNDS:  # the first version's stride skipped every black-background pair
            assert sum(p.endswith(f"on a {bg} background") for p in pairs) == n // 2
        for c in COLOURS:
            assert any(f"a {c} " in p for p in pairs)


def test_captions_are_followed(shapes_pipe_shipped):
    score = score_model(shapes_pipe_shipped, n_single=48, n_double=24, n_position=24, steps=20)
    print("\n" + score.table())
    assert score.colour >= 0.95
    assert score.shape >= 0.85
    # the card: 95.8% on 72 prompts (stage 7; 94.4% on stage 6, 76.4% before the two-object fine-tune); here on 24,
    # which vary by about ±9 points
    assert score.two_object >= 0.8
    assert score.background >= 0.97
    assert score.position >= 0.9  # the card: 100% on 96 prompts (50%, chance, before the position fine-tune)


def test_strict_figures(shapes_pipe_shipped):
    """The strict evaluator (issue 14) on a small sample of the tests' own seeds. The reported figures come from
    `diffsteer eval shapes --strict` on fresh seeds. On these 72 images the shipped stage 8 is clean on 23 of 24
    single objects, 4 of 24 pairs, 8 of 12 colour-open and 9 of 12 positioned ones, background 72 of 72; stage 7
    on the same seeds: 23, 4, 6 and 9, background 72. Stage 12 with guidance at every step is clean on 24, 9, 9 and
    11, background 72; under the guidance interval the model folder recommends (no guidance above t = 600), DDIM, on
    24, 21, 11 and 12; and as shipped, with that interval and the model's own sampler (Euler ancestral), which this
    test samples with, on 24, 21, 12 and 12, background 72. The floors sit two images under the DDIM figures.

    The sample had 12 pairs until stage 8 (then 60 images; every later prompt's seed moved with the change). There
    stage 8 was clean on 1 pair and 8 positioned ones (stage 7: 2 and 11; the floor was 9), although on the 360
    fresh images of `eval shapes --strict` stage 8 is the better model on both (pairs 40.3 % against 29.2 % of 72,
    position 88.5 % against 83.3 % of 96). 12 prompts of a kind cannot tell these models apart; the pairs, the
    kind with the lowest rate, now have 24."""
    score = score_strict(shapes_pipe_shipped, n_single=24, n_double=24, n_open=12, n_position=12,
                         seed_base=EVAL_SEED_BASE)
    print("\n" + score.table())
    assert score.clean("single") >= 22 / 24
    assert score.clean("position") >= 10 / 12
    assert score.clean("open") >= 9 / 12
    assert score.clean("double") >= 19 / 24
    assert score.background >= 0.96


BF16_PROMPTS = [
    "a red circle on a white background", "a blue square and a yellow triangle on a black background",
    "a green triangle on a black background", "a yellow square and a red circle on a white background",
    "a blue circle on the left on a white background", "a red square and a green triangle on a black background",
    "a yellow triangle on a white background", "a green circle and a blue square on a white background",
]


def test_bf16_stays_close_to_fp32(shapes_pipe):
    """bf16 computes what fp32 does up to rounding, so most images agree to about 50 dB. A seed whose layout sits
    on a decision boundary can tip to another layout under that rounding: the sampler is chaotic there, the
    function is not wrong. Measured on these 8 prompts and 8 more seeds (16 pairs of images): stage 9 tipped none
    (44.8-54.4 dB), the shipped stage 12 tipped 2 (20.8 and 29.3 dB: a third object, a moved one; the other 14
    41.2-53.1 dB). Until stage 12 the test compared two images and asked 25 dB of both together; one tipped image
    takes that below. So it asks that most images agree closely, and that bf16 follows captions as often. Under the
    guidance interval the model recommends, which this test samples with, none tipped: 46.6-53.8 dB, 7 of 8 clean in
    both."""
    bf16 = Pipeline.from_pretrained("shapes", scheduler="ddim", torch_dtype=torch.bfloat16)
    gens = lambda: [torch.Generator().manual_seed(EVAL_SEED_BASE + i) for i in range(len(BF16_PROMPTS))]  # noqa: E731
    a = shapes_pipe(BF16_PROMPTS, generator=gens(), num_inference_steps=20).images
    b = bf16(BF16_PROMPTS, generator=gens(), num_inference_steps=20).images
    as_float = lambda img: np.asarray(img, dtype=np.float64) / 255  # noqa: E731
    psnr = [10 * np.log10(1.0 / float(((as_float(x) - as_float(y)) ** 2).mean())) for x, y in zip(a, b)]
    print("shapes model bf16 vs fp32 PSNR per image:", " ".join(f"{v:.1f}" for v in psnr), "dB")
    close = [v > 40 for v in psnr]
    assert sum(close) >= 6 and float(np.median(psnr)) > 45
    # An image that agrees reads the same under the evaluators; over all 8, bf16 is clean as often as fp32.
    for x, y, prompt, same in zip(a, b, BF16_PROMPTS, close):
        if same:
            assert evaluate_caption(np.asarray(y), prompt) == evaluate_caption(np.asarray(x), prompt), prompt
    clean32, clean16 = (sum(strict_verdict(im, p).clean for im, p in zip(images, BF16_PROMPTS)) for images in (a, b))
    print(f"strictly clean: fp32 {clean32} of 8, bf16 {clean16} of 8")
    assert clean16 >= clean32 - 1
