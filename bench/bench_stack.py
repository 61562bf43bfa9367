"""What stacking costs: diffsteer on random SD 1.5-size weights with no plugin, each of the five first
plugins alone, and all five in one call.

Run (after the README's test install, which installs every plugin)::

    python bench/bench_stack.py                  # 256 px, 4 steps, CFG, fp32, 2 repeats
    python bench/bench_stack.py --steps 2 --repeats 1

Each plugin's overhead is its time minus the plain call's. Stacking is cheap when the five together cost
no more than the sum of their overheads: SEGA's concept rows and the ControlNet's residual pass share
one batched UNet call, SAG adds its one degraded pass (which the ControlNet follows). Configurations
alternate within each repeat, so drift in machine load hits all alike. Prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_controlnet import build_controlnet_folder  # noqa: E402
from bench_core import build_model_folder, generate, load, technique_parser, timed  # noqa: E402


def plugins(size: int) -> dict:
    from diffsteer_controlnet import ControlNet
    from diffsteer_prompt_weighting import PromptWeighting
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega
    from diffsteer_textual_inversion import TextualInversion

    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    vector = torch.randn(768, generator=torch.Generator().manual_seed(1)) * 0.01
    return {
        # the prompt names no "<bench>", so TI only adds its token: the cost of having it in the stack
        "textual-inversion": TextualInversion(tensors={"<bench>": vector}),
        "sega (1 concept)": Sega(concepts=[dict(prompt="red", warmup_steps=1)]),
        "sag": Sag(),
        "controlnet": ControlNet(model=str(build_controlnet_folder()), image=image),
        "prompt-weighting": PromptWeighting(),
    }


def main() -> None:
    parser = technique_parser(__doc__, steps=4, repeats=2)
    args = parser.parse_args()

    build_model_folder()
    pipe = load("diffsteer", torch.float32)
    each = plugins(args.size)
    configs = {"no plugin": [], **{name: [p] for name, p in each.items()}, "all five": list(each.values())}
    for stack in configs.values():  # warm-up (loads the ControlNet); 2 steps: SEGA warms up at step 1
        generate(pipe, args.size, 2, plugins=stack)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        order = list(configs) if r % 2 == 0 else list(configs)[::-1]
        for name in order:
            times[name].append(timed(lambda: generate(pipe, args.size, args.steps, plugins=configs[name])))
    t = {name: statistics.median(v) for name, v in times.items()}
    base = t["no plugin"]
    print(f"\n{args.size}px, {args.steps} steps, CFG 7.5, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| configuration | seconds | vs no plugin | overhead s |\n|---|---|---|---|")
    for name, seconds in t.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x | {seconds - base:+.2f} |")
    summed = sum(t[name] - base for name in each)
    print(f"\nsum of the five overheads {summed:.2f} s; all five stacked {t['all five'] - base:.2f} s "
          f"(stacked / summed = {(t['all five'] - base) / summed:.2f})")


if __name__ == "__main__":
    main()
