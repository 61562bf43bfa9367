"""SAG benchmark: diffsteer + sag against diffusers 0.42.1's StableDiffusionSAGPipeline, same random SD 1.5-size weights.

Run (after ``pip install -e ".[test]" -e plugins/sag``)::

    python bench/bench_sag.py            # 256 px, 10 steps, CFG 7.5, sag_scale 0.75, fp32, median of 2
    python bench/bench_sag.py --small    # a quicker look: 3 steps, median of 2 (about 3 minutes on 2 cores)

The weights, the loaders, the plain runs and the timing helper come from ``bench_core`` (the same cached
folder); the SAG runs add ``sag_scale`` / ``plugins=[Sag()]`` to the same arguments. Runs of the
two libraries alternate, so drift in machine load hits both alike. Each library is also timed without SAG, so
the table shows what SAG itself costs: one extra UNet pass per step over one branch (the unconditional rows),
i.e. a batch of 1 beside CFG's batch of 2. Output is decoded to images, as in the core benchmark.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402
from bench_core import PROMPT, build_model_folder, technique_parser, timed  # noqa: E402

SAG_SCALE = 0.75
LIBS = ["diffusers", "diffsteer"]


def sag_reference(plain):
    """diffusers' SAG pipeline on the components of bench_core's plain StableDiffusionPipeline (no second copy)."""
    from diffusers import StableDiffusionSAGPipeline

    pipe = StableDiffusionSAGPipeline(**plain.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(lib: str, pipes: dict, size: int, steps: int, sag: bool):
    """One call: plain runs are bench_core's own; SAG runs pass the same arguments plus SAG."""
    if not sag:
        return bench_core.generate(pipes[lib], size, steps)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np",
              generator=torch.Generator().manual_seed(0))
    if lib == "diffusers":
        return pipes["diffusers-sag"](PROMPT, sag_scale=SAG_SCALE, **kw).images
    from diffsteer_sag import Sag

    return pipes[lib](PROMPT, plugins=[Sag(sag_scale=SAG_SCALE)], **kw).images


def main() -> None:
    ap = technique_parser(__doc__, steps=10, repeats=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--small", action="store_true", help="3 steps, median of 2: a quicker look (about 3 minutes)")
    args = ap.parse_args()
    if args.small:
        # One run per case is too noisy to read a ratio from (a single run was seen 5x off): keep two.
        args.steps, args.repeats = 3, 2

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{args.size}px, {args.steps} DDIM steps, CFG 7.5, sag_scale {SAG_SCALE}, median of {args.repeats}")
    build_model_folder()
    rows, costs = [], []
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        pipes = {lib: bench_core.load(lib, dtype) for lib in LIBS}
        pipes["diffusers-sag"] = sag_reference(pipes["diffusers"])
        warm = {(lib, sag): generate(lib, pipes, args.size, 1, sag) for lib in LIBS for sag in (False, True)}
        for sag in (False, True):  # the two libraries compute the same images (1-step warm-up runs)
            delta = float(abs(warm[("diffusers", sag)] - warm[("diffsteer", sag)]).max())
            print(f"{dt} {'SAG' if sag else 'plain'}: diffsteer vs diffusers images, max|Δ| = {delta:.1e}")
        times = {(lib, sag): [] for lib in LIBS for sag in (False, True)}
        for r in range(args.repeats):
            order = LIBS if r % 2 == 0 else LIBS[::-1]
            for sag in (False, True):
                for lib in order:
                    times[(lib, sag)].append(timed(lambda: generate(lib, pipes, args.size, args.steps, sag)))
        med = {key: statistics.median(v) for key, v in times.items()}
        for sag, label in ((False, "plain (CFG)"), (True, "SAG (CFG)")):
            d, s = med[("diffusers", sag)], med[("diffsteer", sag)]
            rows.append(f"| {dt} | {label} | {d:.2f} | {s:.2f} | {s / d:.3f} |")
        costs.append(f"| {dt} | " + " | ".join(f"{med[(lib, True)] / med[(lib, False)]:.3f}" for lib in LIBS) + " |")
        del pipes

    print("\n| dtype | case | diffusers s | diffsteer s | ratio diffsteer/diffusers |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| dtype | SAG time / plain time, diffusers | same, diffsteer |\n|---|---|---|")
    print("\n".join(costs))


if __name__ == "__main__":
    main()
