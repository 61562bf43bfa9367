"""Core benchmark: diffsteer against diffusers 0.42.1 on the same random SD 1.5-size weights.

Run (after ``pip install -e ".[test]"``)::

    python bench/bench_core.py                 # 256 and 512 px, 10 steps, CFG, fp32 and bf16
    python bench/bench_core.py --sizes 256 --repeats 1 --no-rss   # a quicker look

Both pipelines live in one process and their runs alternate, so drift in machine load hits both alike.
Peak RSS is measured in separate child processes (``ru_maxrss`` only grows). It prints Markdown tables:
time ratios, peak RSS, hook-layer overhead with 0 and 5 no-op plugins, UNet FLOPs per step and the
fraction of the measured matmul peak that was reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

CACHE = Path(os.environ.get("DIFFSTEER_BENCH_CACHE", Path(tempfile.gettempdir()) / "diffsteer-bench-sd15"))
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)
PROMPT = "a red circle and a blue square on a white background"


def build_model_folder() -> Path:
    """Random SD 1.5-size weights in the diffusers layout (written once, then reused)."""
    if (CACHE / "model_index.json").is_file():
        return CACHE
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsteer.shapes.vocab import build_tokenizer, load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    tokenizer = load_tokenizer(build_tokenizer(tmp / "tok"))
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE), text_encoder=te,
        tokenizer=tokenizer, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = CACHE.with_name(CACHE.name + ".tmp")
    pipe.save_pretrained(staging, safe_serialization=True)
    os.replace(staging, CACHE)
    return CACHE


def load(lib: str, dtype: torch.dtype):
    if lib == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(CACHE, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from diffsteer.pipeline import Pipeline

    return Pipeline.from_pretrained(CACHE, scheduler="ddim", torch_dtype=dtype)


def technique_parser(doc: str, *, steps: int, repeats: int) -> argparse.ArgumentParser:
    """The options every per-technique bench takes (``--size``, ``--steps``, ``--repeats``); add more to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def reference_pipeline(cls, base, **extra):
    """A diffusers technique pipeline ``cls`` sharing the components of ``base`` (no safety checker)."""
    ref = cls(**{k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
              safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)
    ref.set_progress_bar_config(disable=True)
    return ref


def generate(pipe, size: int, steps: int, plugins=()):
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np",
              generator=torch.Generator().manual_seed(0))
    if plugins:
        kw["plugins"] = plugins
    return pipe(PROMPT, **kw).images


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_seconds(pipe, size: int) -> float:
    """One VAE decode of one image, in the VAE's own dtype (each library picks it under bf16)."""
    z = torch.randn(1, 4, size // 8, size // 8, dtype=pipe.vae.dtype)
    with torch.inference_mode():
        pipe.vae.decode(z)  # warm-up
        return timed(lambda: pipe.vae.decode(z))


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t = timed(lambda: [torch.mm(a, b) for _ in range(reps)])
    return 2 * n**3 * reps / t / 1e9


def unet_flops(pipe, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    lat = torch.randn(2, 4, size // 8, size // 8, dtype=unet.dtype)
    text = torch.randn(2, 77, 768, dtype=unet.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(lat, torch.tensor(500), text)
    return counter.get_total_flops() / 1e9


# -- hook-layer overhead ----------------------------------------------------------------------------------


def noop_plugins(count: int):
    from diffsteer import Plugin, hookimpl

    class NoOp(Plugin):
        name = "noop"

        @hookimpl
        def diffsteer_setup(self, call): ...
        @hookimpl
        def diffsteer_guidance_branches(self, call, branches): ...
        @hookimpl
        def diffsteer_prepare_latents(self, call, latents): ...
        @hookimpl
        def diffsteer_attention_patches(self, call, register): ...
        @hookimpl
        def diffsteer_pre_step(self, call, step): ...
        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs): ...
        @hookimpl
        def diffsteer_noise_prediction(self, call, step, predictions): ...
        @hookimpl
        def diffsteer_guidance(self, call, step, predictions): ...
        @hookimpl
        def diffsteer_post_step(self, call, step): ...
        @hookimpl
        def diffsteer_teardown(self, call, error): ...

    return [NoOp() for _ in range(count)]


def hook_overhead_per_call(n_plugins: int, steps: int) -> float:
    """Seconds the hook layer adds to one generation call of ``steps`` steps.

    Measures the manager construction and every hook dispatch the loop makes, with ``n_plugins``
    registered no-op plugins, exactly as the pipeline makes them.
    """
    from diffsteer.plugins import make_manager

    plugins = noop_plugins(n_plugins)

    def one_call():
        pm = make_manager(plugins)
        h = pm.hook
        h.diffsteer_setup(call=None)
        h.diffsteer_encode_prompt(call=None, texts=[])
        h.diffsteer_encode_prompt(call=None, texts=[])
        h.diffsteer_guidance_branches(call=None, branches=None)
        for impl in reversed(h.diffsteer_prepare_latents.get_hookimpls()):
            impl.function(call=None, latents=None)
        h.diffsteer_attention_patches(call=None, register=None)
        for _ in range(steps):
            h.diffsteer_pre_step(call=None, step=None)
            h.diffsteer_model_inputs(call=None, step=None, inputs=None)
            h.diffsteer_noise_prediction(call=None, step=None, predictions=None)
            h.diffsteer_combine_guidance(call=None, step=None, predictions=None)
            h.diffsteer_guidance(call=None, step=None, predictions=None)
            h.diffsteer_post_step(call=None, step=None)
        h.diffsteer_decode(call=None, latents=None)
        h.diffsteer_teardown(call=None, error=None)

    reps = 200
    return min(timeit.repeat(one_call, number=reps, repeat=5)) / reps


# -- RSS in a child process ------------------------------------------------------------------------------


def child_rss(lib: str, dtype: str, size: int, steps: int) -> float:
    code = (
        "import resource, sys, torch; sys.path.insert(0, %r); import bench_core as b; "
        "p = b.load(%r, getattr(torch, %r)); b.generate(p, %d, %d); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    ) % (str(Path(__file__).parent), lib, dtype, size, steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    build_model_folder()
    figures: dict = {"threads": torch.get_num_threads(), "peak_gflops": {}, "runs": []}
    for dt in args.dtypes:
        figures["peak_gflops"][dt] = matmul_peak(getattr(torch, dt))

    print("\n| dtype | size | diffusers s | diffsteer s | ratio | UNet GFLOP/step | diffsteer % of matmul peak "
          "| VAE decode s (diffusers / diffsteer) |")
    print("|---|---|---|---|---|---|---|---|")
    step_seconds = {}
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        pipes = {lib: load(lib, dtype) for lib in ("diffusers", "diffsteer")}
        for size in args.sizes:
            times: dict[str, list[float]] = {"diffusers": [], "diffsteer": []}
            for lib in pipes:  # warm-up
                generate(pipes[lib], size, 1)
            for r in range(args.repeats):
                order = ["diffusers", "diffsteer"] if r % 2 == 0 else ["diffsteer", "diffusers"]
                for lib in order:
                    times[lib].append(timed(lambda: generate(pipes[lib], size, args.steps)))
            gflop = unet_flops(pipes["diffsteer"], size)
            decode = {lib: decode_seconds(pipes[lib], size) for lib in pipes}
            d, s = statistics.median(times["diffusers"]), statistics.median(times["diffsteer"])
            # UNet share of a step ~ whole call minus text encode and decode; use the whole call: a lower bound.
            achieved = gflop * args.steps / s
            frac = achieved / figures["peak_gflops"][dt]
            step_seconds[(dt, size)] = s / args.steps
            figures["runs"].append(dict(dtype=dt, size=size, diffusers_s=d, diffsteer_s=s, ratio=s / d,
                                        unet_gflop_per_step=gflop, peak_fraction=frac, decode_s=decode))
            print(f"| {dt} | {size} | {d:.2f} | {s:.2f} | {s / d:.3f} | {gflop:.0f} | {100 * frac:.0f}% "
                  f"| {decode['diffusers']:.2f} / {decode['diffsteer']:.2f} |")
        del pipes

    print(f"\nmatmul peak (2048², {torch.get_num_threads()} threads): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in figures["peak_gflops"].items()))
    if "float32" in args.dtypes and "bfloat16" in args.dtypes:
        for size in args.sizes:
            f32 = next(r for r in figures["runs"] if r["dtype"] == "float32" and r["size"] == size)
            b16 = next(r for r in figures["runs"] if r["dtype"] == "bfloat16" and r["size"] == size)
            print(f"bf16 speed-up at {size}px: diffsteer {f32['diffsteer_s'] / b16['diffsteer_s']:.2f}x, "
                  f"diffusers {f32['diffusers_s'] / b16['diffusers_s']:.2f}x")

    print("\n| hook layer | seconds per call | share of a 256px fp32 call |")
    print("|---|---|---|")
    ref_call = step_seconds.get(("float32", min(args.sizes)), 1.0) * args.steps
    for n in (0, 5):
        o = hook_overhead_per_call(n, args.steps)
        figures[f"hook_overhead_{n}"] = o / ref_call
        print(f"| {n} no-op plugins | {o * 1e3:.3f} ms | {100 * o / ref_call:.4f}% |")

    if not args.no_rss:
        print("\n| peak RSS (fp32, %dpx, child process) | MiB |\n|---|---|" % min(args.sizes))
        for lib in ("diffusers", "diffsteer"):
            rss = child_rss(lib, "float32", min(args.sizes), 2)
            figures[f"rss_{lib}"] = rss
            print(f"| {lib} | {rss:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
