"""Exponential moving average of the trained parameters."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch


class EMA:
    """An fp32 shadow copy of named parameters, updated after each optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run's
    average is not dominated by the initial weights (a plain 0.999 average would need ~1000 steps to
    forget them).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = dict(params)
        self.shadow = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow toward the current parameters."""
        d = self.current_decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; the trained ones come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        self.updates = updates
