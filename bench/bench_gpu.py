"""GPU bench: diffsteer against diffusers 0.42.1, eager and compiled, on random SD 1.5-size weights.

One process builds random SD 1.5-size weights in memory (nothing is downloaded or written but the table),
loads them into both libraries and times whole calls (text encoding, CFG, DDIM, ``output_type="latent"``)::

    python bench/bench_gpu.py --out bench/gpu.md                  # 512 px, 30 steps, every row
    python bench/bench_gpu.py --quick --out bench/gpu.md          # 10 steps, the four rows the targets need
    python bench/bench_gpu.py --device cpu --quick --backend eager --out /tmp/t.md   # tiny model, a smoke test
    python bench/bench_gpu.py --device cpu --full-size --size 256 --steps 2 --repeats 1 \
        --eager bf16:1 --only eager --only compiled --compile-dtype bf16   # compiled bf16 on a CPU

Rows: eager fp16/bf16 at batch 1 and 4; ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs)
at fp16 batch 1 for both libraries; and a SEGA + SAG + ControlNet stack in diffsteer, eager and compiled
(diffusers has no pipeline that stacks these). it/s is denoising steps per second of a whole call; "time ratio"
is diffsteer's time over diffusers' (below 1: diffsteer is faster). Compiled rows report the first call's
seconds (the compile) and the graph breaks dynamo counted. The table goes to stdout and, rewritten after each
row (so a run cut short keeps its rows), to ``--out``. A row that fails prints its error and the run goes on.

Needs torch, transformers, pydantic, pluggy, einops and diffusers importable; diffsteer and the plugins are
taken from this checkout when they are not installed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for src in [ROOT / "core", *sorted((ROOT / "plugins").glob("*/src"))]:
    if str(src) not in sys.path:
        sys.path.append(str(src))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_core import PROMPT, SD15_UNET, SD15_VAE  # noqa: E402

SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
# The same layout at a width a CPU runs in seconds (the --device cpu smoke test).
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=16)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 16, 32, 32), norm_num_groups=16)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Models:
    """Random weights built once (float32) and the per-dtype pipelines of both libraries made from them."""

    def __init__(self, device: str, tiny: bool) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffsteer.shapes.vocab import build_tokenizer, load_tokenizer

        self.device = device
        self.tokenizer = load_tokenizer(build_tokenizer(Path(tempfile.mkdtemp(prefix="bench-gpu-tok-"))))
        tok = self.tokenizer
        torch.manual_seed(0)
        with torch.device(device):
            self.unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).eval()
            self.vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).eval()
            self.text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **(TINY_TEXT if tiny else SD15_TEXT),
            )).eval()
        self._cache: dict[tuple[str, torch.dtype], Any] = {}

    def diffusers(self, dtype: torch.dtype) -> Any:
        if ("diffusers", dtype) not in self._cache:
            from diffusers import DDIMScheduler, StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                unet=copy.deepcopy(self.unet).to(dtype), vae=copy.deepcopy(self.vae).to(dtype),
                text_encoder=copy.deepcopy(self.text_encoder).to(dtype), tokenizer=self.tokenizer,
                scheduler=DDIMScheduler(**DDIM), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            self._cache["diffusers", dtype] = pipe
        return self._cache["diffusers", dtype]

    def diffsteer(self, dtype: torch.dtype) -> Any:
        if ("diffsteer", dtype) not in self._cache:
            from diffsteer.models import AutoencoderKL, UNet2DConditionModel
            from diffsteer.pipeline import Pipeline
            from diffsteer.schedulers import make_scheduler

            unet = UNet2DConditionModel(dict(self.unet.config))
            unet.load_state_dict(self.unet.state_dict())
            vae = AutoencoderKL(dict(self.vae.config))
            vae.load_state_dict(self.vae.state_dict())
            self._cache["diffsteer", dtype] = Pipeline(
                unet.to(self.device, dtype), vae.to(self.device, dtype),
                copy.deepcopy(self.text_encoder).to(dtype), self.tokenizer, make_scheduler("ddim", DDIM),
                name="random-sd15",
            )
        return self._cache["diffsteer", dtype]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call_seconds(pipe: Any, device: str, size: int, steps: int, batch: int, plugins: list = ()) -> float:
    kw: dict[str, Any] = dict(
        num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="latent",
        num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(0),
    )
    if plugins:
        kw["plugins"] = plugins
    sync(device)
    start = time.perf_counter()
    pipe(PROMPT, **kw)
    sync(device)
    return time.perf_counter() - start


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[str] = []
        self.header = (
            f"{args.size} px, {args.steps} steps, CFG 7.5, DDIM, random SD 1.5{' (tiny)' if args.tiny else ''}-size "
            f"weights; torch {torch.__version__}, {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}; "
            f"best of {args.repeats} calls after a warm-up call\n\n"
            "| mode | dtype | batch | diffsteer it/s | diffusers it/s | time ratio | first call s | graph breaks |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        print(self.header, flush=True)

    def emit(self, row: str) -> None:
        self.rows.append(row)
        print(row, flush=True)
        if self.args.out:
            out = Path(self.args.out)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("\n".join([self.header, *self.rows]) + "\n")
            os.replace(tmp, out)

    def its(self, pipe: Any, batch: int, plugins_fn: Callable[[], list] = list) -> tuple[float, float]:
        """(steps per second at the best of the repeats, the warm-up call's seconds)."""
        a = self.args
        first = call_seconds(pipe, a.device, a.size, a.steps, batch, plugins_fn())
        best = min(call_seconds(pipe, a.device, a.size, a.steps, batch, plugins_fn()) for _ in range(a.repeats))
        return a.steps / best, first

    def row(self, label: str, fn: Callable[[], str]) -> None:
        try:
            self.emit(fn())
        except Exception as exc:  # a failing row is reported, and the others still run
            traceback.print_exc()
            self.emit(f"| {label} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | | | |")

    def compile_kwargs(self, mode: str) -> dict[str, Any]:
        if self.args.backend != "inductor":
            return {"backend": self.args.backend, "fullgraph": True, "dynamic": False}
        return {"mode": mode, "fullgraph": True, "dynamic": False}


def stack_plugins(models: Models, pipe: Any, size: int) -> Callable[[], list]:
    """SEGA (one concept, applied from step 1) + SAG + a random ControlNet for ``pipe``'s UNet."""
    from diffsteer_controlnet import ControlNet
    from diffsteer_controlnet.model import ControlNetModel
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega

    base = pipe.unet._orig_mod if hasattr(pipe.unet, "_orig_mod") else pipe.unet
    torch.manual_seed(1)
    net = ControlNetModel.from_unet(base)
    with torch.no_grad():  # zero convolutions would add nothing
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return lambda: [
        Sega(concepts=[dict(prompt="red", warmup_steps=1)]), Sag(), ControlNet(controlnet=net, image=image),
    ]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="image size (512; 64 with --device cpu)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per call (30; --quick: 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (the best counts)")
    parser.add_argument("--quick", action="store_true", help="only eager fp16 b1, eager bf16 b4, compiled fp16 b1, the stack")
    parser.add_argument("--only", choices=("eager", "compiled", "stack"), action="append",
                        help="run only these row groups (repeatable)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager/aot_eager for smoke tests)")
    parser.add_argument("--compile-dtype", default="fp16", choices=sorted(DTYPES), help="dtype of the compiled rows")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same layout (default on CPU)")
    parser.add_argument("--full-size", action="store_true", help="SD 1.5-size weights also on CPU")
    parser.add_argument("--eager", nargs="+", default=None, metavar="DTYPE:BATCH",
                        help="the eager rows, e.g. fp16:1 bf16:4 (default: all four; --quick: fp16:1 bf16:4)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    cpu = not args.device.startswith("cuda")
    args.tiny = args.tiny or (cpu and not args.full_size)
    args.size = args.size or (64 if cpu else 512)
    args.steps = args.steps or (10 if args.quick else 30)
    groups = set(args.only or ("eager", "compiled", "stack"))
    if cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    bench = Bench(args)
    models = Models(args.device, args.tiny)
    eager_cfgs = [("fp16", 1), ("bf16", 4)] if args.quick else [("fp16", 1), ("fp16", 4), ("bf16", 1), ("bf16", 4)]
    if args.eager:
        eager_cfgs = [(d, int(b)) for d, _, b in (item.partition(":") for item in args.eager)]
    if "eager" in groups:
        for dname, batch in eager_cfgs:
            def eager_row(dname: str = dname, batch: int = batch) -> str:
                dtype = DTYPES[dname]
                ours, _ = bench.its(models.diffsteer(dtype), batch)
                theirs, _ = bench.its(models.diffusers(dtype), batch)
                return f"| eager | {dname} | {batch} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.3f} | | |"

            bench.row(f"eager {dname} b{batch}", eager_row)

    cdtype = DTYPES[args.compile_dtype]
    mode = "reduce-overhead"
    if "compiled" in groups:
        def compiled_row() -> str:
            ours_pipe = models.diffsteer(cdtype).with_scheduler("ddim")
            before = graph_breaks()
            ours_pipe.compile(**bench.compile_kwargs(mode))
            ours, ours_first = bench.its(ours_pipe, 1)
            ours_breaks = graph_breaks() - before
            theirs_pipe = models.diffusers(cdtype)
            plain_unet = theirs_pipe.unet
            try:
                before = graph_breaks()
                theirs_pipe.unet = torch.compile(plain_unet, **bench.compile_kwargs(mode))
                theirs, theirs_first = bench.its(theirs_pipe, 1)
                theirs_breaks = graph_breaks() - before
            finally:
                theirs_pipe.unet = plain_unet
            return (
                f"| compiled {mode if args.backend == 'inductor' else args.backend}, fullgraph | {args.compile_dtype} | 1 | "
                f"{ours:.2f} | {theirs:.2f} | {theirs / ours:.3f} | {ours_first:.1f} / {theirs_first:.1f} | "
                f"{ours_breaks} / {theirs_breaks} |"
            )

        bench.row("compiled", compiled_row)

    if "stack" in groups:
        plain = models.diffsteer(cdtype)
        plugins = stack_plugins(models, plain, args.size)

        def stack_eager() -> str:
            ours, _ = bench.its(plain, 1, plugins)
            return f"| stack SEGA+SAG+ControlNet, eager | {args.compile_dtype} | 1 | {ours:.2f} | n/a | | | |"

        def stack_compiled(stack_mode: str) -> str:
            pipe = plain.with_scheduler("ddim")
            before = graph_breaks()
            pipe.compile(**bench.compile_kwargs(stack_mode))
            ours, first = bench.its(pipe, 1, plugins)
            label = stack_mode if args.backend == "inductor" else args.backend
            return (
                f"| stack SEGA+SAG+ControlNet, compiled {label}, fullgraph | {args.compile_dtype} | 1 | {ours:.2f} | "
                f"n/a | | {first:.1f} | {graph_breaks() - before} |"
            )

        bench.row("stack eager", stack_eager)
        bench.row("stack compiled", lambda: stack_compiled(mode))
        if not args.quick and args.backend == "inductor":
            bench.row("stack compiled default", lambda: stack_compiled("default"))


if __name__ == "__main__":
    main()
