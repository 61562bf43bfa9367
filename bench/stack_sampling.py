"""The five-plugin stack of ``tests/test_composition.py`` under another sampler or guidance interval.

Run (after the README's test install)::

    python bench/stack_sampling.py                                        # Euler ancestral: every step, then 0-0.6
    python bench/stack_sampling.py --scheduler ddim --intervals 0,1       # what the test measures

The test calibrates the stack with DDIM at every step; this prints the same five measures (same prompts, seeds,
plugins and outlines, imported from the test) for each interval given, so that the README can say what the stack
does under the shapes model's own sampling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffsteer import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_composition as stack_test  # noqa: E402  (the test's prompts, seeds, outlines and measures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheduler", default="euler_a")
    ap.add_argument("--intervals", nargs="+", default=["0,1", "0,0.6"], metavar="LO,HI")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = stack_test.make_parts()
    pipe = Pipeline.from_pretrained("shapes", scheduler=args.scheduler)
    for text in args.intervals:
        pipe.guidance_interval = tuple(float(v) for v in text.split(","))  # what calls that name none use
        runs = stack_test.make_runs(pipe, parts)
        print(f"{args.scheduler}, guidance interval {text}, {stack_test.N} seeds, {stack_test.STEPS} steps")
        print("\n".join(stack_test.figures(runs)), flush=True)


if __name__ == "__main__":
    main()
