"""Average the UNet and text-encoder weights of two model folders of one architecture (a "model soup").

Run (after ``pip install -e .``)::

    python bench/average_models.py shapes runs/stage10/model --weight 0.5 --out runs/soup50

The output is a copy of the second folder whose ``unet`` and ``text_encoder`` weights are
``(1 - weight) * first + weight * second``, computed in float32 and stored in the second folder's dtypes. Averaging
two fine-tunes of one model (Wortsman et al. 2022, arXiv 2203.05482) can keep what each learned; docs/shapes-model.md
("Stage 10") has what it measured on the shapes model. The VAE, tokenizer and scheduler are the second folder's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from diffsteer.loading.errors import ModelLoadError
from diffsteer.loading.pipeline_loader import resolve_model

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def folder(name: str) -> Path:
    try:
        path = resolve_model(name)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    missing = [w for w in WEIGHTS if not (path / w).is_file()]
    if missing:
        sys.exit(f"error: model folder {name!r} has no {', '.join(missing)}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="model folder, or 'shapes' for the shipped one")
    ap.add_argument("second", help="model folder of the same architecture; the output copies its other parts")
    ap.add_argument("--weight", type=float, default=0.5, help="share of the second model (0..1)")
    ap.add_argument("--out", type=Path, required=True, help="new model folder (must not exist)")
    args = ap.parse_args()
    if not 0.0 <= args.weight <= 1.0:
        sys.exit(f"error: --weight must be between 0 and 1, got {args.weight}")
    if args.out.exists():
        sys.exit(f"error: --out {args.out} exists; averaging writes a new folder")
    first, second = folder(args.first), folder(args.second)
    # Build the whole folder beside its destination and rename it into place, so an interrupted run leaves nothing.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        staging = Path(tmp) / "model"
        shutil.copytree(second, staging)
        for rel in WEIGHTS:
            a, b = load_file(first / rel), load_file(second / rel)
            if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in b):
                sys.exit(f"error: {rel} differs in its tensors' names or shapes between {args.first} and {args.second}")
            mixed = {
                k: ((1 - args.weight) * a[k].float() + args.weight * b[k].float()).to(b[k].dtype)
                if b[k].is_floating_point() else b[k]
                for k in b
            }
            save_file(mixed, staging / rel)
        staging.rename(args.out)
    print(f"wrote {args.out}: {1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second}")


if __name__ == "__main__":
    main()
