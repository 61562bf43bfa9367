"""The diffsteer training loop: denoising loss, AdamW, EMA, resumable checkpoints, torchrun data parallelism.

Training techniques (DreamBooth, textual inversion, custom diffusion, ControlNet, ...) are plugins on
the training hooks of :mod:`diffsteer.hookspecs`::

    from diffsteer.training import DiffusionTrainer, InMemoryData, TrainConfig

    trainer = DiffusionTrainer(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                               data=InMemoryData(latents, captions), out_dir="runs/shapes",
                               config=TrainConfig(steps=2000, batch_size=32, lr=2e-4, ema_decay=0.999))
    result = trainer.train(resume=True)
"""

from .batch import DataFn, TrainBatch, append_rows
from .checkpoint import atomic_directory, latest_checkpoint
from .config import TrainConfig
from .data import InMemoryData
from .distributed import ProcessInfo, init_distributed
from .errors import TrainingError
from .loop import DiffusionTrainer, TrainResult
from .loss import TrainOutputs, training_target
from .lr_schedule import lr_factor
from .params import ParamGroup

__all__ = [
    "DataFn",
    "DiffusionTrainer",
    "InMemoryData",
    "ParamGroup",
    "ProcessInfo",
    "TrainBatch",
    "TrainConfig",
    "TrainOutputs",
    "TrainResult",
    "TrainingError",
    "append_rows",
    "atomic_directory",
    "init_distributed",
    "latest_checkpoint",
    "lr_factor",
    "training_target",
]
