"""Training settings: one validated, immutable pydantic model."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Beta = Annotated[float, Field(ge=0, lt=1)]

#: Fields that shape the trajectory of a run; a resumed run must have the same values as its checkpoint.
TRAJECTORY_FIELDS = (
    "batch_size",
    "lr",
    "grad_accum",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "ema_decay",
    "caption_dropout",
    "seed",
    "warmup_steps",
    "lr_schedule",
    "max_grad_norm",
    "train_text_encoder",
    "mixed_precision",
    "timestep_sampling",
    "timestep_logit_mean",
    "timestep_logit_std",
    "timestep_uniform_share",
)


def check_timestep_mixture(sampling: str, uniform_share: float) -> None:
    """Raise ``ValueError`` if a uniform share is set without ``timestep_sampling='logit_normal'``."""
    # A uniform share of a uniform draw is still uniform: a value there is a mistaken setting, not a no-op.
    if uniform_share > 0 and sampling != "logit_normal":
        raise ValueError(
            f"timestep_uniform_share={uniform_share} mixes uniform draws into the logit-normal ones; it needs "
            f"timestep_sampling='logit_normal' (got {sampling!r})"
        )


class TrainConfig(BaseModel):
    """Settings of one training run; a bad value raises a pydantic ``ValidationError`` naming the field.

    Batch sizes are *global*: ``batch_size`` rows per micro-step over all processes together, and
    ``grad_accum`` micro-steps per optimizer step, so one optimizer step sees ``batch_size * grad_accum``
    rows whatever the number of processes. That keeps a run's result independent of how it is spread.

    Example::

        cfg = TrainConfig(steps=1000, batch_size=16, lr=1e-4, ema_decay=0.999, warmup_steps=100,
                          lr_schedule="cosine", caption_dropout=0.1)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1, description="optimizer steps of the whole run")
    batch_size: int = Field(ge=1, description="global rows per micro-step (all processes together)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    grad_accum: int = Field(1, ge=1, description="micro-steps accumulated per optimizer step")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay")
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    ema_decay: Optional[float] = Field(
        None, gt=0, lt=1, description="keep an EMA of the trained parameters (used to export and evaluate)"
    )
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability that a caption becomes ''")
    seed: int = Field(0, ge=0, description="data order, noise, timesteps and dropout derive from (seed, step)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="clip the global gradient norm; None: off")
    train_text_encoder: bool = Field(False, description="train the text encoder too (default parameter set)")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="autocast the forward passes to bf16")
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform",
        description="how training timesteps are drawn: uniformly, or t/T = sigmoid(N(mean, std)) (Esser et al. "
        "2024, SD3), which spends the steps on the noise levels the mean selects (> 0: noisier)",
    )
    timestep_logit_mean: float = Field(0.0, description="logit_normal only: mean of the normal before the sigmoid")
    timestep_logit_std: float = Field(1.0, gt=0, description="logit_normal only: its standard deviation")
    timestep_uniform_share: float = Field(
        0.0, ge=0, le=1,
        description="logit_normal only: the share of rows whose timestep is drawn uniformly instead, a mixture "
        "that keeps some of uniform's low-noise steps while the logit-normal weights the noisy ones",
    )
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="steps between checkpoints; the last step always gets one"
    )
    keep_checkpoints: Optional[int] = Field(2, ge=1, description="newest checkpoints kept; None keeps all")
    log_every: int = Field(10, ge=1, description="steps between log lines and progress-bar updates")
    progress: bool = Field(True, description="show a tqdm bar (main process only)")

    @model_validator(mode="after")
    def _share_needs_logit_normal(self) -> "TrainConfig":
        check_timestep_mixture(self.timestep_sampling, self.timestep_uniform_share)
        return self

    @property
    def rows_per_step(self) -> int:
        """Rows one optimizer step sees: ``batch_size * grad_accum``."""
        return self.batch_size * self.grad_accum
