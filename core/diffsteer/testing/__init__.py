"""A fixture kit for testing diffsteer plugins: tiny random models, the shapes model, parity helpers.

Loaded by pytest automatically (entry point ``pytest11``) wherever diffsteer is installed; its imports
are deferred, so merely loading it costs nothing. The builders use diffusers, the parity oracle, which
the ``test`` extra installs: ``pip install "diffsteer[test]"``.

Fixtures: ``tiny_sd1`` / ``tiny_sd2`` (folders of tiny random SD1-/SD2-like models written by diffusers'
own ``save_pretrained``), ``tiny_pipe`` (a diffsteer Pipeline on ``tiny_sd1``) and ``shapes_pipe``
(the shipped shapes model). Helpers: ``build_tiny_sd``, ``diffusers_pipeline``, ``max_abs_diff``,
``run_concurrently`` (for thread-safety tests). Test doubles (:mod:`diffsteer.testing.doubles`, imported on
first use): ``PlainCfg`` (the core's guidance formula as an exclusive plugin), the recording plugins
``branch_recorder`` and ``pass_recorder``, and ``run`` (a short call with fixed defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_DOUBLES = ("PlainCfg", "branch_recorder", "pass_recorder", "run")


def __getattr__(name: str) -> Any:
    # The doubles import torch and the core; pytest loads this package at start-up, which must stay cheap.
    if name in _DOUBLES:
        from . import doubles

        return getattr(doubles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SD1_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SD2_SCHEDULER = {
    **SD1_SCHEDULER,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def tiny_unet_config(kind: str) -> dict:
    base = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    if kind == "sd1":
        base.update(attention_head_dim=8)
    else:
        base.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
    return base


def build_tiny_sd(root: Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion folder with diffusers' own ``save_pretrained``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsteer.shapes.vocab import build_tokenizer, load_tokenizer

    tok_dir = build_tokenizer(root / "_tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(kind))
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER if kind == "sd1" else SD2_SCHEDULER)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = root / kind
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def diffusers_pipeline(folder: Path, pipeline_class: str = "StableDiffusionPipeline", scheduler: str | None = None,
                       **scheduler_overrides: Any) -> Any:
    """The diffusers reference pipeline on ``folder`` (no safety checker, progress bar off).

    ``scheduler`` is a diffusers scheduler class name; its config comes from the folder.
    """
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **scheduler_overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| of two tensors or arrays (or lists of PIL images), as float64."""
    import numpy as np

    def arr(x: Any) -> Any:
        if isinstance(x, list):
            return np.stack([np.asarray(i, dtype=np.float64) for i in x])
        if hasattr(x, "detach"):
            return x.detach().double().cpu().numpy()
        return np.asarray(x, dtype=np.float64)

    return float(np.abs(arr(a) - arr(b)).max())


def residual_shapes(config: Any, height: int, width: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """``(down, mid)``: the per-image ``(channels, h, w)`` of each UNet skip connection (``conv_in``'s first)
    and of the mid block, for latents of ``height`` x ``width`` — what a ControlNet-style residual plugin
    must add. ``config`` is a UNet config or its ``config.json`` mapping.

    Example:
        >>> down, mid = residual_shapes({"block_out_channels": [32, 64], "layers_per_block": 1,
        ...     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}, 8, 8)
        >>> down, mid
        ([(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4)], (64, 4, 4))
    """
    from diffsteer.models import UNetConfig

    if not isinstance(config, UNetConfig):
        config = UNetConfig.model_validate(dict(config))
    channels = config.block_out_channels
    shapes = [(channels[0], height, width)]
    for i, c in enumerate(channels):
        shapes += [(c, height, width)] * config.layers()[i]
        if i < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((c, height, width))
    return shapes, (channels[-1], height, width)


def run_concurrently(jobs: "list[Any]") -> list:
    """Run each zero-argument callable of ``jobs`` in its own thread, all released at once; return their
    results in order. The first exception a job raised is raised again here, after every thread ended.

    Example:
        >>> run_concurrently([lambda: 1, lambda: 2])
        [1, 2]
    """
    import threading

    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # raised again below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
