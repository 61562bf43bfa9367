"""Draw the docs' pictures on the shipped shapes model: one before/after strip per technique and the model's
seed grid. Every picture is a grid of 64 px images, one labelled row per condition, one column per seed; the
conditions of a strip share their seeds and starting noise, so each column is a paired comparison.

    python docs/pictures.py                  # all of them, into docs/img/
    python docs/pictures.py --only sega sag --out /tmp/pictures

The images are exactly what the calls return; nothing is picked or retouched. tests/test_docs.py runs every
picture at two seeds to keep this script working.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from diffsteer import Pipeline
from diffsteer.atomic import atomic_file

STEPS = 20
SCALE = 2  # 64 px images shown at 128 px
LABEL_W = 230


def grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """Labelled rows of equally sized images, upscaled without smoothing so that pixels stay visible."""
    size = rows[0][1][0].width * SCALE
    cols = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (LABEL_W + cols * (size + 4), len(rows) * (size + 4)), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = r * (size + 4)
        draw.multiline_text((6, y + size // 2 - 12), label, fill=(255, 255, 255))
        for c, image in enumerate(images):
            sheet.paste(image.resize((size, size), Image.NEAREST), (LABEL_W + c * (size + 4), y))
    return sheet


def _same_seeds(pipe: Pipeline, prompt: str | list[str], seeds: list[int], *, as_calibrated: bool = True,
                **kwargs) -> list[Image.Image]:
    """One image per seed, each with the starting noise a single call with that seed would draw.

    ``as_calibrated``: DDIM with guidance at every step, as the plugins' strips and figures were measured; False is
    the model's own sampler and guidance interval (the seed grid)."""
    import torch

    prompts = prompt if isinstance(prompt, list) else [prompt] * len(seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if as_calibrated:
        pipe, kwargs["guidance_interval"] = pipe.with_scheduler("ddim"), (0.0, 1.0)
    return pipe(prompts, generator=generators, num_inference_steps=STEPS, **kwargs).images


def shapes_grid(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    prompts = [
        "a red circle on a white background",
        "a blue square on a black background",
        "a yellow triangle on a white background",
        "a green circle on the left on a black background",
        "a red circle and a blue square on a white background",
        "a yellow square and a green triangle on a black background",
    ]
    return grid([(p.replace(" on a", "\non a"), _same_seeds(pipe, p, seeds, as_calibrated=False)) for p in prompts])


def sega(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    from diffsteer_sega import Sega

    prompt = "a square on a white background"
    concept = {"prompt": "red", "guidance_scale": 5, "warmup_steps": 2, "threshold": 0.9}
    return grid([
        (f"{prompt}\n(no SEGA)", _same_seeds(pipe, prompt, seeds)),
        ("+ SEGA 'red'", _same_seeds(pipe, prompt, seeds, plugins=[Sega(concepts=[concept])])),
        ("- SEGA 'red' (reverse)", _same_seeds(pipe, prompt, seeds, plugins=[Sega(concepts=[{**concept, "reverse": True}])])),
    ])


def sag(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    from diffsteer_sag import Sag

    prompt = "a red circle and a blue square on a white background"
    return grid([
        (f"{prompt.replace(' on a', chr(10) + 'on a')}\n(no SAG)", _same_seeds(pipe, prompt, seeds)),
        ("+ SAG, sag_scale 0.75", _same_seeds(pipe, prompt, seeds, plugins=[Sag(sag_scale=0.75)])),
    ])


def prompt_weighting(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    from diffsteer_prompt_weighting import PromptWeighting

    rows = []
    for prompt in ("a red and blue circle on a white background",
                   "a (red)1.6 and blue circle on a white background",
                   "a red and (blue)1.6 circle on a white background"):
        rows.append((prompt.replace(" circle", "\ncircle"), _same_seeds(pipe, prompt, seeds, plugins=[PromptWeighting()])))
    return grid(rows)


def textual_inversion(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    from diffsteer_textual_inversion import TextualInversion

    return grid([
        ("a red shape\n(no token)", _same_seeds(pipe, "a red shape", seeds)),
        ("a red <wedge>\n(shipped embedding)",
         _same_seeds(pipe, "a red <wedge>", seeds, plugins=[TextualInversion(embeddings=["wedge"])])),
    ])


def controlnet(pipe: Pipeline, seeds: list[int]) -> Image.Image:
    from diffsteer.shapes import render_outline, sample_scene
    from diffsteer_controlnet import ControlNet

    # one scene per column: its outline is the control, its colour and shape the prompt (no position)
    scenes = [sample_scene(1000 + s, n_objects=1) for s in seeds]
    prompts = [f"a {s.objects[0].colour} {s.objects[0].shape}" for s in scenes]
    outlines = [render_outline(s) for s in scenes]
    return grid([
        ("control image\n(shapes-outline)", [o.convert("RGB") for o in outlines]),
        ("prompt alone\n(a <colour> <shape>)", _same_seeds(pipe, prompts, seeds)),
        ("+ ControlNet", _same_seeds(pipe, prompts, seeds, plugins=[ControlNet(model="shapes-outline", image=outlines)])),
    ])


PICTURES: dict[str, Callable[[Pipeline, list[int]], Image.Image]] = {
    "shapes-model": shapes_grid,
    "sega": sega,
    "sag": sag,
    "prompt-weighting": prompt_weighting,
    "textual-inversion": textual_inversion,
    "controlnet": controlnet,
}


def save(image: Image.Image, path: Path) -> None:
    """Write the PNG atomically (``diffsteer.atomic``), so an interrupted run leaves no half-written picture."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PICTURES), help="draw only these pictures")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img", help="output folder")
    parser.add_argument("--seeds", type=int, default=8, help="columns (seeds 0..N-1)")
    parser.add_argument("--model", default="shapes", help="model folder (default: the shipped shapes model)")
    args = parser.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model)
    seeds = list(range(args.seeds))
    for name in args.only or PICTURES:
        save(PICTURES[name](pipe, seeds), args.out / f"{name}.png")
        print(args.out / f"{name}.png")


if __name__ == "__main__":
    main()
