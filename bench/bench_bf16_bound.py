"""How far bf16 can speed up one SD 1.5-size UNet step on this CPU, and what bounds it.

Run (after ``pip install -e ".[test]"``; reuses ``bench_core``'s random SD 1.5-size folder)::

    python bench/bench_bf16_bound.py              # 512 px, batch 2 (CFG), 2 repeats
    python bench/bench_bf16_bound.py --size 256

For fp32 and bf16 it times whole UNet steps and, inside them, every call of
``F.scaled_dot_product_attention``. It prints the attention and non-attention seconds, the bf16 speed-up
of each, and what the target (2.5x, the core issue's) asks of the non-attention part while attention
keeps SDPA's speed (Amdahl). If that exceeds the bf16/fp32 matmul-peak ratio, only a faster bf16
attention kernel can reach the target.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench_core import build_model_folder, matmul_peak


@contextmanager
def timed_sdpa(totals: list[float]):
    """Wrap SDPA for the duration; each call's wall time is appended to ``totals``."""
    original = F.scaled_dot_product_attention

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = original(*args, **kwargs)
        totals.append(time.perf_counter() - t)
        return out

    F.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def step_seconds(unet, size: int, repeats: int) -> tuple[float, float]:
    """Median (step seconds, attention seconds) over ``repeats`` batch-2 steps, after one warm-up."""
    lat = torch.randn(2, 4, size // 8, size // 8, dtype=unet.dtype)
    text = torch.randn(2, 77, 768, dtype=unet.dtype)
    steps, attn = [], []
    with torch.inference_mode():
        unet(lat, torch.tensor(500), text)
        for _ in range(repeats):
            calls: list[float] = []
            with timed_sdpa(calls):
                t = time.perf_counter()
                unet(lat, torch.tensor(500), text)
                steps.append(time.perf_counter() - t)
            attn.append(sum(calls))
    return statistics.median(steps), statistics.median(attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--target", type=float, default=2.5, help="the whole-step bf16 speed-up to test against")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    from diffsteer.pipeline import Pipeline

    folder = build_model_folder()
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        unet = Pipeline.from_pretrained(folder, scheduler="ddim", torch_dtype=dtype).unet
        rows[dtype] = step_seconds(unet, args.size, args.repeats)
        del unet
    peak_ratio = matmul_peak(torch.bfloat16) / matmul_peak(torch.float32)

    (f_step, f_attn), (b_step, b_attn) = rows[torch.float32], rows[torch.bfloat16]
    f_rest, b_rest = f_step - f_attn, b_step - b_attn
    print(f"\nOne UNet step, {args.size} px, batch 2, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| part | fp32 s | bf16 s | bf16 speed-up |")
    print("|---|---|---|---|")
    print(f"| SDPA attention | {f_attn:.2f} | {b_attn:.2f} | {f_attn / b_attn:.2f}x |")
    print(f"| everything else | {f_rest:.2f} | {b_rest:.2f} | {f_rest / b_rest:.2f}x |")
    print(f"| whole step | {f_step:.2f} | {b_step:.2f} | {f_step / b_step:.2f}x |")
    budget = f_step / args.target - b_attn
    need = f"{f_rest / budget:.2f}x" if budget > 0 else "more than infinitely fast (attention alone is over budget)"
    print(f"\nAttention share of the bf16 step: {b_attn / b_step:.0%}. bf16/fp32 matmul peak ratio: {peak_ratio:.2f}x.")
    print(f"With SDPA as fast as it is, {args.target}x on the whole step needs everything else {need} faster in bf16.")


if __name__ == "__main__":
    main()
