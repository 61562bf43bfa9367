"""Training a ControlNet on the core training loop, and the ``diffsteer train controlnet`` command.

:class:`ControlNetTraining` is the training plugin: it hands the trainer the ControlNet's parameters
(the UNet stays frozen), runs the ControlNet on each micro-batch's control images and adds its
residuals to the UNet pass, and writes the ControlNet folder on export. The command renders
shapes-world scenes with their outlines (or masks), encodes them with the base model's VAE once and
trains; it resumes from the latest checkpoint when run again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from diffsteer import Plugin, hookimpl
from diffsteer.atomic import atomic_file, remove_stale_temporaries
from diffsteer.latent_codec import encode_images
from diffsteer.loading.weights import load_state_dict, save_state_dict
from diffsteer.training import InMemoryData, ParamGroup

from .loading import EXPORT_SUBFOLDER, save_controlnet
from .model import ControlNetModel

if TYPE_CHECKING:  # pragma: no cover
    from diffsteer import Pipeline
    from diffsteer.call import UNetInputs
    from diffsteer.training import DiffusionTrainer, TrainBatch

__all__ = ["ControlNetTraining", "add_arguments", "build_shapes_data", "default_embedding_channels", "run"]

#: The batch item holding the control images: uint8 or float in [0, 1], ``(b, 1 or 3, H, W)``.
CONTROL_KEY = "control"
Log = Callable[[str], None]


def default_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Control-encoder widths for a VAE that downsamples by ``vae_scale_factor`` (SD's 8: diffusers' default)."""
    n = int(round(math.log2(vae_scale_factor))) + 1
    widths = (16, 32, 96, 256)
    return widths[:n] if n <= len(widths) else widths + (256,) * (n - len(widths))


