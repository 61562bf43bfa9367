"""The ``diffsteer`` command line: ``generate``, ``plugins``, ``train``, ``eval`` and ``new-plugin``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__
from .generate_cli import add_generate_arguments, interval_arg
from .shapes_cli import add_shapes_arguments

METADATA_KEY = "diffsteer"  # the PNG text key (JPEG/WebP: EXIF ImageDescription "diffsteer:<json>")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's line with its default, unless the line already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})".lstrip()


def _lazy(module: str, function: str) -> Any:
    """A command that imports its module only when it runs, so ``--help`` stays fast."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(f".{module}", __package__), function)(args))

    return run


def read_parameters(path: Path) -> dict[str, Any]:
    """The parameters an image written by ``diffsteer generate`` carries."""
    from .image_files import read_image_parameters

    return read_image_parameters(Path(path))


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugin_index import plugin_rows

    rows = plugin_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no diffsteer plugins installed")
    else:
        for r in rows:
            hooks = ", ".join(r["hooks"]) if not r["error"] else f"cannot load: {r['error']}"
            print(f"{r['name']:<20} {r['distribution']} {r['version']:<10} contract {r['contract']:<5} {hooks}")
    return 0


def _shapes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    parser.add_argument("--preset", default="v1",
                        help="named recipe: v1 (the CPU recipe, stages 1-6) or v2 (one larger stage 4 for an "
                             "accelerator; docs/shapes-model.md) (default: v1)")
    parser.add_argument("--unet-steps", type=int, default=None, help="steps of the UNet stage (default: the recipe's)")
    parser.add_argument("--vae-steps", type=int, default=None, help="steps of the VAE stage (default: the recipe's)")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="steps of the stage-5 fine-tune (default: the recipe's 2000; 0 skips the stage)")
    parser.add_argument("--bind-steps", type=int, default=None,
                        help="steps of the stage-6 two-object fine-tune (default: the recipe's 1200; 0 skips the stage)")
    parser.add_argument("--n-images", type=int, default=None,
                        help="training images to render (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: the recipe's)")
    parser.add_argument("--set", dest="recipe_set", action="append", default=[], metavar="FIELD=JSON",
                        help="set any recipe field, e.g. --set 'unet_block_out_channels=[64,128,128]' (repeatable)")
    parser.add_argument("--device", default="cpu", help="where the networks train: cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="fixed torch thread count (default: follow the machine's load)")
    parser.add_argument("--from", dest="start", default=None, metavar="MODEL",
                        help="skip stages 1-5 and fine-tune MODEL (a model folder, or 'shapes': the shipped one) "
                             "with stage 6 (the bind_* recipe fields)")
    parser.add_argument("--time-steps", type=int, default=None, metavar="N",
                        help="prepare stages 1-3, time N throw-away stage-4 steps, print seconds per step and stop")


def _train_shapes(args: argparse.Namespace) -> int:
    import time

    from .errors import RequestError
    from .shapes.recipe import ShapesRecipe, preset
    from .shapes.train import time_stage4, train_shapes

    overrides: dict[str, Any] = {k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps),
                                                   ("refine_steps", args.refine_steps), ("bind_steps", args.bind_steps),
                                                   ("n_images", args.n_images),
                                                   ("seed", args.seed)) if v is not None}
    for item in args.recipe_set:
        field, sep, text = item.partition("=")
        if not sep or field not in ShapesRecipe.model_fields:
            raise RequestError(f"--set {item!r}:", f"expected FIELD=JSON with FIELD a recipe field "
                               f"({', '.join(ShapesRecipe.model_fields)})")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"--set {item!r}:", f"the value is not valid JSON ({exc.msg})") from None
    recipe = preset(args.preset, **overrides)  # a bad name or value is a ValueError naming it
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    if args.time_steps:
        seconds = time_stage4(Path(args.out), recipe, log, device=args.device, threads=args.threads,
                              steps=args.time_steps)
        print(f"seconds per step: {seconds:.6f}")
        return 0
    start = None
    if args.start is not None:
        from .loading.pipeline_loader import resolve_model

        start = resolve_model(args.start)  # a missing folder is an error naming it
    train_shapes(Path(args.out), recipe, log=log, device=args.device, threads=args.threads, start=start)
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


def train_recipes() -> list[tuple[str, str]]:
    """Every ``diffsteer train NAME``: the built-in recipe, then each installed plugin's, with its help line.

    A plugin that fails to load is listed with its error instead of hiding the others.
    """
    from .commands import plugin_train_commands
    from .plugins import installed_plugins, load_plugin_class

    rows = [("shapes", "the shipped shapes-world model, from scratch (built in)")]
    for name in sorted(installed_plugins()):
        try:
            commands = plugin_train_commands(load_plugin_class(name), owner=name)
        except Exception as exc:  # a broken plugin must not hide the others
            rows.append((name, f"cannot load: {type(exc).__name__}: {exc}"))
            continue
        rows += [(c.name, f"{c.help} (plugin {name})") for c in commands.values() if c.name == name]
    return rows


