"""``diffsteer shapes KIND CAPTION -o FILE``: shapes-world images from a caption, as control images for
ControlNet (``outline``, ``depth``, ``mask``) or as reference pictures (``render``)."""

from __future__ import annotations

import argparse
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


def cmd_shapes(args: argparse.Namespace) -> int:
    from .atomic import atomic_file
    from .image_files import FORMATS, check_output_path
    from .request_checks import check_int
    from .shapes import render, render_depth, render_mask, render_outline, scene_from_caption

    out = Path(args.output)
    check_output_path(out)
    check_int("--size", args.size, minimum=8, maximum=4096)
    check_int("--seed", args.seed, minimum=0, maximum=2**32 - 1)
    scene = scene_from_caption(args.caption, args.seed)
    draw = {"render": render, "outline": render_outline, "depth": render_depth, "mask": render_mask}[args.kind]
    image = draw(scene, size=args.size)
    fmt, options = FORMATS[out.suffix.lower()]
    with atomic_file(out) as tmp:
        image.convert("RGB").save(tmp, format=fmt, **options)
    print(out)
    return 0