def as_control(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 or float control images as float ``[0, 1]`` with ``channels`` channels."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.repeat(1, channels, 1, 1) if x.shape[1] == 1 and channels != 1 else x


class ControlNetTraining(Plugin):
    """Training plugin: trains ``controlnet`` against a frozen UNet (hooks train_parameters, train_model_inputs,
    train_save; train_batch only logs).

    Example::

        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 96))
        trainer = DiffusionTrainer(unet=pipe.unet, ..., data=InMemoryData(latents, captions, control=outlines),
                                   plugins=[ControlNetTraining(net)])
    """

    name = "controlnet-training"

    def __init__(
        self, controlnet: ControlNetModel, *, save_dtype: Optional[torch.dtype] = None, log: Optional[Log] = None,
        log_every: int = 50,
    ) -> None:
        super().__init__()
        self.controlnet, self.save_dtype, self.log, self.log_every = controlnet, save_dtype, log, log_every
        self._t0 = time.time()

    @hookimpl
    def diffsteer_train_parameters(self, trainer: "DiffusionTrainer") -> list[ParamGroup]:
        self.controlnet.train()
        return [ParamGroup("controlnet", list(self.controlnet.parameters()))]

    @hookimpl
    def diffsteer_train_batch(self, trainer: "DiffusionTrainer", batch: "TrainBatch") -> None:
        step = trainer.step
        if self.log is not None and step and step % self.log_every == 0 and trainer.losses:
            recent = trainer.losses[-self.log_every:]
            self.log(f"step {step}/{trainer.config.steps} loss {sum(recent) / len(recent):.4f} "
                     f"({time.time() - self._t0:.0f}s this session)")

    @hookimpl
    def diffsteer_train_model_inputs(self, trainer: "DiffusionTrainer", batch: "TrainBatch", inputs: "UNetInputs") -> None:
        if CONTROL_KEY not in batch:
            raise KeyError(f"{self.name}: the training data must return {CONTROL_KEY!r} (the control images)")
        net = self.controlnet
        control = as_control(batch[CONTROL_KEY], net.config.conditioning_channels).to(inputs.sample.device, net.dtype)
        down, mid = net(inputs.sample, inputs.timestep, inputs.encoder_hidden_states, control)
        inputs.add_residuals(self.name, down=list(down), mid=mid)

    @hookimpl
    def diffsteer_train_save(self, trainer: "DiffusionTrainer", directory: Path) -> bool:
        save_controlnet(self.controlnet, directory / EXPORT_SUBFOLDER, dtype=self.save_dtype)
        return True  # the UNet did not train: nothing else to write


# -- shapes-world data ---------------------------------------------------------------------------------------


@torch.no_grad()
def build_shapes_data(
    pipe: "Pipeline", n_images: int, *, seed: int, conditioning: str, cache: Optional[Path] = None, log: Log = print
) -> InMemoryData:
    """Scenes with their control images; latents are the base VAE's posterior means (scaled). Cached in ``cache``."""
    if cache is not None and cache.is_file() and cache.with_suffix(".json").is_file():
        d = load_state_dict(cache)
        return InMemoryData(d["latents"], json.loads(cache.with_suffix(".json").read_text()), control=d["control"])
    from diffsteer.shapes.world import ShapesDataset

    t0 = time.time()
    latent = pipe.unet.config.sample_size
    pixels = latent * pipe.vae_scale_factor if isinstance(latent, int) else 64
    ds = ShapesDataset(n_images, seed=seed, size=pixels, conditioning=(conditioning,))
    images, controls, captions = [], [], []
    for i in range(n_images):
        item = ds[i]
        images.append(item["pixel_values"])
        controls.append((item[conditioning] * 255).round().to(torch.uint8))
        captions.append(item["caption"])
    latents = torch.cat([
        encode_images(pipe.vae, torch.stack(images[i:i + 256]), sample=False).cpu() for i in range(0, n_images, 256)
    ])
    control = torch.stack(controls)
    if cache is not None:
        save_state_dict({"latents": latents.contiguous(), "control": control.contiguous()}, cache)
        with atomic_file(cache.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(captions))
    log(f"data: {n_images} scenes with {conditioning} controls, latents {tuple(latents.shape[1:])} ({time.time() - t0:.0f}s)")
    return InMemoryData(latents, captions, control=control)


# -- the command -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffsteer train controlnet``."""
    parser.add_argument("--out", required=True, help="run folder: data cache, checkpoints/, final/controlnet, log")
    parser.add_argument("--model", default="shapes", help="base model (default: the shipped shapes model)")
    parser.add_argument("--conditioning", choices=("outline", "mask"), default="outline")
    parser.add_argument("--images", type=int, default=8000, help="distinct training scenes (default 8000)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--caption-dropout", type=float, default=0.5,
                        help="share of empty captions, so the ControlNet learns from the image alone (paper: 0.5)")
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32", help="storage type of the export")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) ``diffsteer train controlnet``; returns the exit status."""
    from diffsteer import Pipeline
    from diffsteer.schedulers import make_scheduler
    from diffsteer.training import DiffusionTrainer, TrainConfig

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # before the data cache is read: a killed run may have left its temporaries
    pipe = Pipeline.from_pretrained(args.model)
    log(f"options: {json.dumps(vars(args), default=str)}")
    data = build_shapes_data(pipe, args.images, seed=args.seed, conditioning=args.conditioning,
                             cache=out / f"data-{args.conditioning}-{args.images}-{args.seed}.safetensors", log=log)
    torch.manual_seed(args.seed)
    net = ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=default_embedding_channels(pipe.vae_scale_factor)
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        caption_dropout=args.caption_dropout, ema_decay=args.ema_decay, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=10, progress=False, weight_decay=0.0,
    )
    trainer = DiffusionTrainer(
        unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        # DDPM gives the forward process (add_noise, get_velocity) of the base model's schedule.
        scheduler=make_scheduler("ddpm", pipe.scheduler.config), data=data, config=config, out_dir=out,
        plugins=[ControlNetTraining(net, save_dtype=torch.float16 if args.save_dtype == "fp16" else None, log=log)],
    )
    t0 = time.time()
    result = trainer.train(resume=True)
    log(f"done: {result.steps} steps, last loss {result.losses[-1]:.4f} ({time.time() - t0:.0f}s this session); "
        f"ControlNet in {result.export / EXPORT_SUBFOLDER if result.export else '?'}")
    return 0
