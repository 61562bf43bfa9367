"""Textual-inversion benchmark: diffsteer against diffusers 0.42.1 on the same random SD 1.5-size weights.

Each timed run loads a 3-vector embedding file and makes one image with the token in the prompt: diffsteer with
``plugins=[TextualInversion(embeddings=[file])]`` (per-call tokens), diffusers with ``load_textual_inversion`` +
the call (its ``unload_textual_inversion`` afterwards is not timed). Runs alternate between the two libraries.

    python bench/bench_textual_inversion.py            # 256 px, 10 steps, CFG, 3 repeats
    python bench/bench_textual_inversion.py --small    # 256 px, 2 steps, 1 repeat: a quick look

Reuses bench_core.py's model folder, loaders and timer.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import build_model_folder, load, technique_parser, timed  # noqa: E402

PROMPT = "a red <cat-toy> on a white background"


def main() -> None:
    parser = technique_parser(__doc__, steps=10, repeats=3)
    parser.add_argument("--small", action="store_true", help="2 steps, 1 repeat")
    args = parser.parse_args()
    if args.small:
        args.steps, args.repeats = 2, 1

    from diffsteer_textual_inversion import TextualInversion, write_embedding

    build_model_folder()
    file = Path(tempfile.mkdtemp(prefix="bench-ti-")) / "learned_embeds.safetensors"
    write_embedding(file, "<cat-toy>", torch.randn(3, 768, generator=torch.Generator().manual_seed(0)))
    ours, ref = load("diffsteer", torch.float32), load("diffusers", torch.float32)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size, output_type="np")

    def run_ours():
        ours(PROMPT, plugins=[TextualInversion(embeddings=[file])], generator=torch.Generator().manual_seed(0), **kw)

    def run_ref():
        ref.load_textual_inversion(str(file.parent))
        ref(PROMPT, generator=torch.Generator().manual_seed(0), **kw)

    times: dict[str, list[float]] = {"diffsteer": [], "diffusers": []}
    with torch.inference_mode():
        for k in range(args.repeats + 1):  # the first round warms up
            t_ours, t_ref = timed(run_ours), timed(run_ref)
            ref.unload_textual_inversion()
            if k:
                times["diffsteer"].append(t_ours)
                times["diffusers"].append(t_ref)
        # Load alone (no generation): the cost of adding the tokens.
        load_ours = timed(lambda: TextualInversion(embeddings=[file]))
        load_ref = timed(lambda: ref.load_textual_inversion(str(file.parent)))
        ref.unload_textual_inversion()
    d, r = statistics.median(times["diffsteer"]), statistics.median(times["diffusers"])
    print(f"| {args.size}px, {args.steps} steps, CFG, fp32, 3-vector token | diffsteer s | diffusers s | ratio |")
    print("|---|---|---|---|")
    print(f"| load + call (median of {args.repeats}) | {d:.2f} | {r:.2f} | {d / r:.3f} |")
    print(f"| load only | {load_ours * 1e3:.1f} ms | {load_ref * 1e3:.1f} ms | {load_ours / load_ref:.3f} |")


if __name__ == "__main__":
    main()
