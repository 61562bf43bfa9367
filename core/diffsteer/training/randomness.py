"""Randomness derived from (seed, step, row) alone, never from iterator or global RNG state.

Every random choice of a training step (which examples, which timesteps, which noise, which captions
drop) is a pure function of the run's seed, the optimizer step and the row's key. So a resumed run
redraws exactly what the uninterrupted one drew, and a row gets the same noise whichever process, or
which micro-step, handles it.

The process-wide generators (torch's default ones, numpy's and Python's ``random``) are seeded from the
run's seed too (:func:`seed_global_rngs`), for plugins and models that draw from them (dropout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

# Distinct streams, so that e.g. the data order of epoch 3 never shares a seed with row 3's noise.
_ORDER_STREAM = 1
_ROW_STREAM = 2
_GLOBAL_STREAM = 3
# Larger datasets are read in order: a permutation of them would not fit in memory, and data that
# large is procedural (ShapesDataset's "unlimited" length is 2**31 - 1), so shuffling gains nothing.
MAX_SHUFFLED = 1 << 24


def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence hashing: well spread, platform-stable)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return int(((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1))


def generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*words))


def seed_global_rngs(seed: int) -> None:
    """Seed torch's default generators (CPU and every CUDA device), numpy's and Python's global RNGs."""
    value = derive_seed(seed, _GLOBAL_STREAM)
    torch.manual_seed(value)
    np.random.seed(value & 0xFFFFFFFF)  # numpy takes 32 bits
    random.seed(value)


class DataOrder:
    """Which dataset index each row position of a step reads.

    Position ``p = step * rows_per_step + j``. With a known dataset ``size`` the positions run through a
    fresh permutation per epoch (epoch ``p // size``, seeded by ``(seed, epoch)``); without one the
    dataset is taken as unbounded and read in order (procedural data needs no shuffling); so is one of
    more than :data:`MAX_SHUFFLED` items.
    """

    def __init__(self, seed: int, rows_per_step: int, size: Optional[int] = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"the dataset is empty (len(data) == {size})")
        if size is not None and size > MAX_SHUFFLED:
            size = None
        self.seed, self.rows_per_step, self.size = seed, rows_per_step, size
        self._cached: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            assert self.size is not None
            perm = torch.randperm(self.size, generator=generator(self.seed, _ORDER_STREAM, epoch))
            self._cached = (epoch, perm)
        return self._cached[1]

    def indices(self, step: int, rows: Sequence[int]) -> list[int]:
        """Dataset indices of the rows ``rows`` (positions within the step) of optimizer step ``step``."""
        out = []
        for j in rows:
            p = step * self.rows_per_step + int(j)
            if self.size is None:
                out.append(p)
            else:
                out.append(int(self._permutation(p // self.size)[p % self.size]))
        return out


@dataclass(frozen=True)
class TimestepSampling:
    """How a row's training timestep is drawn (``TrainConfig.timestep_sampling`` and its parameters)."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    #: logit_normal only: probability that a row draws uniformly instead (a two-part mixture).
    uniform_share: float = 0.0

    def draw(self, generator: torch.Generator, num_train_timesteps: int) -> torch.Tensor:
        """One timestep in ``[0, num_train_timesteps)``, shape ``(1,)``, from ``generator``."""
        if self.kind == "uniform":
            return torch.randint(0, num_train_timesteps, (1,), generator=generator)
        if self.kind != "logit_normal":
            raise ValueError(f"unknown timestep sampling {self.kind!r}; use 'uniform' or 'logit_normal'")
        # The coin is only tossed for a mixture, so pure logit-normal runs draw what they always drew.
        if self.uniform_share > 0 and torch.rand(1, generator=generator).item() < self.uniform_share:
            return torch.randint(0, num_train_timesteps, (1,), generator=generator)
        z = torch.randn(1, generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
        # Flooring u * T gives each of the T integer timesteps the probability mass of its 1/T slice of u.
        t = torch.floor(torch.sigmoid(z) * num_train_timesteps).long()
        return t.clamp_(0, num_train_timesteps - 1)


UNIFORM = TimestepSampling()


@dataclass
class RowDraws:
    """Per-row random draws of one micro-batch."""

    timesteps: torch.Tensor  # (b,) int64
    drop_caption: torch.Tensor  # (b,) bool
    noise: torch.Tensor  # (b, *latent_shape)
    generators: list[torch.Generator]  # positioned after the draws above, for further per-row draws


def draw_rows(
    seed: int,
    step: int,
    keys: torch.Tensor,
    latent_shape: Sequence[int],
    num_train_timesteps: int,
    caption_dropout: float,
    timesteps: TimestepSampling = UNIFORM,
) -> RowDraws:
    """Draw timestep, caption-dropout decision and noise for each row from ``(seed, step, key)``.

    The order of draws within a row is fixed (timestep, dropout, noise), so adding a draw later must go
    after these to keep old runs reproducible. A non-uniform ``timesteps`` consumes a different amount of
    the row's stream, so its noise differs from a uniform run's; uniform runs are unchanged.
    """
    ts, drops, noises, gens = [], [], [], []
    for key in keys.tolist():
        g = generator(seed, _ROW_STREAM, step, int(key))
        ts.append(timesteps.draw(g, num_train_timesteps))
        drops.append(torch.rand(1, generator=g) < caption_dropout)
        noises.append(torch.randn(tuple(latent_shape), generator=g))
        gens.append(g)
    return RowDraws(
        timesteps=torch.cat(ts).long(),
        drop_caption=torch.cat(drops),
        noise=torch.stack(noises),
        generators=gens,
    )
