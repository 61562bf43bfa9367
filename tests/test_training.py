"""The training loop: objective, accumulation, EMA, resume, atomic checkpoints, torchrun, training hooks.

Tiny random models (a ~0.8M-parameter UNet on 4x8x8 latents, a 2-layer CLIP text encoder) and a few
steps each. The three technique-shaped plugins at the end (textual inversion, custom diffusion,
DreamBooth) and a depth-channel plugin show that each technique fits the training hooks; the shapes
recipe's caption probe is tested last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from diffsteer import Plugin, hookimpl
from diffsteer.models import AutoencoderKL, UNet2DConditionModel
from diffsteer.schedulers import make_scheduler
from diffsteer.shapes.caption_probe import CaptionProbe, caption_label, padding_mean, position_label
from diffsteer.shapes.object_loss import MASK_KEY, ObjectWeightedLoss, object_masks
from diffsteer.shapes.vocab import COLOURS, SHAPES, build_tokenizer, load_tokenizer
from diffsteer.shapes.world import CaptionStyle, ShapesDataset
from diffsteer.text import PromptEncoder
from diffsteer.training import (
    DiffusionTrainer,
    InMemoryData,
    ParamGroup,
    TrainConfig,
    TrainingError,
    append_rows,
    lr_factor,
    training_target,
)
from diffsteer.training.randomness import DataOrder, TimestepSampling, draw_rows

HERE = Path(__file__).resolve().parent
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
ZERO_SNR_V = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


# -- tiny components ------------------------------------------------------------------------------------


def tiny_unet(seed: int = 0, in_channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(
        dict(
            sample_size=8,
            in_channels=in_channels,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=16,
            attention_head_dim=8,
        )
    )


def tiny_text_encoder(tokenizer, seed: int = 1) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )


def toy_data(n: int = 16, seed: int = 3) -> InMemoryData:
    """Latents that are a fixed function of the caption: trivially learnable."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(len(CAPTIONS), 4, 8, 8, generator=g).clamp(-2, 2)
    return InMemoryData(patterns.repeat(n // len(CAPTIONS), 1, 1, 1), CAPTIONS * (n // len(CAPTIONS)))


def components(tokenizer_dir: Path, scheduler: dict | None = None, in_channels: int = 4) -> dict:
    """A fresh, identically initialised set of models (the tokenizer too: plugins may add tokens)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return dict(
        unet=tiny_unet(in_channels=in_channels),
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=make_scheduler("ddpm", scheduler if scheduler is not None else ZERO_SNR_V),
    )


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("train") / "tokenizer")


def make_trainer(tok_dir: Path, out_dir: Path, data=None, plugins=(), scheduler=None, in_channels=4, **cfg):
    base = dict(steps=4, batch_size=4, lr=1e-3, progress=False)
    base.update(cfg)
    return DiffusionTrainer(
        **components(tok_dir, scheduler, in_channels),
        data=data if data is not None else toy_data(),
        config=TrainConfig(**base),
        out_dir=out_dir,
        plugins=plugins,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.state_dict().items() if not torch.equal(before[n], p)}


# -- configuration, schedule, randomness ----------------------------------------------------------------


def test_bad_config_value_names_the_field():
    with pytest.raises(ValidationError, match=r"batch_size\n.*greater than or equal to 1"):
        TrainConfig(steps=10, batch_size=0)
    with pytest.raises(ValidationError, match=r"lr_schedule\n.*'constant' or 'cosine'"):
        TrainConfig(steps=10, batch_size=1, lr_schedule="linear")
    with pytest.raises(ValidationError, match=r"caption_dropout\n"):
        TrainConfig(steps=10, batch_size=1, caption_dropout=1.5)
    with pytest.raises(ValidationError, match=r"lr_shedule\n.*Extra inputs are not permitted"):
        TrainConfig(steps=10, batch_size=1, lr_shedule="cosine")


def test_batch_must_divide_over_processes(tok_dir, tmp_path, monkeypatch):
    from diffsteer.training import distributed

    monkeypatch.setattr(distributed, "init_distributed", lambda device=None: distributed.ProcessInfo(0, 3, 0))
    with pytest.raises(ValueError, match="batch_size=4 .* 3 processes"):
        make_trainer(tok_dir, tmp_path)


def test_lr_warmup_then_constant_or_cosine():
    const = TrainConfig(steps=10, batch_size=1, warmup_steps=4)
    assert [lr_factor(s, const) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = TrainConfig(steps=10, batch_size=1, warmup_steps=2, lr_schedule="cosine")
    f = [lr_factor(s, cos) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(f[2:], f[3:])) and 0 < f[-1] < 0.05


def test_row_draws_depend_on_seed_step_and_key_only():
    keys = torch.arange(8)
    whole = draw_rows(0, 5, keys, (4, 8, 8), 1000, 0.5)
    halves = [draw_rows(0, 5, keys[i : i + 4], (4, 8, 8), 1000, 0.5) for i in (0, 4)]
    # however the rows are split (processes, micro-steps), each row draws the same
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.timesteps, torch.cat([h.timesteps for h in halves]))
    assert not torch.equal(whole.noise, draw_rows(0, 6, keys, (4, 8, 8), 1000, 0.5).noise)
    many = draw_rows(1, 0, torch.arange(2000), (1,), 1000, 0.1)
    assert 0.07 < many.drop_caption.float().mean() < 0.13
    assert many.timesteps.min() >= 0 and many.timesteps.max() <= 999



def test_logit_normal_timesteps_follow_their_distribution_and_uniform_runs_are_unchanged():
    keys = torch.arange(4000)
    skewed = draw_rows(1, 0, keys, (1,), 1000, 0.1, TimestepSampling("logit_normal", 0.5, 1.0)).timesteps
    assert skewed.min() >= 0 and skewed.max() <= 999
    # P(t < 1000 u) = Phi(logit(u) - mean) for std 1: the empirical CDF must match it at every decile.
    normal = torch.distributions.Normal(0.0, 1.0)
    for u in torch.linspace(0.1, 0.9, 9, dtype=torch.float64):
        expected = normal.cdf(torch.logit(u) - 0.5).item()
        assert abs((skewed < 1000 * u).double().mean().item() - expected) < 0.025, float(u)
    # ... which puts about half the steps in [600, 900) where uniform puts 30 %, and 9 % below 300.
    assert 0.45 < ((skewed >= 600) & (skewed < 900)).float().mean() < 0.54
    assert 0.06 < (skewed < 300).float().mean() < 0.12
    # The default draws exactly what a uniform run always drew: one randint per row, first in its stream.
    default = draw_rows(1, 0, keys[:50], (1,), 1000, 0.1)
    explicit = draw_rows(1, 0, keys[:50], (1,), 1000, 0.1, TimestepSampling("uniform"))
    assert torch.equal(default.timesteps, explicit.timesteps) and torch.equal(default.noise, explicit.noise)
    assert not torch.equal(default.timesteps, skewed[:50])
    with pytest.raises(ValueError, match="timestep_sampling"):
        TrainConfig(steps=1, batch_size=1, timestep_sampling="cubic")
    with pytest.raises(ValueError, match="timestep_logit_std"):
        TrainConfig(steps=1, batch_size=1, timestep_logit_std=0.0)


def test_a_uniform_share_mixes_uniform_draws_into_the_logit_normal_and_zero_changes_nothing():
    keys = torch.arange(6000)
    mixed = draw_rows(2, 0, keys, (1,), 1000, 0.1, TimestepSampling("logit_normal", 0.5, 1.0, 0.5)).timesteps
    assert mixed.min() >= 0 and mixed.max() <= 999
    # The mixture's CDF is the average of the two parts': u for uniform, Phi(logit(u) - mean) for the other.
    normal = torch.distributions.Normal(0.0, 1.0)
    for u in torch.linspace(0.1, 0.9, 9, dtype=torch.float64):
        expected = 0.5 * u.item() + 0.5 * normal.cdf(torch.logit(u) - 0.5).item()
        assert abs((mixed < 1000 * u).double().mean().item() - expected) < 0.025, float(u)
    # Half the rows uniform gives back about 20 % of the steps below 300 (logit-normal alone: 9 %).
    assert 0.17 < (mixed < 300).float().mean() < 0.23
    # Share 0 tosses no coin: the same draws, noise included, as a pure logit-normal run.
    pure = draw_rows(2, 0, keys[:50], (1,), 1000, 0.1, TimestepSampling("logit_normal", 0.5, 1.0))
    zero = draw_rows(2, 0, keys[:50], (1,), 1000, 0.1, TimestepSampling("logit_normal", 0.5, 1.0, 0.0))
    assert torch.equal(pure.timesteps, zero.timesteps) and torch.equal(pure.noise, zero.noise)
    # Share 1 is uniform in distribution (its rows toss the coin first, so not draw for draw).
    every = draw_rows(2, 0, keys, (1,), 1000, 0.1, TimestepSampling("logit_normal", 3.0, 1.0, 1.0)).timesteps
    assert abs((every < 300).float().mean().item() - 0.3) < 0.025
    with pytest.raises(ValueError, match="timestep_uniform_share=0.5 .* needs timestep_sampling='logit_normal'"):
        TrainConfig(steps=1, batch_size=1, timestep_uniform_share=0.5)
    with pytest.raises(ValueError, match="timestep_uniform_share"):
        TrainConfig(steps=1, batch_size=1, timestep_sampling="logit_normal", timestep_uniform_share=1.5)


def test_data_order_shuffles_each_epoch_and_reads_unbounded_data_in_order():
    order = DataOrder(seed=0, rows_per_step=4, size=8)
    epoch0 = order.indices(0, range(4)) + order.indices(1, range(4))
    epoch1 = order.indices(2, range(4)) + order.indices(3, range(4))
    assert sorted(epoch0) == sorted(epoch1) == list(range(8)) and epoch0 != epoch1
    assert DataOrder(0, 4).indices(3, [1, 2]) == [13, 14]
    assert DataOrder(0, 4, size=2**31 - 1).indices(3, [1, 2]) == [13, 14]  # too large to permute


def test_targets_follow_prediction_type():
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    eps = make_scheduler("ddpm", {"prediction_type": "epsilon"})
    v = make_scheduler("ddpm", ZERO_SNR_V)
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(training_target(v, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    # zero terminal SNR: at the last timestep the v target is -x0
    assert torch.allclose(training_target(v, x0, noise, t)[2], -x0[2], atol=1e-6)


# -- the objective --------------------------------------------------------------------------------------


def test_loss_decreases_on_a_learnable_toy_target(tok_dir, tmp_path):
    # Clean latents of zero: the noise is x_t / sqrt(1 - abar_t), a per-timestep scale of the input.
    data = InMemoryData(torch.zeros(16, 4, 8, 8), CAPTIONS * 4)
    trainer = make_trainer(
        tok_dir, tmp_path, data=data, scheduler={"prediction_type": "epsilon"}, steps=50, lr=2e-3, log_every=10
    )
    result = trainer.train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    print(f"toy loss (epsilon): first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert result.steps == 50 and len(result.losses) == 50
    assert last < 0.3 * first
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50]


def test_grad_accumulation_equals_the_bigger_batch(tok_dir, tmp_path):
    def pair(steps):
        cfg = dict(steps=steps, caption_dropout=0.5)
        accum = make_trainer(tok_dir, tmp_path / f"a{steps}", batch_size=2, grad_accum=2, **cfg)
        big = make_trainer(tok_dir, tmp_path / f"b{steps}", batch_size=4, grad_accum=1, **cfg)
        return accum, big, accum.train().losses, big.train().losses

    accum, big, la, lb = pair(1)
    # The first step's gradient (still in .grad after training) is the same up to summation order...
    for (n, p), q in zip(accum.unet.named_parameters(), big.unet.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5 * float(q.grad.abs().max()), rtol=0), n
    # ...and so is the loss curve. (Weights are not compared: AdamW's first update is about lr * sign(grad),
    # which turns a 1e-9 difference in a near-zero gradient into a visible one.)
    _, _, la, lb = pair(3)
    assert la == pytest.approx(lb, rel=1e-5)


def test_ema_differs_from_raw_weights_and_is_what_is_exported(tok_dir, tmp_path):
    trainer = make_trainer(tok_dir, tmp_path, steps=5, ema_decay=0.9)
    result = trainer.train()
    raw = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    ema = trainer.ema.state_dict()
    assert any(not torch.equal(ema[f"unet.{n}"], p) for n, p in raw.items())
    exported = load_file(result.export / "unet" / "diffusion_pytorch_model.safetensors")
    for n, p in raw.items():
        assert torch.equal(exported[n], ema[f"unet.{n}"]), n
    with trainer.ema_weights():
        assert torch.equal(dict(trainer.unet.named_parameters())["conv_in.weight"], ema["unet.conv_in.weight"])
    # the trained weights are back after the export and the block
    assert all(torch.equal(p, raw[n]) for n, p in trainer.unet.named_parameters())
    assert not (result.export / "text_encoder").exists()  # frozen parts are not exported


def test_text_encoder_trains_when_asked_and_bf16_runs(tok_dir, tmp_path):
    trainer = make_trainer(tok_dir, tmp_path, steps=2, train_text_encoder=True, mixed_precision="bf16")
    before = snapshot(trainer.text_encoder)
    result = trainer.train()
    assert all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert changed(before, trainer.text_encoder)
    assert (result.export / "text_encoder" / "model.safetensors").is_file()
    assert (result.export / "tokenizer").is_dir()


def test_pixel_values_are_encoded_with_the_vae(tok_dir, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(
        dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=16)
    )
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1

    def data(indices):  # a plain function has no len(): indices run 0, 1, 2, ...; wrap them onto 4 images
        idx = [i % 4 for i in indices]
        return {"pixel_values": pixels[idx], "captions": [CAPTIONS[i] for i in idx]}

    trainer = DiffusionTrainer(
        **components(tok_dir), data=data, vae=vae, out_dir=tmp_path,
        config=TrainConfig(steps=2, batch_size=2, progress=False),
    )
    vae_before = snapshot(vae)
    assert len(trainer.train().losses) == 2
    assert not changed(vae_before, vae)


def test_bad_data_gets_a_clear_error(tok_dir, tmp_path):
    trainer = make_trainer(tok_dir, tmp_path, data=lambda idx: {"images": torch.zeros(len(idx), 4, 8, 8)})
    with pytest.raises(TrainingError, match=r"'captions' and 'latents'.*returned \['images'\]"):
        trainer.train()


# -- checkpoints and resume -----------------------------------------------------------------------------


class Crash(Plugin):
    """Simulates a killed job: fails when the given step starts."""

    name = "crash"

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    @hookimpl
    def diffsteer_train_batch(self, trainer, batch):
        if trainer.step == self.at_step:
            raise KeyboardInterrupt("killed")


RESUME_CFG = dict(
    steps=8, batch_size=2, grad_accum=2, ema_decay=0.9, caption_dropout=0.3, warmup_steps=2,
    lr_schedule="cosine", checkpoint_every=3, train_text_encoder=True, seed=7, log_every=1,
)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_interruption_equals_the_uninterrupted_run(tok_dir, tmp_path):
    full = make_trainer(tok_dir, tmp_path / "full", **RESUME_CFG)
    expected = full.train()

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tok_dir, tmp_path / "cut", plugins=[Crash(at_step=5)], **RESUME_CFG).train()
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]
    log = tmp_path / "cut" / "train_log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    with open(log, "a") as f:
        f.write('{"step": 6, "lo')  # a record cut short by the kill
    with pytest.raises(TrainingError, match="already holds checkpoints.*resume=True"):
        make_trainer(tok_dir, tmp_path / "cut", **RESUME_CFG).train()

    resumed_trainer = make_trainer(tok_dir, tmp_path / "cut", **RESUME_CFG)  # fresh models, same init
    resumed = resumed_trainer.train(resume=True)
    assert resumed.steps == 8 and resumed.losses == expected.losses
    for name, p in full.trainable.items():
        assert torch.equal(p, resumed_trainer.trainable[name]), name
    for name, e in full.ema.state_dict().items():
        assert torch.equal(e, resumed_trainer.ema.state_dict()[name]), name
    # The log was cut back to step 3 and continued: one record per step, the same bytes as the whole run's;
    # so are the checkpoints, their AdamW and RNG states included.
    assert files(tmp_path / "cut") == files(tmp_path / "full")
    # a different trajectory setting cannot silently continue the run
    changed_cfg = {**RESUME_CFG, "lr": 5e-4, "steps": 9}
    with pytest.raises(TrainingError, match=r"config changed \(lr: checkpoint 0.001, now 0.0005\)"):
        make_trainer(tok_dir, tmp_path / "cut", **changed_cfg).train(resume=True)
    skewed_cfg = {**RESUME_CFG, "timestep_sampling": "logit_normal", "steps": 9}
    with pytest.raises(TrainingError, match=r"timestep_sampling: checkpoint 'uniform', now 'logit_normal'"):
        make_trainer(tok_dir, tmp_path / "cut", **skewed_cfg).train(resume=True)
    # A checkpoint written before a trajectory field existed ran with its default, and resumes.
    state_file = max((tmp_path / "cut" / "checkpoints").iterdir()) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("timestep_sampling", "timestep_logit_mean", "timestep_logit_std", "timestep_uniform_share"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    assert make_trainer(tok_dir, tmp_path / "cut", **{**RESUME_CFG, "steps": 9}).train(resume=True).steps == 9


def test_a_failed_checkpoint_write_leaves_no_partial_directory(tok_dir, tmp_path, monkeypatch):
    make_trainer(tok_dir, tmp_path, steps=2).train()
    real_save = torch.save

    def failing_save(obj, path, *a, **kw):
        if str(path).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_trainer(tok_dir, tmp_path, steps=3).train(resume=True)
    # only the complete earlier checkpoint: no step-3 directory, no temp directory
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.setattr(torch, "save", real_save)
    assert make_trainer(tok_dir, tmp_path, steps=3).train(resume=True).steps == 3


def test_global_rngs_are_seeded_for_the_run_and_given_back(tok_dir, tmp_path):
    def global_states() -> tuple:
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    rng_files = []
    for k, seed in enumerate((3, 3, 4)):
        trainer = make_trainer(tok_dir, tmp_path / str(k), steps=2, seed=seed)
        torch.manual_seed(100 + k)  # whatever the caller's states, the run's come from its seed
        np.random.seed(100 + k)
        random.seed(100 + k)
        before = global_states()
        trainer.train()
        after = global_states()
        assert torch.equal(after[0], before[0]) and (after[1] == before[1]).all() and after[2] == before[2]
        rng_files.append((tmp_path / str(k) / "checkpoints" / "step-00000002" / "rng.pt").read_bytes())
    assert rng_files[0] == rng_files[1] != rng_files[2]


def test_resume_prunes_the_checkpoint_a_kill_kept(tok_dir, tmp_path):
    make_trainer(tok_dir, tmp_path, steps=3, checkpoint_every=1).train()
    ckpts = tmp_path / "checkpoints"
    # killed after step 3's checkpoint was renamed into place, before step 1's was pruned
    shutil.copytree(ckpts / "step-00000002", ckpts / "step-00000001")
    assert make_trainer(tok_dir, tmp_path, steps=3, checkpoint_every=1).train(resume=True).steps == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000003"]


# -- data parallel ----------------------------------------------------------------------------------------

WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_training import make_trainer
trainer = make_trainer(Path({tok!r}), Path(sys.argv[1]), **json.loads(sys.argv[2]))
result = trainer.train()
if trainer.process.is_main:
    result = dict(losses=result.losses, world=trainer.process.world_size)
    Path(sys.argv[1], "result.json").write_text(json.dumps(result))
"""
DDP_CFG = dict(steps=4, batch_size=4, caption_dropout=0.25, seed=3, log_every=1)


def test_two_processes_follow_the_one_process_loss_curve(tok_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(HERE), tok=str(tok_dir)))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(out), json.dumps(DDP_CFG)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = make_trainer(tok_dir, tmp_path / "single", **DDP_CFG)
    expected = single.train()
    got = json.loads((out / "result.json").read_text())
    print("1 process:", expected.losses, "\n2 processes:", got["losses"])
    assert got["world"] == 2
    assert got["losses"] == pytest.approx(expected.losses, rel=1e-5)
    # only rank 0 writes: one log line per step, and one set of weights
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# -- training hooks: techniques as plugins ----------------------------------------------------------------


class TextualInversionLike(Plugin):
    """Learns one new token's embedding row; everything else stays bit for bit unchanged."""

    name = "ti-like"
    token = "<new-shape>"

    def __init__(self, init_word: str = "circle", reg: float = 0.0) -> None:
        super().__init__()
        self.init_word, self.reg = init_word, reg

    @hookimpl
    def diffsteer_train_parameters(self, trainer):
        tok, te = trainer.tokenizer, trainer.text_encoder
        tok.add_tokens([self.token])
        te.resize_token_embeddings(len(tok))
        weight = te.get_input_embeddings().weight
        self.row = tok.convert_tokens_to_ids(self.token)
        init_row = tok.convert_tokens_to_ids(self.init_word)
        with torch.no_grad():
            weight[self.row] = weight[init_row]
        self.initial = weight[self.row].detach().clone()
        mask = torch.zeros(weight.shape[0], 1)
        mask[self.row] = 1.0
        weight.register_hook(lambda grad: grad * mask)  # only the new row gets a gradient
        return [ParamGroup("token_embedding", [weight], weight_decay=0.0)]

    @hookimpl
    def diffsteer_train_batch(self, batch):
        batch["captions"] = [c.replace("circle", self.token) for c in batch["captions"]]

    @hookimpl
    def diffsteer_train_loss(self, trainer):
        if self.reg:
            row = trainer.text_encoder.get_input_embeddings().weight[self.row]
            return self.reg * (row - self.initial).pow(2).sum()
        return None

    @hookimpl
    def diffsteer_train_save(self, trainer, directory):
        from safetensors.torch import save_file

        weight = trainer.text_encoder.get_input_embeddings().weight
        save_file({self.token: weight[self.row].detach().clone()}, directory / "learned_embeds.safetensors")
        return True  # the embedding is the whole artifact


def test_textual_inversion_fits_as_a_plugin(tok_dir, tmp_path):
    plugin = TextualInversionLike(reg=1e-3)
    trainer = make_trainer(tok_dir, tmp_path, steps=3, lr=5e-3, plugins=[plugin], ema_decay=0.9)
    unet_before, te_before = snapshot(trainer.unet), snapshot(trainer.text_encoder)
    result = trainer.train()
    assert changed(unet_before, trainer.unet) == set()
    weight = trainer.text_encoder.get_input_embeddings().weight
    emb = next(n for n, p in trainer.text_encoder.named_parameters() if p is weight)
    assert changed(te_before, trainer.text_encoder) == {emb}
    diff = (trainer.text_encoder.state_dict()[emb] != te_before[emb]).any(dim=1).nonzero().flatten().tolist()
    assert diff == [plugin.row]  # exactly the new row moved (AdamW with weight_decay=0 leaves the rest)
    assert sorted(p.name for p in result.export.iterdir()) == ["learned_embeds.safetensors", "training.json"]
    saved = load_file(result.export / "learned_embeds.safetensors")[plugin.token]
    assert torch.equal(saved, trainer.ema.state_dict()[f"text_encoder.{emb}"][plugin.row])


class CustomDiffusionLike(Plugin):
    """Trains only the cross-attention key/value projections."""

    name = "cd-like"

    @hookimpl
    def diffsteer_train_parameters(self, trainer):
        kv = [p for n, p in trainer.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
        return [("cross_attention_kv", kv)]


def test_custom_diffusion_fits_as_a_plugin(tok_dir, tmp_path):
    trainer = make_trainer(tok_dir, tmp_path, steps=2, plugins=[CustomDiffusionLike()], train_text_encoder=True)
    unet_before, te_before = snapshot(trainer.unet), snapshot(trainer.text_encoder)
    trainer.train()
    moved = changed(unet_before, trainer.unet)
    assert moved and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in moved)
    assert len(moved) == len(trainer.trainable)
    assert changed(te_before, trainer.text_encoder) == set()  # the plugin's set replaces the default one


class DreamBoothLike(Plugin):
    """Prior preservation: one class image per instance row, weighted by ``prior_weight``."""

    name = "dreambooth-like"

    def __init__(self, prior_latents: torch.Tensor, prior_weight: float, seen: list) -> None:
        super().__init__()
        self.prior_latents, self.prior_weight, self.seen = prior_latents, prior_weight, seen

    @hookimpl
    def diffsteer_train_batch(self, trainer, batch):
        b = len(batch["captions"])
        extra = {"latents": self.prior_latents[:b], "captions": ["a shape"] * b}
        append_rows(batch, {**extra, "loss_weight": torch.full((b,), self.prior_weight)})

    @hookimpl
    def diffsteer_train_model_inputs(self, batch, inputs):
        self.seen.append(("rows", inputs.sample.shape[0], len(batch["captions"])))

    @hookimpl
    def diffsteer_train_loss(self, outputs):
        b = outputs.data_rows
        expected = outputs.row_loss[:b].mean() + self.prior_weight * outputs.row_loss[b:].mean()
        self.seen.append(("loss", outputs.loss.item(), expected.item()))


def test_dreambooth_prior_preservation_fits_as_a_plugin(tok_dir, tmp_path):
    prior = torch.zeros(4, 4, 8, 8)
    plain = make_trainer(tok_dir, tmp_path / "plain", steps=3).train()
    seen: list = []
    off = make_trainer(tok_dir, tmp_path / "off", steps=3, plugins=[DreamBoothLike(prior, 0.0, seen)]).train()
    assert {s for s in seen if s[0] == "rows"} == {("rows", 8, 8)}  # 4 instance + 4 class rows in one pass
    # The appended rows don't disturb the instance rows' noise and timesteps: with weight 0 the run
    # follows the plain one (up to the batch-size-dependent rounding of the convolutions).
    assert off.losses == pytest.approx(plain.losses, rel=1e-5)
    seen.clear()
    on = make_trainer(tok_dir, tmp_path / "on", steps=3, plugins=[DreamBoothLike(prior, 1.0, seen)]).train()
    checks = [s for s in seen if s[0] == "loss"]
    assert len(checks) == 3
    for _, loss, expected in checks:
        assert loss == pytest.approx(expected, rel=1e-6)  # instance mean + weight * prior mean
    assert on.losses[1:] != pytest.approx(plain.losses[1:], rel=1e-3)


class DepthChannel(Plugin):
    """Depth-conditioned UNet: the data's depth map enters as a fifth input channel."""

    name = "depth-channel"

    @hookimpl
    def diffsteer_train_model_inputs(self, trainer, batch, inputs):
        inputs.add_channels(self.name, batch["depth"].to(inputs.sample))


def test_conditioning_channels_fit_as_a_plugin(tok_dir, tmp_path):
    base = toy_data()
    data = InMemoryData(base.latents, base.captions, depth=base.latents[:, :1].clone())
    with pytest.raises(TrainingError, match="takes 5 input channels but the training pass built 4"):
        make_trainer(tok_dir, tmp_path / "a", data=data, in_channels=5).train()
    result = make_trainer(tok_dir, tmp_path / "b", data=data, in_channels=5, plugins=[DepthChannel()]).train()
    assert len(result.losses) == 4


class ConstantLoss(Plugin):
    name = "constant-loss"

    @hookimpl
    def diffsteer_train_loss(self, trainer, batch, outputs):
        return torch.tensor(1.0)


def test_extra_loss_terms_are_summed(tok_dir, tmp_path):
    base = make_trainer(tok_dir, tmp_path / "a", steps=2).train().losses
    extra = make_trainer(tok_dir, tmp_path / "b", steps=2, plugins=[ConstantLoss(), ConstantLoss()]).train().losses
    assert [e - b for e, b in zip(extra, base)] == pytest.approx([2.0, 2.0], abs=1e-5)


def test_a_parameter_in_two_groups_is_refused(tok_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'unet\.conv_in\.weight' is in two training groups: 'a' and 'b'"):

        class Twice(Plugin):
            name = "twice"

            @hookimpl
            def diffsteer_train_parameters(self, trainer):
                w = trainer.unet.conv_in.weight
                return [ParamGroup("a", [w]), ParamGroup("b", [w])]

        make_trainer(tok_dir, tmp_path, plugins=[Twice()])

# -- the shapes recipe's caption probe (a training plugin of the core) ---------------------------------------

POSITIONED = ["a red circle on the left", "a red circle on the right", "a red circle at the top",
              "a red circle at the bottom"]


def test_labels_name_the_first_objects_position():
    assert [position_label(c) for c in POSITIONED] == [0, 1, 2, 3]
    assert position_label("a blue square on the right and a red circle on the left on a white background") == 1
    assert position_label("a red circle and a blue square at the top") is None  # the first object has none
    assert position_label("a red circle") is None
    assert position_label("") is None


def test_labels_name_each_objects_colour_and_shape():
    two = "a red circle on the left and a blue square on the right on a black background"
    assert caption_label(two, "colour1") == COLOURS.index("red")
    assert caption_label(two, "colour2") == COLOURS.index("blue")
    assert caption_label(two, "shape2") == SHAPES.index("square")
    assert caption_label("a red circle", "colour2") is None  # no second object
    assert caption_label("a circle and a square", "colour2") is None  # a second object without a colour


def test_padding_mean_averages_the_states_from_the_first_end_token_on():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.tensor([[9, 1, 2, 7, 7], [9, 1, 7, 7, 7]])
    got = padding_mean(hidden, ids, eos_token_id=7)
    assert torch.equal(got, torch.stack([hidden[0, 3:].mean(0), hidden[1, 2:].mean(0)]))


class Seen(Plugin):
    name = "seen"

    def __init__(self) -> None:
        super().__init__()
        self.captions: list[list[str]] = []

    @hookimpl
    def diffsteer_train_loss(self, trainer, batch, outputs):
        self.captions.append(list(outputs.captions))


def test_train_loss_sees_the_captions_after_dropout(tok_dir, tmp_path):
    seen = Seen()
    make_trainer(tok_dir, tmp_path, steps=3, caption_dropout=0.5, plugins=[seen]).train()
    flat = [c for step in seen.captions for c in step]
    assert "" in flat and any(flat), flat  # some rows dropped, some kept
    assert set(flat) <= {"", "a red circle", "a blue square", "a green triangle", "a yellow circle"}


def _gap(trainer, captions: list[str]) -> float:
    """Relative distance of the padding-mean states of two captions."""
    enc = PromptEncoder(trainer.tokenizer, trainer.text_encoder)
    ids = enc.token_ids(captions)
    with torch.no_grad():
        pooled = padding_mean(trainer.text_encoder(ids)[0], ids, trainer.tokenizer.eos_token_id)
    return float((pooled[0] - pooled[1]).norm() / pooled[0].norm())


def _probe_gap(tok_dir, tmp_path, captions: list[str], attributes: tuple[str, ...]) -> tuple[float, float, Any]:
    """Train 40 steps with and without the probe on images that carry nothing; the pair gap of each."""
    data = InMemoryData(torch.zeros(8, 4, 8, 8), captions * (8 // len(captions)))
    kw = dict(data=data, steps=40, batch_size=8, lr=3e-3, train_text_encoder=True)
    plain = make_trainer(tok_dir, tmp_path / "plain", **kw)
    plain.train()
    probed = make_trainer(tok_dir, tmp_path / "probe", plugins=[CaptionProbe(32, 1.0, attributes)], **kw)
    result = probed.train()
    assert result.losses[-1] < result.losses[0]
    return _gap(plain, captions[:2]), _gap(probed, captions[:2]), probed


def test_the_probe_makes_the_text_encoder_separate_position_words(tok_dir, tmp_path):
    gap_plain, gap_probe, probed = _probe_gap(tok_dir, tmp_path, POSITIONED, ("position",))
    print(f"left/right padding-state gap: {gap_plain:.3f} without the probe, {gap_probe:.3f} with it")
    assert gap_probe > 3 * gap_plain
    assert {n for n in probed.trainable if n.startswith("caption_probe.")} == {"caption_probe.0", "caption_probe.1"}


def test_the_probe_makes_the_text_encoder_separate_second_colours(tok_dir, tmp_path):
    pairs = ["a red circle and a blue square", "a red circle and a green square",
             "a red circle and a yellow square", "a green circle and a red square"]
    gap_plain, gap_probe, _ = _probe_gap(tok_dir, tmp_path, pairs, ("colour1", "colour2"))
    print(f"blue/green second-object padding-state gap: {gap_plain:.3f} without the probe, {gap_probe:.3f} with it")
    assert gap_probe > 3 * gap_plain
    # one block of logits per attribute: 4 colours + 3 shapes
    assert [p.shape for p in CaptionProbe(32, 1.0, ("colour1", "shape2")).head.parameters()] == [(7, 32), (7,)]


def test_a_bad_probe_setting_is_refused():
    with pytest.raises(ValueError, match="shapes-caption-probe: weight must be > 0"):
        CaptionProbe(hidden_size=32, weight=0.0)
    with pytest.raises(ValueError, match="shapes-caption-probe: attributes must be some of"):
        CaptionProbe(hidden_size=32, weight=1.0, attributes=("colour3",))


# -- the shapes recipe's object-weighted loss ----------------------------------------------------------------


def test_object_masks_cover_every_object_and_no_background():
    ds = ShapesDataset(48, seed=11, style=CaptionStyle(p_two=0.5))
    images = torch.stack([((ds[i]["pixel_values"] + 1) * 127.5).round().to(torch.uint8) for i in range(48)])
    masks = object_masks(images, 16)
    assert masks.shape == (48, 1, 16, 16) and set(masks.unique().tolist()) == {0.0, 1.0}
    for i in range(48):
        for obj in ds.scene(i).objects:
            assert masks[i, 0, int(obj.cy * 16), int(obj.cx * 16)] == 1, (i, obj)
    assert masks[:, :, 0, 0].sum() == 0  # the scenes keep a margin
    covered = masks.mean().item()
    print(f"object cells: {100 * covered:.1f} % of the 16x16 latent")
    assert 0.05 < covered < 0.5
    assert object_masks(torch.full((2, 3, 64, 64), 255, dtype=torch.uint8), 16).sum() == 0
    with pytest.raises(ValueError, match="object_masks: images must be"):
        object_masks(images[:, :1], 16)
    with pytest.raises(ValueError, match="not a multiple of latent size 24"):
        object_masks(images, 24)


class CoreLoss(Plugin):
    name = "core-loss-recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def diffsteer_train_loss(self, trainer, batch, outputs):
        self.seen.append((float(outputs.loss.detach()), outputs.prediction.detach().clone(), outputs.target.detach().clone()))


def test_object_weighted_loss_adds_the_masked_error(tok_dir, tmp_path):
    base = toy_data()
    mask = torch.zeros(len(base), 1, 8, 8)
    mask[:, :, 2:5, 1:6] = 1
    data = InMemoryData(base.latents, base.captions, **{MASK_KEY: mask})
    recorder = CoreLoss()
    result = make_trainer(tok_dir, tmp_path, data=data, steps=2, plugins=[ObjectWeightedLoss(3.0), recorder]).train()
    for total, (core, prediction, target) in zip(result.losses, recorder.seen):
        extra = 3.0 * (mask[: len(prediction)] * (prediction - target) ** 2).mean()
        assert total == pytest.approx(core + float(extra), rel=1e-5)
        assert 0 < float(extra) < 3.0 * core  # the mask covers part of the latent


def test_object_weighted_loss_refuses_bad_input(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="shapes-object-loss: weight must be > 0"):
        ObjectWeightedLoss(0.0)
    with pytest.raises(ValueError, match="shapes-object-loss: the batch has no 'object_mask'"):
        make_trainer(tok_dir, tmp_path / "none", steps=1, plugins=[ObjectWeightedLoss(1.0)]).train()
    wrong = InMemoryData(toy_data().latents, toy_data().captions, **{MASK_KEY: torch.ones(16, 1, 4, 4)})
    with pytest.raises(ValueError, match=r"shapes-object-loss: 'object_mask' is \(4, 1, 4, 4\)"):
        make_trainer(tok_dir, tmp_path / "wrong", data=wrong, steps=1, plugins=[ObjectWeightedLoss(1.0)]).train()
