"""Strict clean counts of a shapes model under several classifier-free-guidance settings.

Run (after ``pip install -e .``)::

    python bench/guidance_sweep.py                       # the shipped model
    python bench/guidance_sweep.py --model runs/x/model  # any model folder

It asks whether a sampling setting, rather than training, would lift the strict figures of
``diffsteer eval shapes --strict``: the first ``--double`` two-object, ``--single`` single-object and ``--open``
colour-open prompts of the strict evaluation (``score_strict``, its fresh seeds, or ``--seed-base``'s), 20 steps,
a row per setting. ``--seed-base 80000`` is where the shipped model's guidance interval and sampler were chosen.
``--table guidance`` varies the guidance under DDIM, ``--table sampler`` the sampler under the shipped interval.
"""

from __future__ import annotations

import argparse

import torch

from diffsteer import Pipeline
from diffsteer.shapes.benchmark import STRICT_SEED_BASE, failure_summary, score_strict

#: (sampler, CFG scale, guidance rescale, guidance interval): every row names its sampler and interval, so that a
#: model folder's own recommendations do not silently apply to some rows.
FULL, SHIPPED = (0.0, 1.0), (0.0, 0.6)
TABLES = {
    "guidance": (
        ("ddim", 4.0, 0.0, FULL), ("ddim", 7.5, 0.0, FULL), ("ddim", 10.0, 0.0, FULL), ("ddim", 7.5, 0.7, FULL),
        ("ddim", 12.0, 0.7, FULL), ("ddim", 7.5, 0.0, (0.0, 0.5)), ("ddim", 7.5, 0.0, SHIPPED),
        ("ddim", 7.5, 0.0, (0.0, 0.65)), ("ddim", 7.5, 0.0, (0.0, 0.7)), ("ddim", 10.0, 0.0, SHIPPED),
    ),
    # deterministic (ddim, euler, dpmpp_2m) against stochastic samplers (euler_a, dpmpp_2m_sde, ddpm)
    "sampler": (
        ("ddim", 7.5, 0.0, SHIPPED), ("euler", 7.5, 0.0, SHIPPED), ("dpmpp_2m", 7.5, 0.0, SHIPPED),
        ("euler_a", 7.5, 0.0, SHIPPED), ("dpmpp_2m_sde", 7.5, 0.0, SHIPPED), ("ddpm", 7.5, 0.0, SHIPPED),
        ("euler_a", 7.5, 0.0, FULL), ("euler_a", 7.5, 0.0, (0.0, 0.5)), ("euler_a", 7.5, 0.0, (0.0, 0.65)),
        ("euler_a", 7.5, 0.0, (0.0, 0.7)),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--single", type=int, default=48)
    ap.add_argument("--double", type=int, default=48)
    ap.add_argument("--open", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed-base", type=int, default=STRICT_SEED_BASE,
                    help="generation seeds start here (default: the strict evaluation's own)")
    ap.add_argument("--table", choices=sorted(TABLES), default="guidance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    order = ("double", "single", "open")
    print("| sampler | CFG scale | guidance rescale | guidance interval | " + " | ".join(order)
          + " | most common failed criteria of pairs |")
    print("|---|---|---|---|" + "---|" * (len(order) + 1))
    for sampler, scale, rescale, interval in TABLES[args.table]:
        # the evaluation's own prompts and seeds in every row, so rows differ only by the setting
        score = score_strict(pipe.with_scheduler(sampler), n_single=args.single, n_double=args.double,
                             n_open=args.open, n_position=0, guidance_scale=scale, guidance_rescale=rescale,
                             guidance_interval=interval, seed_base=args.seed_base)
        cells = [f"{sum(bool(v['clean']) for v in score.strict[k])} / {len(score.strict[k])}" for k in order]
        worst = failure_summary(score.strict["double"])
        print(f"| {sampler} | {scale} | {rescale} | {interval[0]:g}–{interval[1]:g} | " + " | ".join(cells)
              + f" | {worst} |", flush=True)


if __name__ == "__main__":
    main()
