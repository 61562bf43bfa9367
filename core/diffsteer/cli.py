"""The ``diffsteer`` command line: ``generate``, ``plugins``, ``train``, ``eval`` and ``new-plugin``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__

METADATA_KEY = "diffsteer"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(plugins: Sequence[str], assignments: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Pair each ``--plugin NAME`` with the ``--set NAME.FIELD=VALUE`` values given for it (JSON or text)."""
    settings: dict[str, dict[str, Any]] = {name: {} for name in plugins}
    for item in assignments:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"error: --set expects NAME.FIELD=VALUE, got {item!r}")
        if name not in settings:
            raise SystemExit(f"error: --set {item!r} names plugin {name!r}, which no --plugin enables")
        settings[name][field] = _parse_value(value)
    return [(name, settings[name]) for name in plugins]


def _save_png(image: Any, path: Path, parameters: dict[str, Any]) -> None:
    """Write a PNG with the call's parameters in its metadata, atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    from .atomic import atomic_file

    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(parameters, sort_keys=True))
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: Path) -> dict[str, Any]:
    """The parameters a ``diffsteer generate`` PNG carries."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get(METADATA_KEY)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --from {path}: cannot read the image ({exc})") from None
    if not text:
        raise SystemExit(f"error: --from {path}: the PNG has no diffsteer parameters")
    return json.loads(text)


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    import random

    import torch

    from .pipeline import Pipeline
    from .plugins import resolve_plugins

    if args.from_png:
        if args.prompt is not None:
            raise SystemExit("error: --from re-runs a stored generation; give no PROMPT with it")
        params = read_parameters(Path(args.from_png))
        plugin_specs = [(p["name"], p["settings"]) for p in params.get("plugins", [])]
    else:
        if args.prompt is None:
            raise SystemExit("error: give a PROMPT, or --from IMAGE.png to re-run a generation")
        model = args.model
        if Path(model).expanduser().is_dir():
            model = str(Path(model).expanduser().resolve())  # so --from works from any directory
        params = {
            "model": model,
            "scheduler": args.scheduler,
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "guidance_rescale": args.guidance_rescale,
            "height": args.height,
            "width": args.width,
            "seed": args.seed if args.seed is not None else random.randrange(2**31),
            "eta": args.eta,
            "clip_skip": args.clip_skip,
            "num_images_per_prompt": args.num_images,
            "dtype": args.dtype,
        }
        plugin_specs = parse_settings(args.plugin, args.set)
    # Plugins first: a missing plugin or a bad setting is reported before seconds of model loading.
    plugins = resolve_plugins(plugin_specs)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params.get("dtype", "fp32")]
    pipe = Pipeline.from_pretrained(params["model"], scheduler=params["scheduler"], torch_dtype=dtype)

    from tqdm.auto import tqdm

    bar = tqdm(total=params["steps"], desc="denoising", unit="step", disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    negative = params["negative_prompt"]
    out = pipe(
        params["prompt"],
        negative_prompt=negative[0] if isinstance(negative, list) and len(negative) == 1 else negative,
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        guidance_rescale=params.get("guidance_rescale", 0.0),
        height=params["height"],
        width=params["width"],
        seed=params["seed"],
        eta=params.get("eta"),
        clip_skip=params.get("clip_skip"),
        num_images_per_prompt=params["num_images_per_prompt"],
        plugins=plugins,
        progress=progress,
    )
    bar.close()
    saved = {**out.parameters, "dtype": params.get("dtype", "fp32"), "model": params["model"]}
    # A scheduler picked by the model's own config is recorded by name so --from needs no guessing.
    saved["scheduler"] = params["scheduler"] or out.parameters["scheduler"]
    paths = _output_paths(Path(args.output), len(out.images))
    for image, path in zip(out.images, paths):
        _save_png(image, path, saved)
        print(path)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import implemented_hooks, installed_plugins

    rows = []
    for name, ep in sorted(installed_plugins().items()):
        dist = ep.dist
        try:
            hooks = implemented_hooks(ep.load())
            problem = ""
        except Exception as exc:  # a broken plugin must not hide the others
            hooks, problem = [], f"{type(exc).__name__}: {exc}"
        rows.append(
            {
                "name": name,
                "distribution": dist.name if dist else "?",
                "version": dist.version if dist else "?",
                "hooks": [h.removeprefix("diffsteer_") for h in hooks],
                "error": problem,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no diffsteer plugins installed")
    else:
        for r in rows:
            hooks = ", ".join(r["hooks"]) if not r["error"] else f"cannot load: {r['error']}"
            print(f"{r['name']:<20} {r['distribution']} {r['version']:<10} {hooks}")
    return 0


def _shapes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="steps of the stage-5 fine-tune (default: the recipe's 2000; 0 skips the stage)")
    parser.add_argument("--bind-steps", type=int, default=None,
                        help="steps of the stage-6 two-object fine-tune (default: the recipe's 1200; 0 skips the stage)")
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)


def _train_shapes(args: argparse.Namespace) -> int:
    import time

    from .shapes.recipe import ShapesRecipe
    from .shapes.train import train_shapes

    overrides = {k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps),
                                   ("refine_steps", args.refine_steps), ("bind_steps", args.bind_steps),
                                   ("n_images", args.n_images),
                                   ("seed", args.seed)) if v is not None}
    recipe = ShapesRecipe(**overrides)
    train_shapes(Path(args.out), recipe, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    print(args.out)
    return 0


def _train_command(name: str) -> Any:
    """The core recipe ``name``, or the train command of the plugin installed under that name."""
    from .commands import TrainCommand, plugin_train_commands
    from .errors import PluginError
    from .plugins import load_plugin_class

    if name == "shapes":
        return TrainCommand("shapes", "the shipped shapes-world model, from scratch", _shapes_arguments, _train_shapes)
    commands = plugin_train_commands(load_plugin_class(name), owner=name)
    if name not in commands:
        offered = ", ".join(commands) or "none"
        raise PluginError(name, f"is installed but offers no train command {name!r} (it offers: {offered})")
    return commands[name]


def cmd_train(args: argparse.Namespace) -> int:
    command = _train_command(args.what)
    parser = argparse.ArgumentParser(prog=f"diffsteer train {command.name}", description=command.help)
    command.add_arguments(parser)
    return int(command.run(parser.parse_args(args.options)))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.what != "shapes":
        raise SystemExit(f"error: unknown evaluation {args.what!r}; available: shapes")
    from tqdm.auto import tqdm

    from .pipeline import Pipeline
    from .shapes.benchmark import score_model

    pipe = Pipeline.from_pretrained(args.model, scheduler="ddim")
    bar = tqdm(total=args.single + args.double + args.position, desc="evaluating", unit="img", disable=args.quiet)
    score = score_model(pipe, n_single=args.single, n_double=args.double, n_position=args.position, steps=args.steps,
                        progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    print(score.table())
    return 0


def _scheduler_names() -> list[str]:
    from .schedulers import scheduler_names

    return list(scheduler_names())


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import new_plugin

    target = new_plugin(args.name, args.directory)
    print(f"{target}\n  pip install -e {target}    # then: plugins=[{args.name!r}] or --plugin {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsteer", description="Composable controlled generation.")
    parser.add_argument("--version", action="version", version=f"diffsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="?", help="the text prompt")
    gen.add_argument("--model", default="shapes", help="model folder, hub id, or 'shapes' (default)")
    gen.add_argument("--scheduler", default=None, help="one of: " + ", ".join(_scheduler_names()))
    gen.add_argument("--eta", type=float, default=None, help="DDIM eta (0 is deterministic)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--guidance-rescale", type=float, default=0.0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None, help="random when omitted; always recorded in the PNG")
    gen.add_argument("--clip-skip", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    gen.add_argument("--plugin", action="append", default=[], metavar="NAME", help="enable a plugin (repeatable)")
    gen.add_argument("--set", action="append", default=[], metavar="NAME.FIELD=VALUE", help="plugin setting (JSON or text)")
    gen.add_argument("--from", dest="from_png", default=None, metavar="PNG", help="re-run the generation stored in a PNG")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    plug = sub.add_parser("plugins", help="list installed plugins and the hooks they implement")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)

    train = sub.add_parser(
        "train", help="train a model: 'shapes' (built in) or an installed plugin's recipe",
        description="diffsteer train NAME [options]: NAME is 'shapes' or the name of an installed plugin that "
        "trains (e.g. textual-inversion); 'diffsteer train NAME --help' lists its options.",
    )
    train.add_argument("what", metavar="NAME", help="'shapes' or an installed plugin's name")
    train.add_argument("options", nargs=argparse.REMAINDER, help="the recipe's own options")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="measure a shapes-world model (colour, shape, two-object, background, position)")
    ev.add_argument("what", choices=["shapes"])
    ev.add_argument("--model", default="shapes")
    ev.add_argument("--single", type=int, default=144, help="single-object prompts")
    ev.add_argument("--double", type=int, default=72, help="two-object prompts")
    ev.add_argument("--position", type=int, default=96, help="single-object prompts with a position")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("-q", "--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    new = sub.add_parser("new-plugin", help="scaffold a plugin package (pyproject, entry point, settings, test, docs)")
    new.add_argument("name", help="the plugin name, e.g. my-guidance")
    new.add_argument("--directory", default=".", help="where to create the NAME folder")
    new.set_defaults(func=cmd_new_plugin)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import DiffsteerError
    from .loading.errors import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DiffsteerError, ModelLoadError, ValueError) as exc:
        # Bad input is the user's to fix: a clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
