"""Shapes-model benchmark: one 64x64 image, 20 steps, CFG 7.5, diffsteer against diffusers 0.42.1 on the shipped weights.

Run (after ``pip install -e ".[test]"``)::

    python bench/bench_shapes.py                 # DDIM, 20 steps, median of 7 alternating runs per library
    python bench/bench_shapes.py --threads 1     # what one core gives (e.g. beside a training run)

The issue's target is at most 1 s per image on the 2-core CPU. Both libraries load the same shipped folder
(diffusers through ``StableDiffusionPipeline.from_pretrained``, which reads the diffsteer-written layout as
is); runs alternate so drift in machine load hits both alike. The table also gives the shipped size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffsteer import Pipeline
from diffsteer.loading.pipeline_loader import shipped_model_dir

PROMPT = "a red circle and a blue square on a white background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = shipped_model_dir()
    ours = Pipeline.from_pretrained(root, scheduler="ddim")
    ref = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False,
                                                  torch_dtype=torch.float32)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")

    def run(lib: str, seed: int) -> float:
        pipe = ours if lib == "diffsteer" else ref
        t = time.perf_counter()
        pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw)
        return time.perf_counter() - t

    for lib in ("diffusers", "diffsteer"):
        run(lib, 0)  # warm-up
    times: dict[str, list[float]] = {"diffusers": [], "diffsteer": []}
    for r in range(args.repeats):
        for lib in ("diffusers", "diffsteer"):
            times[lib].append(run(lib, r))
    med = {lib: statistics.median(v) for lib, v in times.items()}
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"shapes model, 64x64, {args.steps} steps DDIM, CFG 7.5, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| library | s / image | ratio diffsteer/diffusers |")
    print("|---|---|---|")
    print(f"| diffusers 0.42.1 | {med['diffusers']:.3f} | |")
    print(f"| diffsteer | {med['diffsteer']:.3f} | {med['diffsteer'] / med['diffusers']:.3f} |")
    print(f"shipped size: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
