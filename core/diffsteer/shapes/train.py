"""Train the shapes model from scratch: render data, train the VAE, encode latents, train text encoder + UNet,
fine-tune both on a second scene set richer in position words with the caption probe on position
(stage 5, ``refine_steps=0`` skips it), then fine-tune the packaged stage-5 model on a third set rich in
two-object scenes with the probe on both objects and an object-weighted loss (stage 6, ``bind_steps=0``
skips it).

Every stage checkpoints atomically into ``OUT/work`` and is skipped once done, so an interrupted run
resumes where it stopped (``diffsteer train shapes --out OUT`` again). The finished model is written to
``OUT`` in the diffusers folder layout.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..atomic import atomic_file, remove_stale_temporaries, scratch_directory
from ..hookspecs import hookimpl
from ..loading.pipeline_loader import PipelineParts, load_pipeline_parts, shipped_model_dir
from ..loading.pipeline_writer import save_pipeline
from ..loading.weights import load_state_dict, save_state_dict
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..plugins import Plugin
from ..schedulers import make_scheduler
from ..training import DiffusionTrainer, InMemoryData, TrainConfig
from .caption_probe import CaptionProbe
from .object_loss import MASK_KEY, ObjectWeightedLoss, object_masks
from .recipe import ShapesRecipe
from .vocab import build_tokenizer, load_tokenizer
from .world import CaptionStyle, ShapesDataset

Log = Callable[[str], None]


# -- threads ---------------------------------------------------------------------------------------------


def _cpu_busy() -> float:
    """Busy (non-idle) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle


class ThreadGovernor:
    """Re-picks the torch thread count from the measured load of *other* processes.

    Measured here: on a loaded 2-core CPU, 2 torch threads ran about 6x slower than 1, so a training
    run that shares the machine must drop to one thread, and take both back when it is alone.
    ``tick()`` is cheap; every ``interval`` seconds it compares the machine's busy time with this
    process's own CPU time over the elapsed interval (no extra sleeping).
    """

    def __init__(self, log: Log, interval: float = 30.0, fixed: int | None = None) -> None:
        self.log, self.interval, self.fixed = log, interval, fixed
        self.cores = os.cpu_count() or 1
        self.threads = 0
        self._mark = self._sample()
        self._set(fixed or (self.cores if self.cores > 1 else 1), other=0.0)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            busy = _cpu_busy()
        except OSError:  # not Linux: assume the machine is ours
            busy = 0.0
        return time.monotonic(), time.process_time(), busy / (os.sysconf("SC_CLK_TCK") or 100)

    def _set(self, threads: int, other: float) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
            self.log(f"threads: {threads} (other processes keep {other:.2f} of {self.cores} cores busy)")

    def tick(self) -> None:
        if self.fixed:
            return
        now = self._sample()
        wall = now[0] - self._mark[0]
        if wall < self.interval:
            return
        own = now[1] - self._mark[1]
        machine = now[2] - self._mark[2]
        self._mark = now
        other = max(machine - own, 0.0) / wall
        self._set(self.cores if other < 0.3 else max(1, self.cores - math.ceil(other - 0.3)), other)


# -- stage 1: data ---------------------------------------------------------------------------------------