def cmd_train(args: argparse.Namespace) -> int:
    if args.what is None:
        print("diffsteer train NAME [options]; 'diffsteer train NAME --help' lists a recipe's options. Recipes:")
        for name, text in train_recipes():
            print(f"  {name:<20} {text}")
        return 0
    command = _train_command(args.what)
    parser = argparse.ArgumentParser(prog=f"diffsteer train {command.name}", description=command.help,
                                     formatter_class=DefaultsFormatter)
    command.add_arguments(parser)
    return int(command.run(parser.parse_args(args.options)))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.what != "shapes":
        raise SystemExit(f"error: unknown evaluation {args.what!r}; available: shapes")
    from tqdm.auto import tqdm

    from .pipeline import Pipeline
    from .request_checks import check_guidance_interval
    from .shapes.benchmark import score_model, score_strict
    from .shapes_cli import eval_coverage_notes

    # A short run (--single 4) would otherwise report "colour 100%" from red prompts alone.
    for note in eval_coverage_notes(args.single, args.double, args.position):
        print(f"warning: {note}", file=sys.stderr)
    pipe = Pipeline.from_pretrained(args.model, scheduler=args.scheduler)
    interval = pipe.guidance_interval if args.guidance_interval is None else check_guidance_interval(
        args.guidance_interval, "--guidance-interval")
    own = lambda given: " (the model's own)" if given is None else ""  # noqa: E731
    # on stderr, so the table on stdout stays what scripts read; the sampler and interval change every figure
    print(f"sampling: {pipe.scheduler.name}{own(args.scheduler)}, {args.steps} steps, CFG 7.5 where t/T is in "
          f"[{interval[0]:g}, {interval[1]:g}]{own(args.guidance_interval)}", file=sys.stderr)
    n_open = args.open if args.strict else 0
    bar = tqdm(total=args.single + args.double + args.position + n_open, desc="evaluating", unit="img",
               disable=args.quiet)
    counts = dict(n_single=args.single, n_double=args.double, n_position=args.position, steps=args.steps,
                  progress=lambda done, total: bar.update(done - bar.n), guidance_interval=interval)
    try:
        score = score_strict(pipe, n_open=n_open, **counts) if args.strict else score_model(pipe, **counts)
    except BaseException:
        bar.leave = False  # an error (or Ctrl-C) clears the bar, so its message starts a clean line
        bar.close()
        raise
    bar.close()
    print(score.table())
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import new_plugin

    target = new_plugin(args.name, args.directory)
    print(f"{target}\n  pip install -e {target}    # then: plugins=[{args.name!r}] or --plugin {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsteer", description="Composable controlled generation.")
    parser.add_argument("--version", action="version", version=f"diffsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt",
                         description="Generate images; the file records every parameter (diffsteer generate "
                         "--from IMAGE makes it again).")
    add_generate_arguments(gen)
    gen.set_defaults(func=_lazy("generate_cli", "cmd_generate"))

    plug = sub.add_parser("plugins", help="list installed plugins and the hooks they implement")
    plug.add_argument("--json", action="store_true", help="print the list as JSON")
    plug.set_defaults(func=cmd_plugins)

    train = sub.add_parser(
        "train", help="train a model: 'shapes' (built in) or an installed plugin's recipe",
        description="diffsteer train NAME [options]: NAME is 'shapes' or the name of an installed plugin that "
        "trains (e.g. textual-inversion); 'diffsteer train NAME --help' lists its options.",
    )
    train.add_argument("what", metavar="NAME", nargs="?", default=None,
                       help="'shapes' or an installed plugin's name; without it, the recipes are listed")
    train.add_argument("options", nargs=argparse.REMAINDER, help="the recipe's own options")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval", help="measure a shapes-world model (colour, shape, two-object, background, position)",
        description="diffsteer eval shapes: generate prompts from the shapes world with a model and score each image "
        "with the shapes evaluators (colour, shape, two-object prompts, background, position); prints a table.",
    )
    ev.add_argument("what", choices=["shapes"])
    ev.add_argument("--model", default="shapes", help="model folder or 'shapes'")
    ev.add_argument("--single", type=int, default=144, help="single-object prompts")
    ev.add_argument("--double", type=int, default=72, help="two-object prompts")
    ev.add_argument("--position", type=int, default=96, help="single-object prompts with a position")
    ev.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    ev.add_argument("--strict", action="store_true", help="also judge strictly, on fresh seeds: exact object count, "
                    "colour share, shape IoU (diffsteer.shapes.strict)")
    ev.add_argument("--open", type=int, default=48, help="colour-open prompts ('a circle'), with --strict")
    ev.add_argument("--scheduler", default=None, metavar="NAME",
                    help="sampler (default: the model's own; the model card's figures name theirs)")
    ev.add_argument("--guidance-interval", type=interval_arg, default=None, metavar="LO,HI",
                    help="guide only where t/T is in [LO, HI] (default: the model's own; 0,1 guides every step)")
    ev.add_argument("-q", "--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    new = sub.add_parser("new-plugin", help="scaffold a plugin package (pyproject, entry point, settings, test, docs)")
    new.add_argument("name", help="the plugin name, e.g. my-guidance")
    new.add_argument("--directory", default=".", help="where to create the NAME folder")
    new.set_defaults(func=cmd_new_plugin)

    shapes = sub.add_parser(
        "shapes", help="draw a shapes-world image from a caption: render, outline, depth or mask",
        description="Draw a shapes-world scene matching a caption: the picture, or a control image for ControlNet.",
    )
    add_shapes_arguments(shapes)
    shapes.set_defaults(func=_lazy("shapes_cli", "cmd_shapes"))

    for command in sub.choices.values():
        command.formatter_class = DefaultsFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import DiffsteerError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DiffsteerError, ValueError) as exc:  # ModelLoadError is a DiffsteerError
        # Bad input is the user's to fix: a clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written by rename, so an earlier file of the same name is still whole.
        print("interrupted; no file was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
