"""ControlNet benchmark: diffsteer + the controlnet plugin against diffusers 0.42.1's
StableDiffusionControlNetPipeline, on the same random SD 1.5-size weights (UNet + a ControlNet made from it).

Run (after ``pip install -e ".[test]" -e plugins/controlnet``)::

    python bench/bench_controlnet.py                       # 256 px, 4 steps, CFG, fp32, 3 repeats
    python bench/bench_controlnet.py --steps 2 --repeats 1 # a quicker look

The SD 1.5 folder is bench_core's (built once and cached); the ControlNet is written next to it. Runs of
the two libraries alternate in one process, so drift in machine load hits both alike. Prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import CACHE, build_model_folder, generate, load, reference_pipeline, technique_parser, timed  # noqa: E402

CONTROLNET = CACHE.with_name(CACHE.name + "-controlnet")


def build_controlnet_folder() -> Path:
    """A random SD 1.5-size ControlNet (diffusers' ``from_unet`` of the bench UNet), written once."""
    if (CONTROLNET / "config.json").is_file():
        return CONTROLNET
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(1)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(CACHE / "unet"))
    with torch.no_grad():  # zero convolutions would let a pipeline skip real work unnoticed
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    staging = CONTROLNET.with_name(CONTROLNET.name + ".tmp")
    net.save_pretrained(staging, safe_serialization=True)
    staging.rename(CONTROLNET)
    return CONTROLNET


def main() -> None:
    parser = technique_parser(__doc__, steps=4, repeats=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    build_model_folder()
    folder = build_controlnet_folder()
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffsteer_controlnet import ControlNet

    base = load("diffusers", torch.float32)
    ref = reference_pipeline(StableDiffusionControlNetPipeline, base,
                             controlnet=ControlNetModel.from_pretrained(folder))
    mine = load("diffsteer", torch.float32)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    plugin = ControlNet(model=str(folder), image=image)

    def run_ref():
        ref("a red circle and a blue square on a white background", image=image, num_inference_steps=args.steps,
            guidance_scale=7.5, height=args.size, width=args.size, output_type="np",
            generator=torch.Generator().manual_seed(0))

    def run_mine():
        generate(mine, args.size, args.steps, plugins=[plugin])

    run_ref(), run_mine()  # warm-up (and the plugin loads its ControlNet)
    times: dict[str, list[float]] = {"diffusers": [], "diffsteer": []}
    for _ in range(args.repeats):
        times["diffusers"].append(timed(run_ref))
        times["diffsteer"].append(timed(run_mine))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n| {args.size}px, {args.steps} steps, CFG, fp32, {torch.get_num_threads()} threads | median s | runs |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |")
    print(f"\nratio diffsteer / diffusers: {med['diffsteer'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
