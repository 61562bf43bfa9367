"""``diffsteer shapes KIND CAPTION -o FILE``: shapes-world images from a caption, as control images for
ControlNet (``outline``, ``depth``, ``mask``) or as reference pictures (``render``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = {
    "render": "the picture itself: coloured shapes on the background",
    "outline": "white outlines on black (what the shipped 'shapes-outline' ControlNet reads)",
    "depth": "a depth map: nearer objects are brighter",
    "mask": "white where an object is, black elsewhere",
}


def add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=list(KINDS), help="; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    parser.add_argument("caption", help='a shapes-world caption, e.g. "a red circle on the left"')
    parser.add_argument("-o", "--output", required=True, help="the image to write (.png, .jpg, .jpeg or .webp)")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="where objects the caption does not place go, and their sizes (default: 0)")


#: words a caption may hold around the ones that describe objects
_GRAMMAR = frozenset({"a", "an", "and", "on", "the", "at", "of", "in", "with", "to", "background"})


def ignored_words(caption: str) -> list[str]:
    """The words of ``caption`` that the shapes-world parser skips (it reads captions leniently)."""
    import re

    from .shapes.vocab import BACKGROUNDS, parse_caption

    def understood(word: str) -> bool:
        return word in _GRAMMAR or word in BACKGROUNDS or bool(parse_caption(f"a {word}").objects)

    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", caption.lower()) if not understood(w)))


def cmd_shapes(args: argparse.Namespace) -> int:
    from .atomic import atomic_file
    from .image_files import FORMATS, check_output_path
    from .request_checks import check_int
    from .shapes import render, render_depth, render_mask, render_outline, scene_from_caption

    out = Path(args.output)
    check_output_path(out)
    check_int("--size", args.size, minimum=8, maximum=4096)
    check_int("--seed", args.seed, minimum=0, maximum=2**32 - 1)
    ignored = ignored_words(args.caption)
    if ignored:
        print(f"warning: the shapes world does not know {', '.join(map(repr, ignored))}; the caption is read "
              "without them", file=sys.stderr)
    scene = scene_from_caption(args.caption, args.seed)
    draw = {"render": render, "outline": render_outline, "depth": render_depth, "mask": render_mask}[args.kind]
    image = draw(scene, size=args.size)
    fmt, options = FORMATS[out.suffix.lower()]
    with atomic_file(out) as tmp:
        image.convert("RGB").save(tmp, format=fmt, **options)
    print(out)
    return 0


def _covered(prompts: list[str]) -> dict[str, set[str]]:
    from .shapes.vocab import parse_caption

    seen: dict[str, set[str]] = {"colours": set(), "shapes": set(), "backgrounds": set(), "positions": set()}
    for prompt in prompts:
        spec = parse_caption(prompt)
        seen["backgrounds"].add(spec.background or "")
        for obj in spec.objects:
            seen["colours"].add(obj.colour or "")
            seen["shapes"].add(obj.shape or "")
            seen["positions"].add(obj.position or "")
    return seen


def eval_coverage_notes(n_single: int, n_double: int, n_position: int) -> list[str]:
    """What a short ``eval shapes`` run leaves out: per prompt kind, the colours, shapes, backgrounds (and, for
    positioned prompts, positions) its prompts never name, and the count that would cover them all."""
    from .shapes.benchmark import eval_prompts
    from .shapes.vocab import BACKGROUNDS, COLOURS, POSITIONS, SHAPES

    wanted = {"colours": set(COLOURS), "shapes": set(SHAPES), "backgrounds": set(BACKGROUNDS)}
    kinds = [("--single", n_single, lambda n: eval_prompts(n, 0, 0), wanted),
             ("--double", n_double, lambda n: eval_prompts(0, n, 0), wanted),
             ("--position", n_position, lambda n: eval_prompts(0, 0, n), {**wanted, "positions": set(POSITIONS)})]
    notes = []
    for option, count, prompts, need in kinds:
        if count <= 0:
            continue
        seen = _covered(prompts(count))
        missing = {k: sorted(v - seen[k]) for k, v in need.items() if v - seen[k]}
        if not missing:
            continue
        enough = next((n for n in range(count + 1, 4097)
                       if all(need[k] <= _covered(prompts(n))[k] for k in need)), None)
        gaps = "; ".join(f"no {k}: {', '.join(v)}" for k, v in missing.items())
        notes.append(f"{option} {count} does not cover the vocabulary ({gaps}), so its figures say nothing about "
                     f"those words" + (f"; {option} {enough} covers every one" if enough else ""))
    return notes
