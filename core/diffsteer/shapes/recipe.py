"""The shapes-model recipe: every size, schedule and seed of the shipped model, in one validated object."""

from __future__ import annotations

from typing import Any, Literal, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ShapesRecipe(BaseModel):
    """What ``diffsteer train shapes`` trains. The defaults are the shipped model's recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    #: Distinct training scenes, rendered once and cached.
    n_images: int = Field(24000, ge=64)
    image_size: int = 64

    # -- VAE: 64x64x3 <-> 16x16x4 --------------------------------------------------------------------
    vae_block_out_channels: Tuple[int, ...] = (32, 64, 64)
    vae_steps: int = Field(1500, ge=1)
    vae_batch_size: int = Field(16, ge=1)
    vae_lr: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0)

    # -- text encoder + UNet, trained jointly ------------------------------------------------------------
    text_hidden_size: int = 128
    text_layers: int = 3
    text_heads: int = 4
    unet_block_out_channels: Tuple[int, ...] = (64, 128, 128)
    unet_attention_heads: int = 8
    unet_layers_per_block: int = Field(1, ge=1)
    unet_steps: int = Field(5500, ge=1)
    unet_batch_size: int = Field(32, ge=1)
    unet_lr: float = Field(5e-4, gt=0)
    unet_warmup_steps: int = Field(200, ge=0)
    unet_ema_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(250, ge=1)
    #: How often stage-1 captions hold two objects / name a position (``CaptionStyle``'s defaults are v1's).
    unet_p_two: float = Field(0.4, ge=0, le=1)
    unet_p_position: float = Field(0.3, ge=0, le=1)
    #: Stage 4's caption probe weight (0: off) and what it reads; v2 trains it from the start (see stage 6).
    unet_probe_weight: float = Field(0.0, ge=0)
    unet_probe_attributes: Tuple[str, ...] = ("position", "colour1", "shape1", "colour2", "shape2")
    #: Stage 4's extra loss weight on object cells (0: off), as in stage 6.
    unet_object_weight: float = Field(0.0, ge=0)
    #: bf16 autocast for the UNet and text-encoder passes (the trainer's ``mixed_precision``).
    mixed_precision: Literal["no", "bf16"] = "no"
    #: How the UNet stages draw training timesteps (the trainer's ``timestep_sampling`` and its parameters).
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = Field(1.0, gt=0)
    timestep_uniform_share: float = Field(0.0, ge=0, le=1)
    #: "train" trains the VAE (stage 2); "packaged" takes the VAE shipped in the package (its weights and
    #: scaling factor), so the latent space the plugins' shipped networks were trained on stays the same.
    vae_source: Literal["train", "packaged"] = "train"

    # -- stage 5: fine-tune UNet and text encoder on a second scene set, richer in position words --------------
    # Stage 4 leaves the model blind to position words (50 %, chance). More positioned captions alone did not
    # help (2,000 steps: 52 % on 48 images); an auxiliary probe that must read the position from the text encoder's
    # padding states does (shapes/caption_probe.py explains why). docs/shapes-model.md has the figures.
    refine_n_images: int = Field(24000, ge=64)
    refine_steps: int = Field(2000, ge=0)
    refine_lr: float = Field(2e-4, gt=0)
    refine_warmup_steps: int = Field(100, ge=0)
    refine_p_position: float = Field(0.7, ge=0, le=1)
    refine_p_two: float = Field(0.5, ge=0, le=1)
    #: Weight of the position probe's cross-entropy in stage 5; 0 turns the probe off.
    refine_position_weight: float = Field(0.5, ge=0)

    # -- stage 6: fine-tune the packaged stage-5 model on a third scene set, rich in two-object scenes -----------
    # Stage 5 leaves two-object prompts drawing one colour twice, mostly on black backgrounds (76.4 % both
    # colours present on 72 prompts). The caption probe on both objects alone gave 80.6 %; with the loss also
    # weighted 4x on the cells the objects cover (bind_object_weight 3), 93.1 %, at a cost in strict shape
    # (94.4 -> 88.9 %); the shipped run measured 94.4 %. docs/shapes-model.md has the figures of every trial.
    bind_n_images: int = Field(24000, ge=64)
    bind_steps: int = Field(1200, ge=0)
    bind_lr: float = Field(2e-4, gt=0)
    bind_warmup_steps: int = Field(50, ge=0)
    bind_p_position: float = Field(0.5, ge=0, le=1)
    bind_p_two: float = Field(0.7, ge=0, le=1)
    #: Weight of the caption probe's summed cross-entropies in stage 6; 0 turns the probe off.
    bind_probe_weight: float = Field(0.5, ge=0)
    #: What the stage-6 probe reads (keys of ``caption_probe.ATTRIBUTES``).
    bind_probe_attributes: Tuple[str, ...] = ("position", "colour1", "shape1", "colour2", "shape2")
    #: Extra loss weight on the latent cells objects cover in stage 6 (shapes/object_loss.py); 0 turns it off.
    bind_object_weight: float = Field(3.0, ge=0)

    #: The guidance interval the model folder recommends (``Pipeline.__call__``'s ``guidance_interval``): no
    #: guidance above t = 600 of 1,000, where the scene is laid out (docs/shapes-model.md, "Guidance interval").
    guidance_interval: Tuple[float, float] = (0.0, 0.6)

    #: Weights are written in this dtype (fp16 halves the package data; loading casts to the pipeline's dtype).
    ship_dtype: Literal["float32", "float16"] = "float16"

    @field_validator("bind_probe_attributes", "unet_probe_attributes")
    @classmethod
    def _known_attributes(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        from .caption_probe import attribute_problem

        problem = attribute_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value: Tuple[float, float]) -> Tuple[float, float]:
        from ..request_checks import check_guidance_interval

        return check_guidance_interval(value)

    @model_validator(mode="after")
    def _timestep_mixture(self) -> "ShapesRecipe":
        # Checked here too, so that a bad --set fails before the scenes are rendered and encoded.
        from ..training.config import check_timestep_mixture

        check_timestep_mixture(self.timestep_sampling, self.timestep_uniform_share)
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """Zero terminal SNR, v-prediction, trailing timesteps (see docs/shapes-model.md for why), sampled by
        Euler ancestral: the fresh noise it adds at every step lets later steps correct an earlier step's layout
        error, which a deterministic sampler carries to the end (strictly clean pairs 42 of 48 against DDIM's 34 on
        the tuning seeds; docs/shapes-model.md, "Sampler")."""
        return {
            "_class_name": "EulerAncestralDiscreteScheduler",
            # DDIM's own fields stay: they say how DDIM samples this model when a call names it (diffusers'
            # class defaults, clip_sample and set_alpha_to_one true, would change its images).
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 0,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
        }

    def vae_config(self) -> dict[str, Any]:
        n = len(self.vae_block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": list(self.vae_block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": self.image_size,
            "mid_block_add_attention": False,
            "force_upcast": False,
        }

    def unet_config(self, latent_size: int) -> dict[str, Any]:
        return {
            "sample_size": latent_size,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": self.unet_layers_per_block,
            "block_out_channels": list(self.unet_block_out_channels),
            # cross-attention at 16x16 and 8x8; the 4x4 bottom only mixes
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": self.text_hidden_size,
            "attention_head_dim": self.unet_attention_heads,
            "norm_num_groups": 32,
        }

    def text_config(self, tokenizer: Any) -> dict[str, Any]:
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=self.text_hidden_size,
            intermediate_size=4 * self.text_hidden_size,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


#: Named recipes: ``v1`` is the CPU recipe of stages 1-6 (the defaults); ``v2`` trains one larger stage 4 from
#: scratch on the packaged VAE, with the caption probe and the object-weighted loss from the first step, on a
#: data set rich in two-object and positioned captions, sized for an accelerator (docs/shapes-model.md).
PRESETS: dict[str, dict[str, Any]] = {
    "v1": {},
    "v2": {
        "vae_source": "packaged",
        "n_images": 200_000,
        "unet_block_out_channels": (96, 192, 192),
        "unet_batch_size": 512,
        "unet_lr": 6e-4,
        "unet_warmup_steps": 300,
        "unet_steps": 4000,
        "checkpoint_every": 500,
        "unet_p_two": 0.6,
        "unet_p_position": 0.5,
        "unet_probe_weight": 0.5,
        "unet_object_weight": 3.0,
        "mixed_precision": "bf16",
        "refine_steps": 0,
        "bind_steps": 0,
    },
}


def preset(name: str, **overrides: Any) -> ShapesRecipe:
    """The named recipe of :data:`PRESETS` with ``overrides`` (recipe field names) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown shapes recipe {name!r}; available: {', '.join(PRESETS)}")
    return ShapesRecipe(**{**PRESETS[name], **overrides})
