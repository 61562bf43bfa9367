"""Strict clean counts of a shapes model under several classifier-free-guidance settings.

Run (after ``pip install -e .``)::

    python bench/guidance_sweep.py                       # the shipped model
    python bench/guidance_sweep.py --model runs/x/model  # any model folder

It asks whether a sampling setting, rather than training, would lift the strict figures of
``diffsteer eval shapes --strict``: the first ``--double`` two-object, ``--single`` single-object and ``--open``
colour-open prompts of the strict evaluation (``score_strict``, its fresh seeds, or ``--seed-base``'s), DDIM 20 steps,
a row per setting. ``--seed-base 80000`` is where the shipped model's guidance interval was chosen.
"""

from __future__ import annotations

import argparse

import torch

from diffsteer import Pipeline
from diffsteer.shapes.benchmark import STRICT_SEED_BASE, failure_summary, score_strict

#: (CFG scale, guidance rescale, guidance interval): every row names its interval, so that a model folder's own
#: recommendation does not silently apply to some rows.
FULL = (0.0, 1.0)
SETTINGS = (
    (4.0, 0.0, FULL), (7.5, 0.0, FULL), (10.0, 0.0, FULL), (7.5, 0.7, FULL), (12.0, 0.7, FULL),
    (7.5, 0.0, (0.0, 0.5)), (7.5, 0.0, (0.0, 0.6)), (7.5, 0.0, (0.0, 0.65)), (7.5, 0.0, (0.0, 0.7)),
    (10.0, 0.0, (0.0, 0.6)),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--single", type=int, default=48)
    ap.add_argument("--double", type=int, default=48)
    ap.add_argument("--open", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed-base", type=int, default=STRICT_SEED_BASE,
                    help="generation seeds start here (default: the strict evaluation's own)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    order = ("double", "single", "open")
    print("| CFG scale | guidance rescale | guidance interval | " + " | ".join(order)
          + " | most common failed criteria of pairs |")
    print("|---|---|---|" + "---|" * (len(order) + 1))
    for scale, rescale, interval in SETTINGS:
        # the evaluation's own prompts and seeds in every row, so rows differ only by the setting
        score = score_strict(pipe, n_single=args.single, n_double=args.double, n_open=args.open, n_position=0,
                             guidance_scale=scale, guidance_rescale=rescale, guidance_interval=interval,
                             seed_base=args.seed_base)
        cells = [f"{sum(bool(v['clean']) for v in score.strict[k])} / {len(score.strict[k])}" for k in order]
        worst = failure_summary(score.strict["double"])
        print(f"| {scale} | {rescale} | {interval[0]:g}–{interval[1]:g} | " + " | ".join(cells) + f" | {worst} |",
              flush=True)


if __name__ == "__main__":
    main()
