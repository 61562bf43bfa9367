"""Training a new token: ``diffsteer train textual-inversion --token "<x>" --init-token WORD --images DIR --out DIR``.

The core :class:`~diffsteer.training.DiffusionTrainer` runs the denoising loss; :class:`TextualInversionTraining`
(a training plugin) adds the token to the tokenizer, grows the text encoder's token embedding by its rows
(initialised from ``init_token``), and trains that embedding with a gradient hook that zeroes every other row and
``weight_decay=0``, so AdamW leaves the rest of the vocabulary (and the whole UNet and VAE) bit for bit unchanged.
The result is written in the diffusers layout, ``learned_embeds.safetensors`` ``{token: (n, hidden)}``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.atomic import atomic_file
from diffsteer.latent_codec import encode_images, vae_scale_factor
from diffsteer.training import DiffusionTrainer, InMemoryData, ParamGroup, TrainBatch, TrainConfig, TrainResult

from .formats import write_embedding

PLUGIN = "textual-inversion"
EMBEDS_FILE = "learned_embeds.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TokenSettings(BaseModel):
    """What :class:`TextualInversionTraining` learns."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, description="the new token, e.g. '<wedge>'")
    init_token: str = Field(min_length=1, description="an existing one-token word whose embedding starts the new rows")
    num_vectors: int = Field(1, ge=1, le=75, description="vectors of the token (diffusers: <x> <x>_1 ...)")


class TextualInversionTraining(Plugin):
    """Training plugin: only the new token's embedding rows learn.

    Example::

        trainer = DiffusionTrainer(..., plugins=[TextualInversionTraining(token="<x>", init_token="square")])
        trainer.train()   # writes out_dir/final/learned_embeds.safetensors
    """

    name = "textual-inversion-training"
    Settings = TokenSettings
    settings: TokenSettings

    @property
    def spellings(self) -> list[str]:
        t = self.settings.token
        return [t] + [f"{t}_{k}" for k in range(1, self.settings.num_vectors)]

    def expand(self, caption: str) -> str:
        """``<x>`` -> ``<x> <x>_1 ...`` (a spelt-out ``<x>_k`` is left alone)."""
        if self.settings.num_vectors == 1:
            return caption
        pattern = re.escape(self.settings.token) + r"(?!_\d)"
        return re.sub(pattern, " ".join(self.spellings).replace("\\", "\\\\"), caption)

    @hookimpl
    def diffsteer_train_parameters(self, trainer: DiffusionTrainer) -> list[ParamGroup]:
        tok, encoder = trainer.tokenizer, trainer.text_encoder
        vocab = tok.get_vocab()
        taken = [s for s in self.spellings if s in vocab or f"{s}</w>" in vocab]
        if taken:
            raise PluginError(PLUGIN, f"token {taken[0]!r} is already in the tokenizer's vocabulary; choose another --token")
        init = tok(self.settings.init_token, add_special_tokens=False)["input_ids"]
        if len(init) != 1:
            raise PluginError(
                PLUGIN, f"--init-token {self.settings.init_token!r} is {len(init)} tokens for this tokenizer; give one word it knows"
            )
        if tok.add_tokens(self.spellings) != len(self.spellings):
            raise PluginError(PLUGIN, f"the tokenizer did not add all of {self.spellings}")
        self.ids = tok.convert_tokens_to_ids(self.spellings)
        # Rows appended after the vocabulary; the new embedding keeps the old rows' values exactly.
        encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.ids] = weight[init[0]].clone()
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[self.ids] = 1
        # Zero gradients on every other row: with weight_decay 0, AdamW's update of a row that never had a gradient
        # is exactly 0, so those rows stay bit-identical.
        weight.register_hook(lambda grad: grad * keep)
        return [ParamGroup("textual-inversion", [weight], weight_decay=0.0)]

    @hookimpl
    def diffsteer_train_batch(self, trainer: DiffusionTrainer, batch: TrainBatch) -> None:
        batch["captions"] = [self.expand(c) for c in batch["captions"]]

    def learned(self, trainer: DiffusionTrainer) -> torch.Tensor:
        """The token's current vectors ``(num_vectors, hidden)``."""
        return trainer.text_encoder.get_input_embeddings().weight[self.ids].detach().float().cpu()

    @hookimpl
    def diffsteer_train_save(self, trainer: DiffusionTrainer, directory: Path) -> bool:
        write_embedding(directory / EMBEDS_FILE, self.settings.token, self.learned(trainer))
        return True  # the embedding is the whole result: the core need not export the text encoder


# -- data ----------------------------------------------------------------------------------------------------------


