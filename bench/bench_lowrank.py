"""Low-rank weight overrides: merge ``up @ down`` into the weight, or run the factored product? Measured per layer.

Run::

    python bench/bench_lowrank.py                  # SD 1.5 layer shapes at 512 px, CFG batch 2, fp32
    python bench/bench_lowrank.py --dtype bfloat16 --ranks 4 64

For each SD 1.5 layer kind a LoRA touches it times one forward of the layer with a rank-r override both ways
(through :func:`diffsteer.models.context.linear`/``conv`` with the choice forced), and prints which was faster
next to the choice that :func:`~diffsteer.models.context.merge_is_cheaper` makes from the flop counts.
Merging costs ``r * in * out`` per pass whatever the batch; the factored product costs ``r * tokens * (in + out)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from torch import nn

from diffsteer.models import context as ctx_mod
from diffsteer.models.context import ForwardContext, LowRank, WeightPatch

# (label, kind, in, out, tokens or (h, w), kernel) at 512 px with CFG (batch 2); latents 64x64.
LAYERS = [
    ("self-attn q/k/v/out, 64x64", "linear", 320, 320, 2 * 64 * 64, 1),
    ("cross-attn k/v (77 text tokens)", "linear", 768, 320, 2 * 77, 1),
    ("cross-attn k/v, 1280 wide", "linear", 768, 1280, 2 * 77, 1),
    ("ff out, 8x8", "linear", 5120, 1280, 2 * 8 * 8, 1),
    ("ff in (GEGLU), 32x32", "linear", 640, 5120, 2 * 32 * 32, 1),
    ("resnet conv 3x3, 64x64", "conv", 320, 320, (64, 64), 3),
    ("resnet conv 3x3, 8x8", "conv", 1280, 1280, (8, 8), 3),
]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats}; ms per layer forward\n")
    print("| layer | rank | plain ms | merged ms | factored ms | faster | rule picks |\n|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for label, kind, n_in, n_out, size, k in LAYERS:
            if kind == "linear":
                layer = nn.Linear(n_in, n_out).to(dtype)
                x = torch.randn(2, size // 2, n_in, dtype=dtype)
                tokens, fan_in = size, n_in
            else:
                layer = nn.Conv2d(n_in, n_out, k, padding=k // 2).to(dtype)
                x = torch.randn(2, n_in, *size, dtype=dtype)
                tokens, fan_in = 2 * size[0] * size[1], n_in * k * k
            layer._diffsteer_path = "layer"  # type: ignore[attr-defined]
            run = ctx_mod.linear if kind == "linear" else ctx_mod.conv
            plain = timed(lambda: layer(x), args.repeats)
            for rank in args.ranks:
                down_shape = (rank, n_in) if kind == "linear" else (rank, n_in, k, k)
                up_shape = (n_out, rank) if kind == "linear" else (n_out, rank, 1, 1)
                patch = WeightPatch(low_rank=(LowRank(torch.randn(down_shape, dtype=dtype), torch.randn(up_shape, dtype=dtype)),))
                context = ForwardContext(weights={"layer": patch})
                result = {}
                for forced in (True, False):
                    with mock.patch.object(ctx_mod, "merge_is_cheaper", lambda *a, forced=forced: forced):
                        result[forced] = timed(lambda: run(layer, x, context), args.repeats)
                faster = "merged" if result[True] < result[False] else "factored"
                picks = "merged" if ctx_mod.merge_is_cheaper(tokens, fan_in, n_out) else "factored"
                print(f"| {label} | {rank} | {plain * 1e3:.2f} | {result[True] * 1e3:.2f} | {result[False] * 1e3:.2f} "
                      f"| {faster} | {picks} |", flush=True)


if __name__ == "__main__":
    main()