def render_dataset(
    work: Path, recipe: ShapesRecipe, log: Log, *, name: str = "data", n_images: int | None = None,
    seed: int | None = None, style: CaptionStyle = CaptionStyle(),
) -> tuple[torch.Tensor, list[str]]:
    """Scenes as uint8 ``(N, 3, H, W)`` plus captions, cached in ``work/{name}.safetensors``.

    Defaults are stage 1's (``recipe.n_images`` scenes of ``recipe.seed``); stage 5 renders its own set.
    """
    n = recipe.n_images if n_images is None else n_images
    seed = recipe.seed if seed is None else seed
    images_file = work / f"{name}.safetensors"
    captions_file = work / ("captions.json" if name == "data" else f"{name}-captions.json")
    if images_file.is_file() and captions_file.is_file():
        return load_state_dict(images_file)["images"], json.loads(captions_file.read_text())
    t0 = time.time()
    ds = ShapesDataset(n, seed=seed, size=recipe.image_size, style=style)
    # Item i depends on (seed, i) alone, so chunks rendered by worker processes join to the same tensor.
    chunks = [range(i, min(i + 4096, n)) for i in range(0, n, 4096)]
    workers = min(os.cpu_count() or 1, len(chunks))
    if workers > 1:
        import multiprocessing

        # spawn, not fork: a forked child of a process that has run torch's OpenMP pool can hang.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, [(ds, c) for c in chunks])
    else:
        parts = [_render_chunk((ds, c)) for c in chunks]
    images = torch.cat([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    save_state_dict({"images": images}, images_file)
    with atomic_file(captions_file) as tmp:
        tmp.write_text(json.dumps(captions))
    log(f"{name}: rendered {n} scenes in {time.time() - t0:.0f}s")
    return images, captions


def _render_chunk(job: tuple[ShapesDataset, range]) -> tuple[torch.Tensor, list[str]]:
    ds, rows = job
    # One thread per worker: a pool of workers each running torch's full thread pool on tiny tensors
    # oversubscribes the cores many times over (it stalled a 16-core machine for minutes).
    torch.set_num_threads(1)
    images = torch.empty(len(rows), 3, ds.size, ds.size, dtype=torch.uint8)
    captions = []
    for j, i in enumerate(rows):
        item = ds[i]
        images[j] = ((item["pixel_values"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        captions.append(item["caption"])
    return images, captions


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


# -- stage 2: VAE ------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two ``[-1, 1]`` image batches."""
    mse = float(((a.clamp(-1, 1) - b) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def packaged_vae() -> AutoencoderKL:
    """The VAE shipped in the package (float32), with its scaling factor in its config."""
    return load_pipeline_parts(shipped_model_dir(), torch_dtype=torch.float32).vae.eval()


def train_vae(work: Path, recipe: ShapesRecipe, images: torch.Tensor, log: Log,
              device: torch.device = torch.device("cpu")) -> AutoencoderKL:
    """Reconstruction + a small KL term; resumes from ``work/vae-ckpt``."""
    final = work / "vae.safetensors"
    vae = AutoencoderKL.from_config(recipe.vae_config())
    if final.is_file():
        vae.load_state_dict(load_state_dict(final))
        return vae.eval().to(device)
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL.from_config(recipe.vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    ckpt = work / "vae-ckpt.pt"
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log(f"vae: resuming at step {start}")
    n_held = min(256, len(images) // 4)  # the recipe's 256; a small test run keeps most images for training
    held_out = to_pixels(images[-n_held:]).to(device)
    t0 = time.time()
    governor = ThreadGovernor(log)
    for step in range(start, recipe.vae_steps):
        governor.tick()
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        idx = torch.randint(0, len(images) - n_held, (recipe.vae_batch_size,), generator=g)
        x = to_pixels(images[idx]).to(device)
        # cosine decay to 10%: the last steps sharpen edges
        lr = recipe.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / recipe.vae_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        post = vae.encode(x)
        recon = vae.decode(post.sample(generator=g))
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).sum(dim=(1, 2, 3)).mean()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + recipe.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == recipe.vae_steps:
            with torch.no_grad():
                vae.eval()
                p = psnr(vae.decode(vae.encode(held_out[:64]).mean), held_out[:64])
                vae.train()
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f} psnr {p:.1f} dB "
                f"({time.time() - t0:.0f}s)")
        if (step + 1) % 500 == 0 and step + 1 < recipe.vae_steps:
            _atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    save_state_dict(vae.state_dict(), final)
    ckpt.unlink(missing_ok=True)
    return vae.eval()


def _atomic_torch_save(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


# -- stage 3: latents -------------------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(
    work: Path, vae: AutoencoderKL, images: torch.Tensor, log: Log, *, name: str = "latents"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior means and stds of every image, and the scaling factor giving latents unit variance."""
    f = work / f"{name}.safetensors"
    if f.is_file():
        d = load_state_dict(f)
        return d["mean"], d["std"], float(d["scaling_factor"])
    means, stds = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(images), 256):
        post = vae.encode(to_pixels(images[i : i + 256]).to(device))
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.std())
    save_state_dict({"mean": mean, "std": std, "scaling_factor": torch.tensor(scaling)}, f)
    log(f"{name}: {tuple(mean.shape)}, scaling_factor {scaling:.4f}")
    return mean, std, scaling


# -- stage 4: text encoder + UNet ---------------------------------------------------------------------------


class _Pacer(Plugin):
    """Training plugin of the recipe: re-picks threads and logs progress (uses the train-batch hook)."""

    name = "shapes-pacer"

    def __init__(self, governor: ThreadGovernor, log: Log, total: int, every: int = 50, label: str = "unet") -> None:
        super().__init__()
        self.governor, self.log, self.total, self.every, self.label = governor, log, total, every, label
        self.t0 = time.time()

    @hookimpl
    def diffsteer_train_batch(self, trainer: Any, batch: Any) -> None:
        self.governor.tick()
        step = trainer.step
        if step and step % self.every == 0 and trainer.losses:
            recent = trainer.losses[-self.every:]
            self.log(f"{self.label} step {step}/{self.total} loss {sum(recent) / len(recent):.4f} "
                     f"({time.time() - self.t0:.0f}s)")


def _train_jointly(
    work: Path, recipe: ShapesRecipe, name: str, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
    tokenizer: Any, latents: torch.Tensor, captions: list[str], log: Log, *, steps: int, lr: float,
    warmup_steps: int, seed: int, extra_plugins: Sequence[Plugin] = (),
    extra_data: Optional[Mapping[str, torch.Tensor]] = None, threads: Optional[int] = None,
) -> None:
    """Train UNet and text encoder together on ``latents`` (resuming from ``work/name``), then leave both
    holding their EMA weights. Stages 4, 5 and 6 differ only in the arguments (``extra_data``: per-row
    tensors the plugins read from the batch)."""
    config = TrainConfig(
        steps=steps, batch_size=recipe.unet_batch_size, lr=lr, warmup_steps=warmup_steps, lr_schedule="cosine",
        ema_decay=recipe.unet_ema_decay, caption_dropout=recipe.caption_dropout, seed=seed,
        train_text_encoder=True, checkpoint_every=recipe.checkpoint_every, log_every=50, progress=False,
        mixed_precision=recipe.mixed_precision, timestep_sampling=recipe.timestep_sampling,
        timestep_logit_mean=recipe.timestep_logit_mean, timestep_logit_std=recipe.timestep_logit_std,
        timestep_uniform_share=recipe.timestep_uniform_share,
    )
    # The data lives where the UNet does: one gather per step, no host-to-device copy.
    device = next(unet.parameters()).device
    latents = latents.to(device)
    extra_data = {k: v.to(device) for k, v in (extra_data or {}).items()}
    trainer = DiffusionTrainer(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        # DDPM gives the forward process for any training timestep (add_noise, get_velocity).
        scheduler=make_scheduler("ddpm", recipe.scheduler_config()),
        data=InMemoryData(latents, captions, **extra_data), config=config, out_dir=work / name,
        plugins=[_Pacer(ThreadGovernor(log, fixed=threads), log, steps, label=name), *extra_plugins],
    )
    t0 = time.time()
    trainer.train(resume=True)
    log(f"{name}: {steps} steps done ({time.time() - t0:.0f}s this session)")
    # ema_weights() alone would restore the trained weights on exit.
    with trainer.ema_weights():
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (unet, text_encoder)]
    unet.load_state_dict(states[0])
    text_encoder.load_state_dict(states[1])


def stage4_plugins(recipe: ShapesRecipe, images: torch.Tensor, latent_size: int) -> tuple[list[Plugin], dict[str, torch.Tensor]]:
    """Stage 4's training plugins and the per-row data they read: the caption probe and the object-weighted loss
    when the recipe turns them on (v2), nothing for v1."""
    plugins: list[Plugin] = []
    extra: dict[str, torch.Tensor] = {}
    if recipe.unet_probe_weight > 0:
        plugins.append(CaptionProbe(recipe.text_hidden_size, recipe.unet_probe_weight, recipe.unet_probe_attributes,
                                    seed=recipe.seed))
    if recipe.unet_object_weight > 0:
        plugins.append(ObjectWeightedLoss(recipe.unet_object_weight))
        extra[MASK_KEY] = object_masks(images, latent_size)
    return plugins, extra


def train_unet(
    work: Path, recipe: ShapesRecipe, latents: torch.Tensor, captions: list[str], tokenizer: Any, log: Log,
    *, images: Optional[torch.Tensor] = None, device: torch.device = torch.device("cpu"),
    threads: Optional[int] = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Stage 4: text encoder and UNet trained jointly from scratch (v-prediction, zero terminal SNR).

    Returns the EMA weights, which are also kept as ``work/base-unet.safetensors`` and
    ``work/base-text-encoder.safetensors``: with those present the stage is done. ``images`` (the scenes of
    ``latents``) are needed when the recipe weights the loss towards objects.
    """
    torch.manual_seed(recipe.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**recipe.text_config(tokenizer)))
    unet = UNet2DConditionModel.from_config(recipe.unet_config(latents.shape[-1]))
    unet_file, text_file = work / "base-unet.safetensors", work / "base-text-encoder.safetensors"
    if unet_file.is_file() and text_file.is_file():
        unet.load_state_dict(load_state_dict(unet_file))
        text_encoder.load_state_dict(load_state_dict(text_file))
        return unet, text_encoder
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    if recipe.unet_object_weight > 0 and images is None:
        raise ValueError("train_unet: the recipe's object-weighted loss needs the scenes (images=...)")
    plugins, extra = stage4_plugins(recipe, images if images is not None else latents, latents.shape[-1])
    _train_jointly(work, recipe, "unet", unet, text_encoder, tokenizer, latents, captions, log,
                   steps=recipe.unet_steps, lr=recipe.unet_lr, warmup_steps=recipe.unet_warmup_steps, seed=recipe.seed,
                   extra_plugins=plugins, extra_data=extra, threads=threads)
    unet, text_encoder = unet.cpu(), text_encoder.cpu()
    save_state_dict(unet.state_dict(), unet_file)
    save_state_dict(text_encoder.state_dict(), text_file)
    return unet, text_encoder


def refine_models(
    work: Path, recipe: ShapesRecipe, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
    latents: torch.Tensor, captions: list[str], tokenizer: Any, log: Log,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Stage 5: fine-tune the stage-4 UNet and text encoder on ``latents`` (with the position probe when
    ``recipe.refine_position_weight > 0``); both end holding their EMA weights."""
    probe = ([CaptionProbe(recipe.text_hidden_size, recipe.refine_position_weight, ("position",), seed=recipe.seed + 1)]
             if recipe.refine_position_weight > 0 else [])
    _train_jointly(work, recipe, "refine", unet, text_encoder, tokenizer, latents, captions, log,
                   steps=recipe.refine_steps, lr=recipe.refine_lr, warmup_steps=recipe.refine_warmup_steps,
                   seed=recipe.seed + 1, extra_plugins=probe)
    return unet, text_encoder


def bind_models(work: Path, recipe: ShapesRecipe, stage5: Path, log: Log) -> PipelineParts:
    """Stage 6: fine-tune the packaged stage-5 model (``stage5``, in the ship dtype, loaded as float32) on a third
    scene set rich in two-object scenes, with the caption probe on ``recipe.bind_probe_attributes``. Returns the
    stage-5 parts with the fine-tuned UNet and text encoder (EMA weights) in place.

    It starts from the packaged weights, not stage 5's float32 ones, so that a model folder in the shipped
    layout is all it needs: its VAE encodes the new scenes and is shipped unchanged.
    """
    parts = load_pipeline_parts(stage5, torch_dtype=torch.float32)
    unet, text_encoder, vae = parts.unet.train(), parts.text_encoder.train(), parts.vae
    style = CaptionStyle(p_two=recipe.bind_p_two, p_position=recipe.bind_p_position)
    images, captions = render_dataset(work, recipe, log, name="bind-data", n_images=recipe.bind_n_images,
                                      seed=recipe.seed + 2, style=style)
    mean, _, _ = encode_dataset(work, vae, images, log, name="bind-latents")
    plugins: list[Plugin] = []
    if recipe.bind_probe_weight > 0:
        plugins.append(CaptionProbe(recipe.text_hidden_size, recipe.bind_probe_weight, recipe.bind_probe_attributes,
                                    seed=recipe.seed + 2))
    extra: dict[str, torch.Tensor] = {}
    if recipe.bind_object_weight > 0:
        plugins.append(ObjectWeightedLoss(recipe.bind_object_weight))
        extra[MASK_KEY] = object_masks(images, mean.shape[-1])
    _train_jointly(work, recipe, "bind", unet, text_encoder, parts.tokenizer, mean * vae.config.scaling_factor,
                   captions, log, steps=recipe.bind_steps, lr=recipe.bind_lr, warmup_steps=recipe.bind_warmup_steps,
                   seed=recipe.seed + 2, extra_plugins=plugins, extra_data=extra)
    return parts


def _ship(target: Path, recipe: ShapesRecipe, *, unet: torch.nn.Module, vae: torch.nn.Module,
          text_encoder: CLIPTextModel, tokenizer: Any) -> Path:
    """Write the pipeline folder with every model in ``recipe.ship_dtype``."""
    dtype = getattr(torch, recipe.ship_dtype)
    return save_pipeline(target, unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=text_encoder.to(dtype),
                         tokenizer=tokenizer, scheduler_config=recipe.scheduler_config(),
                         guidance_interval=recipe.guidance_interval)


def _stages_1_to_3(work: Path, recipe: ShapesRecipe, log: Log, device: torch.device) -> tuple[Any, ...]:
    """Data, VAE and latents: ``(images, captions, vae, latent means, scaling factor, tokenizer)``."""
    style = CaptionStyle(p_two=recipe.unet_p_two, p_position=recipe.unet_p_position)
    images, captions = render_dataset(work, recipe, log, style=style)
    if recipe.vae_source == "packaged":
        vae = packaged_vae().to(device)
        scaling = float(vae.config.scaling_factor)
        mean, _, _ = encode_dataset(work, vae, images, log)
    else:
        vae = train_vae(work, recipe, images, log, device)
        mean, _, scaling = encode_dataset(work, vae, images, log)
    tokenizer = load_tokenizer(build_tokenizer(work / "tokenizer"))
    return images, captions, vae, mean, scaling, tokenizer


class _Clock(Plugin):
    """Records when each training step starts (the loss read of the step before synchronises the device)."""

    name = "shapes-clock"

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []

    @hookimpl
    def diffsteer_train_batch(self, trainer: Any, batch: Any) -> None:
        self.marks.append(time.perf_counter())


def time_stage4(out: Path, recipe: ShapesRecipe, log: Log = print, *, device: Union[str, torch.device] = "cpu",
                threads: Optional[int] = None, steps: int = 24) -> float:
    """Seconds per stage-4 step of ``recipe`` on ``device``, from ``steps`` throw-away steps after stages 1-3.

    Stages 1-3 are cached in ``out/work`` as in a real run, so ``diffsteer train shapes`` on the same folder
    then starts at stage 4; ``recipe.json`` is not written, so the real run may set ``unet_steps`` from the
    figure. The first third of the steps (warm-up, allocator growth) is not counted.
    """
    device = torch.device(device)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    images, captions, _, mean, scaling, tokenizer = _stages_1_to_3(work, recipe, log, device)
    torch.manual_seed(recipe.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**recipe.text_config(tokenizer))).to(device)
    unet = UNet2DConditionModel.from_config(recipe.unet_config(mean.shape[-1])).to(device)
    plugins, extra = stage4_plugins(recipe, images, mean.shape[-1])
    clock = _Clock()
    timed = recipe.model_copy(update={"checkpoint_every": steps + 1})
    with scratch_directory(work, "timing") as scratch:
        _train_jointly(scratch, timed, "timing", unet, text_encoder, tokenizer, mean * scaling, captions, log,
                       steps=steps, lr=recipe.unet_lr, warmup_steps=0, seed=recipe.seed,
                       extra_plugins=[clock, *plugins], extra_data=extra, threads=threads)
    first = steps // 3
    seconds = (clock.marks[-1] - clock.marks[first]) / (len(clock.marks) - 1 - first)
    log(f"stage 4 on {device}: {seconds:.4f} s per step (batch {recipe.unet_batch_size})")
    return seconds


def train_stage5(work: Path, recipe: ShapesRecipe, target: Path, log: Log, *,
                 device: torch.device = torch.device("cpu"), threads: Optional[int] = None) -> Path:
    """Stages 1-5, written as a pipeline folder (in the ship dtype) to ``target``."""
    images, captions, vae, mean, scaling, tokenizer = _stages_1_to_3(work, recipe, log, device)
    unet, text_encoder = train_unet(work, recipe, mean * scaling, captions, tokenizer, log, images=images,
                                    device=device, threads=threads)
    if recipe.refine_steps:
        style = CaptionStyle(p_two=recipe.refine_p_two, p_position=recipe.refine_p_position)
        images, captions = render_dataset(work, recipe, log, name="refine-data", n_images=recipe.refine_n_images,
                                          seed=recipe.seed + 1, style=style)
        # Stage 3's scaling factor stays: the latent space the UNet learned must not be rescaled.
        mean, _, _ = encode_dataset(work, vae, images, log, name="refine-latents")
        unet, text_encoder = refine_models(work, recipe, unet, text_encoder, mean * scaling, captions, tokenizer, log)
    if recipe.vae_source == "packaged":
        shipped_vae = vae.cpu()  # its own config, scaling factor included
    else:
        shipped_vae = AutoencoderKL.from_config({**recipe.vae_config(), "scaling_factor": scaling})
        shipped_vae.load_state_dict(vae.cpu().state_dict())
    return _ship(target, recipe, unet=unet, vae=shipped_vae, text_encoder=text_encoder, tokenizer=tokenizer)


def train_shapes(out: Path, recipe: ShapesRecipe = ShapesRecipe(), log: Log = print, *,
                 device: Union[str, torch.device] = "cpu", threads: Optional[int] = None,
                 start: Optional[Path] = None) -> Path:
    """Run (or resume) every stage and write the finished pipeline folder to ``out / "model"``.

    With stage 6 on, stages 1-5 end in ``out/work/stage5-model``; once that folder exists they are not re-run.
    ``start`` (a model folder in the shipped layout, e.g. the shipped model's) skips stages 1-5: stage 6
    fine-tunes that model instead (a continuation run on a CPU). ``device`` is where the networks train (the
    data is rendered on the CPU); ``threads`` fixes the torch thread count instead of letting the recipe follow
    the machine's load.
    """
    device = torch.device(device)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run's atomic writes left
    recipe_file = work / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != recipe.model_dump(mode="json"):
        raise ValueError(f"{recipe_file}: this folder holds a run of another recipe; use a new --out")
    with atomic_file(recipe_file) as tmp:
        tmp.write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    log(f"recipe: {recipe.model_dump(mode='json')} on {device}")
    if start is not None:
        stage5 = _recorded_start(work, recipe, Path(start), log)
    elif not recipe.bind_steps:
        model = train_stage5(work, recipe, out / "model", log, device=device, threads=threads)
        log(f"model written to {model} ({recipe.ship_dtype})")
        return model
    else:
        stage5 = work / "stage5-model"
        if not (stage5 / "model_index.json").is_file():
            train_stage5(work, recipe, stage5, log, device=device, threads=threads)
            log(f"stage-5 model written to {stage5} ({recipe.ship_dtype})")
    parts = bind_models(work, recipe, stage5, log)
    # The VAE goes back to the dtype it was packaged in, bit for bit.
    model = _ship(out / "model", recipe, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder,
                  tokenizer=parts.tokenizer)
    log(f"model written to {model} ({recipe.ship_dtype})")
    return model


def _recorded_start(work: Path, recipe: ShapesRecipe, start: Path, log: Log) -> Path:
    """``start``, the model folder stage 6 fine-tunes in place of stages 1-5, recorded in ``work`` so that a
    resume from another model is refused."""
    if not recipe.bind_steps:
        raise ValueError("--from fine-tunes a model with stage 6, and this recipe has bind_steps 0: set --bind-steps")
    if not (start / "model_index.json").is_file():
        raise ValueError(f"{start}: not a model folder (no model_index.json)")
    start_file = work / "start.json"
    record = {"start": str(start.resolve())}
    if start_file.is_file() and json.loads(start_file.read_text()) != record:
        raise ValueError(f"{start_file}: this folder continues another model; use a new --out")
    with atomic_file(start_file) as tmp:
        tmp.write_text(json.dumps(record))
    log(f"stages 1-5 skipped: stage 6 fine-tunes {start}")
    return start