def read_images(folder: Union[str, Path], token: str, template: str = "a {}") -> tuple[list[Image.Image], list[str]]:
    """The images of ``folder`` (sorted by name) and their captions.

    A caption comes from ``NAME.txt`` next to ``NAME.png`` when there is one, else from ``template``; ``{}`` in it
    becomes the token.
    """
    root = Path(folder)
    if not root.is_dir():
        raise PluginError(PLUGIN, f"--images {root}: not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PluginError(PLUGIN, f"--images {root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError as exc:
            raise PluginError(PLUGIN, f"{p}: not a readable image ({exc})") from None
        side = p.with_suffix(".txt")
        text = side.read_text().strip() if side.is_file() else template
        if "{}" not in text and token not in text:
            raise PluginError(PLUGIN, f"{side if side.is_file() else '--template'}: caption {text!r} has neither {{}} nor {token!r}")
        captions.append(text.replace("{}", token))
    return images, captions


def to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Centre-cropped, resized ``[-1, 1]`` images ``(n, 3, size, size)``."""
    out = []
    for im in images:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


# -- one training run --------------------------------------------------------------------------------------------


def train_embedding(
    model: Union[str, Path],
    images: Sequence[Image.Image],
    captions: Sequence[str],
    out_dir: Union[str, Path],
    *,
    token: str,
    init_token: str,
    num_vectors: int = 1,
    config: Union[TrainConfig, dict, None] = None,
    resume: bool = True,
) -> tuple[Path, TrainResult, DiffusionTrainer]:
    """Learn ``token`` from ``images`` on ``model`` (a folder, hub id or ``"shapes"``); returns the embedding file.

    The VAE encodes the images once (posterior means); the trainer then sees latents only. The model is loaded
    fresh, so no pipeline in use is changed. ``out_dir`` gets ``checkpoints/``, ``final/`` and
    ``learned_embeds.safetensors`` (atomically); a second run with ``resume=True`` continues from the newest
    checkpoint and ends where an uninterrupted run ends, even after ``kill -9``: the trainer's start removes what
    killed writes left in ``out_dir``.
    """
    from diffsteer.loading.pipeline_loader import load_pipeline_parts
    from diffsteer.schedulers import make_scheduler

    parts = load_pipeline_parts(model)
    vae = parts.vae.eval()
    size = int(parts.unet.config.sample_size) * vae_scale_factor(vae)
    if len(captions) != len(images):
        raise PluginError(PLUGIN, f"{len(images)} images but {len(captions)} captions")
    with torch.no_grad():
        latents = encode_images(vae, to_pixels(images, size), sample=False)
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(
        **{"steps": 500, "batch_size": min(8, len(images)), "lr": 5e-3, "progress": False, **(config or {})}
    )
    plugin = TextualInversionTraining(token=token, init_token=init_token, num_vectors=num_vectors)
    trainer = DiffusionTrainer(
        unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        # DDPM gives the forward process (add_noise, get_velocity) for any training timestep.
        scheduler=make_scheduler("ddpm", parts.scheduler_config),
        data=InMemoryData(latents, list(captions)), config=cfg, out_dir=out_dir, plugins=[plugin],
    )
    result = trainer.train(resume=resume)
    target = Path(out_dir) / EMBEDS_FILE
    assert result.export is not None
    with atomic_file(target) as tmp:
        tmp.write_bytes((result.export / EMBEDS_FILE).read_bytes())
    return target, result, trainer


# -- the CLI command -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffsteer train textual-inversion``."""
    parser.add_argument("--token", required=True, help='the new token, e.g. "<wedge>"')
    parser.add_argument("--init-token", required=True, help="a one-token word the new embedding starts from")
    parser.add_argument("--images", required=True, help="folder of images (NAME.txt next to an image: its caption)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, final/, learned_embeds.safetensors)")
    parser.add_argument("--model", default="shapes", help="model folder, hub id or 'shapes' (default)")
    parser.add_argument("--template", default="a {}", help="caption of images without a .txt; {} is the token")
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10, help="steps between OUT/train_log.jsonl records")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out has checkpoints")


def run(args: argparse.Namespace) -> int:
    """Run ``diffsteer train textual-inversion``; prints the embedding file's path."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images, captions = read_images(args.images, args.token, args.template)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=True,
        )
    except ValueError as exc:
        raise PluginError(PLUGIN, f"bad training option: {exc}") from None
    path, result, _ = train_embedding(
        args.model, images, captions, args.out, token=args.token, init_token=args.init_token,
        num_vectors=args.num_vectors, config=config, resume=not args.no_resume,
    )
    print(f"{path}  (loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {result.steps} steps)")
    return 0

