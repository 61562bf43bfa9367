"""``diffsteer generate``: its options, plugin instances and settings, ``--from`` with overrides, file inputs
recorded with their hashes, warnings and the progress bar.

Every option defaults to None on the parser, so ``--from`` can tell the options a user gave (overrides) from
the ones left out (taken from the image); :data:`OPTIONS` holds the real defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import DiffsteerError, InputFileError
from .image_files import check_output_path, read_image_parameters, save_image
from .provenance import (
    absolutise,
    content_hash,
    embed_small_images,
    replace_strings,
    restore_embedded,
    strings_in,
    verify_inputs,
)

DTYPES = ("fp32", "bf16", "fp16")


class CommandLineError(DiffsteerError, ValueError):
    """Command-line options that cannot go together or do not parse."""


@dataclass(frozen=True)
class Option:
    """One ``generate`` option recorded in the image; ``key`` is its name in the recorded parameters."""

    flag: str
    key: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    shown: Optional[str] = None  # how --help shows the default, when the value itself would mislead
    metavar: Optional[str] = None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return text


def interval_arg(text: str) -> list[float]:
    """``LO,HI`` as two floats (the range is checked with the call's other arguments)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers LO,HI such as 0,0.6, got {text!r}") from None


def _scheduler_names() -> str:
    from .schedulers.registry import scheduler_names

    return ", ".join(n for n in scheduler_names() if n != "ddim_inverse")


OPTIONS: tuple[Option, ...] = (
    Option("--model", "model", "shapes", "model folder, single file, hub id (owner/name) or 'shapes'"),
    Option("--scheduler", "scheduler", None, "a scheduler name (see docs/schedulers.md)", shown="the model's own"),
    Option("--negative-prompt", "negative_prompt", None, "what to steer away from", shown="none"),
    Option("--steps", "steps", 20, "denoising steps", type=int),
    Option("--guidance-scale", "guidance_scale", 7.5, "classifier-free guidance; 0 to 1 turn it off", type=float),
    Option("--guidance-rescale", "guidance_rescale", 0.0, "0 to 1: pull the guided prediction's spread back",
           type=float),
    Option("--guidance-interval", "guidance_interval", None, "classifier-free guidance only at timesteps t with "
           "LO <= t/T <= HI (T: training timesteps, 1000 in SD); 0,1 guides every step", type=interval_arg,
           shown="the model's own", metavar="LO,HI"),
    Option("--height", "height", None, "image height in pixels", type=int, shown="the model's native size"),
    Option("--width", "width", None, "image width in pixels", type=int, shown="the model's native size"),
    Option("--seed", "seed", None, "0 to 2**64-1; always recorded in the image", type=int, shown="random"),
    Option("--eta", "eta", None, "DDIM eta (0 is deterministic)", type=float, shown="the scheduler's"),
    Option("--clip-skip", "clip_skip", None, "text-encoder layers to skip from the end", type=int, shown="none"),
    Option("--num-images", "num_images_per_prompt", 1, "images to make; -o out.png writes out-0.png, out-1.png, ...",
           type=int, metavar="N"),
    Option("--dtype", "dtype", "fp32", "fp32, bf16 or fp16 for the model weights", type=dtype_name,
           metavar="{fp32,bf16,fp16}"),
    Option("--image", "image", None, "img2img: start from this image instead of noise", shown="none",
           metavar="PATH"),
    Option("--strength", "strength", 0.8, "img2img: how far to move from --image (1 ignores it)", type=float),
)


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", nargs="?", help="the text prompt (omit it with --from)")
    for opt in OPTIONS:
        default = opt.shown if opt.shown is not None else opt.default
        gen.add_argument(opt.flag, dest=opt.key, type=opt.type, default=None, metavar=opt.metavar,
                         help=f"{opt.help} (default: {default})")
    gen.add_argument("--plugin", action="append", default=[], metavar="NAME[#TAG]",
                     help="enable a plugin; repeat for a stack, in order; NAME#TAG runs a second instance "
                     "(default: none)")
    gen.add_argument("--set", action="append", default=[], metavar="NAME[#TAG].FIELD=VALUE",
                     help="a plugin setting: JSON where it starts like JSON, else text (default: none)")
    gen.add_argument("--from", dest="from_png", default=None, metavar="IMAGE",
                     help="re-run the generation recorded in an image; options given with it override the "
                     "recorded ones (default: none)")
    gen.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads for torch; 1 is often fastest on a busy machine (default: torch's own)")
    gen.add_argument("-o", "--output", default="out.png",
                     help="the image to write: .png, .jpg, .jpeg or .webp (default: out.png)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars (warnings still print)")


# -- plugin settings ------------------------------------------------------------------------------------


def parse_value(item: str, text: str) -> Any:
    """A ``--set`` value: JSON where it parses; text that starts like JSON but does not parse is an error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip()[:1] in ("[", "{", '"'):
            raise CommandLineError(
                f"--set {item!r}: the value starts like JSON but does not parse: {exc.msg} at character "
                f"{exc.pos + 1} (JSON needs double-quoted keys and strings)"
            ) from None
        return text


def _split_assignment(item: str) -> tuple[str, str, str]:
    key, sep, value = item.partition("=")
    label, dot, field = key.partition(".")
    if not sep or not dot or not field or not label:
        raise CommandLineError(f"--set expects NAME.FIELD=VALUE, got {item!r}")
    return label, field, value


def plugin_name(label: str) -> str:
    """The installed plugin a ``--plugin`` label names: ``controlnet#2`` is an instance of ``controlnet``."""
    return label.partition("#")[0]


def parse_settings(plugins: Sequence[str], assignments: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Pair each ``--plugin LABEL`` with the ``--set LABEL.FIELD=VALUE`` values given for it."""
    settings: dict[str, dict[str, Any]] = {}
    for label in plugins:
        if not plugin_name(label):
            raise CommandLineError(f"--plugin {label!r}: name the plugin before the '#'")
        if label in settings:
            raise CommandLineError(
                f"--plugin {label!r} is given twice; tag each instance (--plugin {label}#1 --plugin {label}#2) "
                "so --set can tell them apart"
            )
        settings[label] = {}
    for item in assignments:
        label, field, value = _split_assignment(item)
        if label not in settings:
            raise CommandLineError(f"--set {item!r} names plugin {label!r}, which no --plugin enables")
        settings[label][field] = parse_value(item, value)
    return [(label, settings[label]) for label in plugins]


def apply_settings(recorded: list[dict[str, Any]], assignments: Sequence[str], source: str) -> None:
    """``--set`` under ``--from``: change fields of the recorded plugins (by label, or by name when unique)."""
    for item in assignments:
        label, field, value = _split_assignment(item)
        matches = [p for p in recorded if p.get("label", p["name"]) == label]
        if not matches:
            matches = [p for p in recorded if p["name"] == label]
        labels = [p.get("label", p["name"]) for p in recorded] or ["none"]
        if len(matches) != 1:
            why = "names no plugin" if not matches else "is ambiguous"
            raise CommandLineError(f"--set {item!r} {why} recorded in {source} (its plugins: {', '.join(labels)})")
        matches[0]["settings"][field] = parse_value(item, value)


# -- parameters -----------------------------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {opt.key: getattr(args, opt.key) for opt in OPTIONS if getattr(args, opt.key) is not None}


def _absolute_model(model: str, files: dict[str, str]) -> str:
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        path = path.resolve()  # so --from works from any directory
        files[str(path)] = content_hash(path)
        return str(path)
    return model


def build_parameters(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The call's parameters and its plugin entries (``name``, ``label``, ``settings``), with every file input
    made absolute and hashed into ``parameters["files"]``."""
    import random

    given = _given(args)
    if args.from_png:
        if args.prompt is not None:
            raise CommandLineError("--from re-runs a recorded generation; give no PROMPT with it")
        if args.plugin:
            raise CommandLineError(
                "--from keeps the recorded plugins; --plugin cannot add to them (change a recorded plugin's "
                "setting with --set NAME.FIELD=VALUE)"
            )
        source = str(Path(args.from_png))
        params = read_image_parameters(Path(args.from_png))
        if not isinstance(params.get("prompt"), str):
            # Embeddings passed to the API (prompt_embeds) are recorded by shape only: nothing to re-run.
            raise CommandLineError(f"{source}: was generated from prompt embeddings, not a text prompt; the "
                                   f"embeddings are not stored in the image, so --from cannot re-run it")
        recorded_files = dict(params.pop("files", {}) or {})
        params.pop("from", None)
        # Images made before calls recorded their guidance interval were guided at every step; a model's own
        # interval would not redraw them.
        params.setdefault("guidance_interval", [0.0, 1.0])
        # Small images recorded inside the image stand in for files that are gone (made on another machine).
        restored = restore_embedded(recorded_files, params.pop("embedded", {}) or {})
        params = replace_strings(params, restored)
        recorded_files = {restored.get(k, k): v for k, v in recorded_files.items()}
        plugins = [{"name": p["name"], "label": p.get("label", p["name"]), "settings": dict(p["settings"])}
                   for p in params.get("plugins", [])]
        apply_settings(plugins, args.set, source)
        params.update(given)
        if given or args.set:
            params["from"] = {"image": str(Path(args.from_png).resolve()),
                              "overrides": sorted(given) + [f"--set {s}" for s in args.set]}
    else:
        if args.prompt is None:
            raise CommandLineError("give a PROMPT, or --from IMAGE to re-run a recorded generation")
        source, recorded_files = "", {}
        params = {opt.key: given.get(opt.key, opt.default) for opt in OPTIONS}
        params["prompt"] = args.prompt
        plugins = [{"name": plugin_name(label), "label": label, "settings": settings}
                   for label, settings in parse_settings(args.plugin, args.set)]
    if params.get("seed") is None:
        params["seed"] = random.randrange(2**31)
    files: dict[str, str] = {}
    params["model"] = _absolute_model(str(params["model"]), files)
    if params.get("image") is not None:
        image = Path(params["image"]).expanduser()
        if not image.is_file():
            raise InputFileError(str(params["image"]), "--image: no such file")
        params["image"] = str(image.resolve())
        files[params["image"]] = content_hash(image)
    for p in plugins:
        p["settings"] = absolutise(p["settings"], files)
    if source:
        used = strings_in({**{k: v for k, v in params.items() if k != "files"}, "plugins": plugins})
        verify_inputs(recorded_files, files, used, source)
    params["files"] = files
    return params, plugins


# -- running ----------------------------------------------------------------------------------------------


class _Progress:
    """A progress bar made on the first step (so warnings before it print on their own lines) and cleared
    on failure (so an error message never shares its line)."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            self.bar.leave = ok
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' "Loading weights" bar, off for ``-q`` and restored afterwards (it is process-wide)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def _load_init_image(path: str, height: Optional[int], width: Optional[int], multiple: int) -> tuple[Any, int, int]:
    from PIL import Image

    from .images import open_image

    image = open_image(path)
    w = width if width is not None else image.width - image.width % multiple
    h = height if height is not None else image.height - image.height % multiple
    if w < 1 or h < 1:
        raise InputFileError(path, f"--image: {image.width}x{image.height} is smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    return image, h, w


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    out_path = Path(args.output)
    check_output_path(out_path)
    params, plugin_entries = build_parameters(args)
    for path in output_paths(out_path, int(params.get("num_images_per_prompt") or 1)):
        check_output_path(path)

    import torch

    from .errors import DiffsteerWarning
    from .pipeline import Pipeline
    from .plugins import resolve_plugins

    if args.threads:
        torch.set_num_threads(args.threads)
    # Plugins first: a missing plugin or a bad setting is reported before seconds of model loading.
    plugins = resolve_plugins([(p["name"], p["settings"]) for p in plugin_entries])
    progress = _Progress("denoising", args.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DiffsteerWarning)
        warnings.showwarning = lambda message, category, *a, **k: progress.write(
            f"warning: {message}" if issubclass(category, DiffsteerWarning) else f"{category.__name__}: {message}"
        )
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params.get("dtype") or "fp32"]
        with _loading_bars(not args.quiet):
            pipe = Pipeline.from_pretrained(params["model"], scheduler=params.get("scheduler"), torch_dtype=dtype)
        extra: dict[str, Any] = {}
        height, width = params.get("height"), params.get("width")
        if params.get("image") is not None:
            extra["image"], height, width = _load_init_image(params["image"], height, width, pipe.vae_scale_factor)
            extra["strength"] = params.get("strength", 0.8)
        negative = params.get("negative_prompt")
        ok = False
        try:
            out = pipe(
                params["prompt"],
                negative_prompt=negative[0] if isinstance(negative, list) and len(negative) == 1 else negative,
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                guidance_rescale=params.get("guidance_rescale", 0.0),
                guidance_interval=params.get("guidance_interval"),
                height=height,
                width=width,
                seed=params["seed"],
                eta=params.get("eta"),
                clip_skip=params.get("clip_skip"),
                num_images_per_prompt=params["num_images_per_prompt"],
                plugins=plugins,
                progress=progress,
                **extra,
            )
            ok = True
        finally:
            progress.close(ok)
    saved = {**out.parameters, "dtype": params.get("dtype") or "fp32", "model": params["model"],
             "files": params["files"], "image": params.get("image"),
             "embedded": embed_small_images(params["files"])}
    # A scheduler picked by the model's own config is recorded by name so --from needs no guessing.
    saved["scheduler"] = params.get("scheduler") or out.parameters["scheduler"]
    for entry, recorded in zip(plugin_entries, saved["plugins"]):
        if entry["label"] != entry["name"]:
            recorded["label"] = entry["label"]
    if "from" in params:
        saved["from"] = params["from"]
    for image, path in zip(out.images, output_paths(out_path, len(out.images))):
        save_image(image, path, saved)
        print(path)
    return 0
