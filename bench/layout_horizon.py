"""From how much noise can a shapes model still finish a clean two-object scene?

Run (after ``pip install -e .``)::

    python bench/layout_horizon.py                        # the shipped model
    python bench/layout_horizon.py --model runs/x/model   # any model folder

For each of the first ``--double`` two-object prompts of the strict evaluation, the renderer draws one
correct scene for the caption; img2img then noises it to ``strength`` (1.0: pure noise, the scene is
forgotten) and the model denoises it under its caption, DDIM 20 steps, CFG 7.5 at every step (``--guidance-interval``
changes that; ``model`` takes the model folder's own). A row per strength gives
how many results the strict evaluator calls clean. Where the count falls tells which noise levels the
model gets wrong: a model that finishes every scene from 0.6 but few from 1.0 loses two-object scenes
while it lays them out, at the noisiest timesteps, not while it draws the shapes.
"""

from __future__ import annotations

import argparse

import torch

from diffsteer import Pipeline
from diffsteer.shapes.benchmark import STRICT_SEED_BASE, failure_summary, strict_prompts
from diffsteer.shapes.strict import strict_verdict
from diffsteer.shapes.world import render, scene_from_caption

STRENGTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--double", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance-interval", default="0,1", metavar="LO,HI",
                    help="where CFG acts (default 0,1: every step, as bench/results.md's rows were measured; 'model': "
                    "the model folder's own)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    interval = None if args.guidance_interval == "model" else tuple(float(v) for v in args.guidance_interval.split(","))
    prompts = strict_prompts(n_single=0, n_double=args.double, n_open=0, n_position=0)["double"]
    # one rendered scene per prompt, the same in every row
    starts = [render(scene_from_caption(p, rng=i)) for i, p in enumerate(prompts)]
    print("| img2img strength | clean pairs | most common failed criteria |")
    print("|---|---|---|")
    for strength in STRENGTHS:
        verdicts = [
            strict_verdict(
                pipe(p, image=start, strength=strength, num_inference_steps=20, seed=STRICT_SEED_BASE + i,
                     guidance_interval=interval).images[0],
                p,
            )
            for i, (p, start) in enumerate(zip(prompts, starts))
        ]
        worst = failure_summary(v.criteria for v in verdicts)
        print(f"| {strength} | {sum(v.clean for v in verdicts)} / {len(verdicts)} | {worst} |", flush=True)


if __name__ == "__main__":
    main()
