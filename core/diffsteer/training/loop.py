"""The training loop: denoising loss, AdamW, accumulation, EMA, checkpoints, data parallelism, hooks."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Mapping, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..atomic import atomic_file, remove_stale_temporaries
from ..branches import CONDITIONAL, BranchLayout
from ..call import UNetInputs
from ..latent_codec import to_latent_space
from ..plugins import Plugin, PluginSpec, make_manager, resolve_plugins
from ..schedulers import Scheduler
from ..text import PromptEncoder
from . import distributed as ddp
from .batch import DataFn, TrainBatch, is_per_row
from .checkpoint import (
    CHECKPOINTS,
    CheckpointData,
    atomic_directory,
    capture_rng,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from .config import TRAJECTORY_FIELDS, TrainConfig
from .ema import EMA
from .errors import TrainingError
from .loss import TrainOutputs, row_mse, training_target
from .lr_schedule import lr_factor
from .params import ParamGroup, as_group, name_parameters
from .randomness import DataOrder, TimestepSampling, draw_rows, seed_global_rngs

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL

LOG_FILE = "train_log.jsonl"
EXPORT_DIR = "final"


@dataclass
class TrainResult:
    """What :meth:`DiffusionTrainer.train` returns."""

    #: Mean loss of every optimizer step from step 0 (a resumed run includes the steps before resuming).
    losses: list[float]
    #: Optimizer steps done.
    steps: int
    #: The last checkpoint written (main process only).
    checkpoint: Optional[Path] = None
    #: The exported model directory (main process only).
    export: Optional[Path] = None
    grad_norms: list[float] = field(default_factory=list)


class DiffusionTrainer:
    """Trains a text-conditioned UNet (and optionally the text encoder) on the denoising objective.

    Example::

        trainer = DiffusionTrainer(unet=unet, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   data=InMemoryData(latents, captions), out_dir="runs/a",
                                   config=TrainConfig(steps=500, batch_size=8, lr=1e-4))
        result = trainer.train(resume=True)

    Every random choice derives from ``(config.seed, step, row)``, so ``train(resume=True)`` after an
    interruption ends where an uninterrupted run ends, and N processes under ``torchrun`` follow the
    same loss curve as one process with the same global batch. Models must be on their device before
    the trainer is built (under torchrun with CUDA: ``cuda:LOCAL_RANK``); frozen parts must be loaded
    identically in every process and on resume, since checkpoints hold only the trained parameters.

    Args:
        unet: the UNet; its output is compared with the target of ``scheduler.config.prediction_type``.
        text_encoder, tokenizer: encode captions as the pipeline does (padding to ``max_length``).
        scheduler: gives the forward process (``add_noise``, ``get_velocity``, ``num_train_timesteps``).
        data: ``data(indices) -> {"latents" | "pixel_values", "captions", ...}``, see :data:`DataFn`.
        config: a :class:`TrainConfig` or a mapping of its fields.
        out_dir: receives ``checkpoints/``, ``final/`` and ``train_log.jsonl`` (main process only).
        plugins: training plugins (instances, entry-point names or ``(name, settings)`` pairs), called
            in list order.
        vae: needed only when ``data`` returns ``pixel_values``; it stays frozen.
    """

    def __init__(
        self,
        *,
        unet: "UNet2DConditionModel",
        text_encoder: "CLIPTextModel",
        tokenizer: "CLIPTokenizer",
        scheduler: Scheduler,
        data: DataFn,
        config: Union[TrainConfig, Mapping[str, Any]],
        out_dir: Union[str, Path],
        plugins: Sequence[PluginSpec] = (),
        vae: Optional["AutoencoderKL"] = None,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(dict(config))
        self._timesteps = TimestepSampling(
            self.config.timestep_sampling, self.config.timestep_logit_mean, self.config.timestep_logit_std,
            self.config.timestep_uniform_share,
        )
        self.unet, self.text_encoder, self.tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.scheduler, self.data, self.out_dir = scheduler, data, Path(out_dir)
        self.process = ddp.init_distributed(self.device)
        ddp.check_divisible(self.config.batch_size, self.process.world_size)
        self.plugins: list[Plugin] = resolve_plugins(plugins)
        self.hook = make_manager(self.plugins).hook
        #: Optimizer steps done so far.
        self.step = 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        size = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        self._order = DataOrder(self.config.seed, self.config.rows_per_step, size)
        self._setup_parameters()

    # -- properties ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes checkpoints, exports and logs."""
        return self.process.is_main

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINTS

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by their checkpoint names."""
        return {n: p for g in self.param_groups for n, p in zip(g.names, g.params)}

    # -- setup --------------------------------------------------------------------------------------

    def _setup_parameters(self) -> None:
        cfg = self.config
        results = self.hook.diffsteer_train_parameters(trainer=self)  # Nones are dropped by pluggy
        if results:
            groups = [as_group(g, "diffsteer_train_parameters") for result in results for g in result]
            groups = [g for g in groups if g.params]
            if not groups:
                raise TrainingError("no parameter trains: the plugins' training groups are all empty")
        else:
            groups = [ParamGroup("unet", list(self.unet.parameters()))]
            if cfg.train_text_encoder:
                groups.append(ParamGroup("text_encoder", list(self.text_encoder.parameters())))
        name_parameters(groups, {"unet": self.unet, "text_encoder": self.text_encoder})
        self.param_groups = groups

        # Freeze everything the groups do not name; gradients then flow only where they are wanted.
        chosen = {id(p) for g in groups for p in g.params}
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(id(p) in chosen)
        for g in groups:
            for p in g.params:
                p.requires_grad_(True)
        self._params = [p for g in groups for p in g.params]
        self._text_trains = any(p.requires_grad for p in self.text_encoder.parameters())
        self.unet.train(any(p.requires_grad for p in self.unet.parameters()))
        self.text_encoder.train(self._text_trains)
        if self.vae is not None:
            self.vae.eval()

        self._base_lrs = [g.lr if g.lr is not None else cfg.lr for g in groups]
        decays = [g.weight_decay if g.weight_decay is not None else cfg.weight_decay for g in groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": g.params, "weight_decay": wd} for g, wd in zip(groups, decays)],
            lr=cfg.lr,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
        )
        self.ema = EMA(self.trainable, cfg.ema_decay) if cfg.ema_decay is not None else None

    # -- public API ---------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> TrainResult:
        """Run to ``config.steps`` optimizer steps; with ``resume`` continue from the latest checkpoint.

        Without ``resume``, an ``out_dir`` that already holds checkpoints is refused rather than mixed
        with a new run. Returns the loss of every step, and (main process) the last checkpoint and export.

        A run killed at any point (``kill -9`` included) and started again with ``resume`` ends as the
        uninterrupted run ends, bit for bit: the start deletes the temporaries the killed writers left in
        ``out_dir`` (:func:`~diffsteer.atomic.remove_stale_temporaries`), continues from the newest
        complete checkpoint and cuts ``train_log.jsonl`` back to its step. The process-wide RNGs are
        seeded from ``config.seed`` (or restored from the checkpoint) for the run, and given back to
        the caller as they were when it returns.
        """
        cfg, proc = self.config, self.process
        if proc.is_main:
            remove_stale_temporaries(self.out_dir)
            if resume:
                # A kill between a checkpoint's rename and the pruning leaves one too many.
                prune_checkpoints(self.checkpoint_dir, cfg.keep_checkpoints)
        ddp.barrier(proc.world_size)
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is not None and not resume:
            raise TrainingError(
                f"{self.out_dir} already holds checkpoints (latest {latest.name}); pass resume=True to "
                "continue that run, or choose an empty out_dir"
            )
        callers_rng = capture_rng()
        try:
            if latest is not None:
                self._restore(latest)
            else:
                seed_global_rngs(cfg.seed)
            if proc.is_main:
                self._truncate_log()
            return self._run(latest)
        finally:
            restore_rng(callers_rng)

    def _run(self, latest: Optional[Path]) -> TrainResult:
        cfg, proc = self.config, self.process
        # The same start in every process, whatever each one loaded or initialised.
        ddp.broadcast_parameters(self._params, proc.world_size)

        checkpoint = latest if proc.is_main else None
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc="train", disable=not (proc.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.steps:
                loss, grad_norm = self._optimizer_step()
                self.step += 1
                self.losses.append(loss)
                self.grad_norms.append(grad_norm)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    lr = self._base_lrs[0] * lr_factor(self.step - 1, cfg)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    self._log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
                every = cfg.checkpoint_every
                if self.step == cfg.steps or (every is not None and self.step % every == 0):
                    checkpoint = self.save_checkpoint() or checkpoint
        finally:
            bar.close()
        export = self.export()
        ddp.barrier(proc.world_size)  # the export is complete before any process returns
        return TrainResult(
            losses=list(self.losses), steps=self.step, checkpoint=checkpoint, export=export,
            grad_norms=list(self.grad_norms),
        )

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the trained parameters hold their EMA (no-op without EMA); use it to evaluate."""
        with self.ema.applied() if self.ema is not None else nullcontext():
            yield

    def export(self, directory: Union[str, Path, None] = None) -> Optional[Path]:
        """Write the trained model (EMA weights when enabled) to ``directory`` (default ``out_dir/final``).

        Plugins write their artifacts through :func:`~diffsteer.hookspecs.diffsteer_train_save`; unless
        one returns ``True``, the core writes each trained model in the diffusers layout (``unet/``;
        ``text_encoder/`` and ``tokenizer/`` when the text encoder trained). Atomic; main process only
        (others return ``None``).
        """
        if not self.is_main:
            return None
        from ..loading.pipeline_writer import save_model

        target = Path(directory) if directory is not None else self.out_dir / EXPORT_DIR
        with atomic_directory(target) as tmp, self.ema_weights():
            replaced = any(r is True for r in self.hook.diffsteer_train_save(trainer=self, directory=tmp))
            if not replaced:
                if any(p.requires_grad for p in self.unet.parameters()):
                    save_model(self.unet, tmp / "unet")
                if self._text_trains:
                    self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp / "tokenizer")
            info = {"step": self.step, "ema": self.ema is not None, "config": self.config.model_dump(mode="json")}
            (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        return target

    def save_checkpoint(self) -> Optional[Path]:
        """Write a checkpoint of the current step (main process; every process waits for it)."""
        path = None
        if self.is_main:
            data = CheckpointData(
                step=self.step,
                trainable={n: p.detach() for n, p in self.trainable.items()},
                optimizer=self.optimizer.state_dict(),
                rng=capture_rng(),
                ema=self.ema.state_dict() if self.ema is not None else None,
                state={
                    "losses": self.losses,
                    "grad_norms": self.grad_norms,
                    "ema_updates": self.ema.updates if self.ema is not None else 0,
                    "world_size": self.process.world_size,
                    # The LR schedule is a pure function of (step, config); these make it readable here.
                    "base_lrs": self._base_lrs,
                    "lrs": [g["lr"] for g in self.optimizer.param_groups],
                    "config": self.config.model_dump(mode="json"),
                    "parameters": list(self.trainable),
                },
            )
            path = write_checkpoint(self.checkpoint_dir, data, keep=self.config.keep_checkpoints)
        ddp.barrier(self.process.world_size)
        return path

    # -- one optimizer step -------------------------------------------------------------------------

    def _optimizer_step(self) -> tuple[float, float]:
        cfg, proc = self.config, self.process
        factor = lr_factor(self.step, cfg)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)

        local_rows = cfg.batch_size // proc.world_size
        total = 0.0
        for micro in range(cfg.grad_accum):
            first = micro * cfg.batch_size + proc.rank * local_rows
            total += self._micro_step(list(range(first, first + local_rows)))
        loss = ddp.average_scalar(total / cfg.grad_accum, proc.world_size, self.device)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss is {loss} at step {self.step}; the weights were not updated")

        # A parameter that got no gradient still takes part (as zeros) so every process reduces the
        # same tensors and AdamW treats it alike with 1 or N processes.
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ddp.average_gradients(self._params, proc.world_size)
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm))
        else:
            # An infinite limit only measures (the clip factor is clamped to exactly 1).
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, float("inf")))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return loss, grad_norm

    def _micro_step(self, rows: list[int]) -> float:
        cfg = self.config
        batch = self._read_batch(rows)
        data_rows = len(rows)
        self.hook.diffsteer_train_batch(trainer=self, batch=batch)
        n = self._check_batch(batch)

        latents, draws = self._latents_and_draws(batch)
        device = self.device
        noise = draws.noise.to(device=device, dtype=latents.dtype)
        timesteps = draws.timesteps.to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        captions = ["" if drop else c for c, drop in zip(batch["captions"], draws.drop_caption.tolist())]

        with self._autocast():
            hidden = self._encode(captions)
            layout = BranchLayout(n)
            layout.add("train", hidden, role=CONDITIONAL)
            inputs = UNetInputs(
                sample=noisy.to(self.unet.dtype), timestep=timesteps, encoder_hidden_states=hidden,
                layout=layout, pass_name="train",
            )
            self.hook.diffsteer_train_model_inputs(trainer=self, batch=batch, inputs=inputs)
            prediction = inputs.run(self.unet, channel_error=self._channel_error)
        target = training_target(self.scheduler, latents, noise, timesteps)
        row_loss = row_mse(prediction, target)
        weight = torch.as_tensor(batch["loss_weight"], dtype=torch.float32, device=device)
        core = (weight * row_loss).sum() / data_rows
        outputs = TrainOutputs(
            prediction=prediction, target=target, row_loss=row_loss, loss=core, timesteps=timesteps,
            noise=noise, noisy_latents=noisy, encoder_hidden_states=hidden, captions=captions,
            data_rows=data_rows,
        )
        total = core
        for extra in self.hook.diffsteer_train_loss(trainer=self, batch=batch, outputs=outputs):
            if extra is not None:
                total = total + extra
        # Each micro-step's mean weighs 1/grad_accum: the step's gradient is that of the mean over all rows.
        (total / cfg.grad_accum).backward()
        return float(total.detach())

    # -- pieces of a micro-step -----------------------------------------------------------------------

    def _read_batch(self, rows: list[int]) -> TrainBatch:
        indices = self._order.indices(self.step, rows)
        got = self.data(indices)
        if not isinstance(got, Mapping) or "captions" not in got or not ({"latents", "pixel_values"} & set(got)):
            have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            raise TrainingError(
                f"data(indices) must return a dict with 'captions' and 'latents' (or 'pixel_values' with a "
                f"vae); it returned {have}"
            )
        if "pixel_values" in got and "latents" not in got and self.vae is None:
            raise TrainingError("data returns 'pixel_values' but the trainer has no vae to encode them")
        batch: TrainBatch = dict(got)
        batch["captions"] = list(batch["captions"])
        batch["keys"] = torch.tensor(rows, dtype=torch.long)
        weight = batch.get("loss_weight", torch.ones(len(rows)))
        batch["loss_weight"] = torch.as_tensor(weight, dtype=torch.float32)
        return batch

    def _check_batch(self, batch: TrainBatch) -> int:
        n = int(batch["keys"].shape[0])
        image_key = "latents" if "latents" in batch else "pixel_values"
        for key in (image_key, "captions", "loss_weight"):
            if not is_per_row(batch[key], n):
                got = batch[key].shape[0] if isinstance(batch[key], torch.Tensor) else len(batch[key])
                raise TrainingError(
                    f"batch item {key!r} has {got} rows but 'keys' has {n}; plugins that add rows must "
                    "extend every per-row item (use diffsteer.training.append_rows)"
                )
        return n

    def _latents_and_draws(self, batch: TrainBatch) -> tuple[torch.Tensor, Any]:
        cfg, device = self.config, self.device
        T = self.scheduler.config.num_train_timesteps
        if "latents" in batch:
            latents = batch["latents"].to(device=device, dtype=torch.float32)
            draws = draw_rows(
                cfg.seed, self.step, batch["keys"], latents.shape[1:], T, cfg.caption_dropout, self._timesteps
            )
            return latents, draws
        assert self.vae is not None
        with torch.no_grad():
            posterior = self.vae.encode(batch["pixel_values"].to(device=device, dtype=self.vae.dtype))
        mean, std = posterior.mean.float(), posterior.std.float()
        draws = draw_rows(
            cfg.seed, self.step, batch["keys"], mean.shape[1:], T, cfg.caption_dropout, self._timesteps
        )
        # The posterior sample uses each row's own generator, after its other draws.
        eps = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=g) for g in draws.generators]).to(device)
        return to_latent_space(self.vae, mean + std * eps), draws

    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = PromptEncoder(self.tokenizer, self.text_encoder).token_ids(captions).to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        with torch.set_grad_enabled(self._text_trains):
            return self.text_encoder(ids, attention_mask=mask)[0]

    def _channel_error(self, expected: int, built: int) -> TrainingError:
        latent = int(self.unet.config.out_channels)
        return TrainingError(
            f"the UNet takes {expected} input channels but the training pass built {built} "
            f"({latent} latent + {built - latent} from plugins); "
            "a plugin must add the missing conditioning channels in diffsteer_train_model_inputs"
        )

    def _autocast(self) -> ContextManager[Any]:
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- resume and logs ------------------------------------------------------------------------------

    def _restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path, map_location=self.device)
        saved_cfg = ckpt.state.get("config", {})
        mine = self.config.model_dump(mode="json")
        # A checkpoint written before a field existed ran with that field's default.
        saved = {f: saved_cfg.get(f, TrainConfig.model_fields[f].default) for f in TRAJECTORY_FIELDS}
        differ = [f for f in TRAJECTORY_FIELDS if saved[f] != mine[f]]
        if differ:
            detail = ", ".join(f"{f}: checkpoint {saved[f]!r}, now {mine[f]!r}" for f in differ)
            raise TrainingError(f"cannot resume from {path}: the config changed ({detail})")
        names = set(self.trainable)
        if set(ckpt.trainable) != names:
            missing, extra = sorted(names - set(ckpt.trainable)), sorted(set(ckpt.trainable) - names)
            raise TrainingError(
                f"cannot resume from {path}: trained parameters differ (not in checkpoint: {missing[:5]}, "
                f"only in checkpoint: {extra[:5]}); the same plugins must select the same parameters"
            )
        with torch.no_grad():
            for n, p in self.trainable.items():
                value = ckpt.trainable[n]
                if value.shape != p.shape:
                    raise TrainingError(
                        f"cannot resume from {path}: {n} is {tuple(value.shape)}, the model's {tuple(p.shape)}"
                    )
                p.copy_(value.to(p.dtype))
        self.optimizer.load_state_dict(ckpt.optimizer)
        if self.ema is not None:
            if ckpt.ema is None:
                raise TrainingError(f"cannot resume from {path}: it has no EMA state")
            self.ema.load_state_dict(ckpt.ema, updates=int(ckpt.state.get("ema_updates", 0)))
        self.step = ckpt.step
        self.losses = [float(x) for x in ckpt.state.get("losses", [])][: self.step]
        self.grad_norms = [float(x) for x in ckpt.state.get("grad_norms", [])][: self.step]
        restore_rng(ckpt.rng)

    def _truncate_log(self) -> None:
        """Keep one record per step up to ``self.step``: a killed run logged steps its checkpoint does not hold.

        A line cut short by the kill is dropped too; of repeated steps (logs of older versions) the last stays.
        """
        path = self.out_dir / LOG_FILE
        if not path.is_file():
            return
        text = path.read_text()
        records: dict[int, str] = {}
        for line in text.splitlines():
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(step, int) and step <= self.step:
                records[step] = line
        kept = "".join(records[k] + "\n" for k in sorted(records))
        if kept == text:
            return
        if not kept:
            path.unlink()
            return
        with atomic_file(path) as tmp:
            tmp.write_text(kept)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
