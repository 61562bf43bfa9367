"""SEGA benchmark: diffsteer + the sega plugin against diffusers 0.42.1's SemanticStableDiffusionPipeline,
on the same random SD 1.5-size weights, with 1 and 3 concepts.

Run (after ``pip install -e ".[test]" -e plugins/sega``)::

    python bench/bench_sega.py                       # 256 px, 4 steps, CFG, fp32, 2 repeats
    python bench/bench_sega.py --steps 2 --repeats 1 # a quicker look

The reference runs the concept rows in the same batched UNet call as CFG, as diffsteer does, so the two
should cost the same; the concept rows make a call ``(2 + concepts) / 2`` times the UNet work of plain
CFG. Runs of the two libraries alternate in one process. Prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import PROMPT, build_model_folder, load, reference_pipeline, technique_parser, timed  # noqa: E402

CONCEPTS = ["red", "blue square", "black background"]


def main() -> None:
    parser = technique_parser(__doc__, steps=4, repeats=2)
    args = parser.parse_args()

    build_model_folder()
    from diffusers import SemanticStableDiffusionPipeline

    from diffsteer_sega import Sega

    base = load("diffusers", torch.float32)
    ref = reference_pipeline(SemanticStableDiffusionPipeline, base)
    mine = load("diffsteer", torch.float32)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                  output_type="np")

    def run(lib: str, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        if lib == "diffusers":
            ref(PROMPT, editing_prompt=CONCEPTS[:n], edit_warmup_steps=1, generator=generator, **common)
        else:
            mine(PROMPT, plugins=[Sega.from_diffusers(CONCEPTS[:n], edit_warmup_steps=1)], generator=generator,
                 **common)

    cases = (1, 3)
    for n in cases:  # warm-up
        run("diffusers", n), run("diffsteer", n)
    times: dict[tuple[str, int], list[float]] = {(lib, n): [] for lib in ("diffusers", "diffsteer") for n in cases}
    for r in range(args.repeats):
        order = ["diffusers", "diffsteer"] if r % 2 == 0 else ["diffsteer", "diffusers"]
        for n in cases:
            for lib in order:
                times[(lib, n)].append(timed(lambda: run(lib, n)))
    print(f"\n{args.size}px, {args.steps} steps, CFG 7.5, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| concepts | diffusers s | diffsteer s | ratio diffsteer/diffusers |\n|---|---|---|---|")
    for n in cases:
        d, s = (statistics.median(times[(lib, n)]) for lib in ("diffusers", "diffsteer"))
        print(f"| {n} | {d:.2f} | {s:.2f} | {s / d:.3f} |")


if __name__ == "__main__":
    main()
