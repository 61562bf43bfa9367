"""The guidance branch layout: which slices of the batched UNet call belong to which branch.

Classifier-free guidance stacks an ``uncond`` and a ``cond`` branch into one UNet batch; plugins add
more (SEGA concepts, an image-unconditional branch). Conditioning injectors read the layout so that
what they add covers every branch, whatever other plugins put in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, MutableMapping

import torch


@dataclass(frozen=True)
class Branch:
    """One guidance branch: ``embeddings`` has one row per image of the call."""

    name: str
    embeddings: torch.Tensor
    owner: str = "core"


class BranchLayout:
    """The ordered branches of one UNet batch; branch ``i`` occupies rows ``[i*B, (i+1)*B)``."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._branches: list[Branch] = []

    def add(self, name: str, embeddings: torch.Tensor, owner: str = "core") -> Branch:
        """Append a branch; its embeddings must have ``batch_size`` rows and the existing token shape."""
        if name in self.names:
            other = self[name].owner
            raise ValueError(f"branch {name!r} added by {owner!r} already exists (added by {other!r})")
        if embeddings.shape[0] != self.batch_size:
            raise ValueError(
                f"branch {name!r} from {owner!r} has {embeddings.shape[0]} rows, the call has {self.batch_size}"
            )
        if self._branches and embeddings.shape[1:] != self._branches[0].embeddings.shape[1:]:
            raise ValueError(
                f"branch {name!r} from {owner!r} has embeddings {tuple(embeddings.shape[1:])}, "
                f"other branches {tuple(self._branches[0].embeddings.shape[1:])}"
            )
        branch = Branch(name, embeddings, owner)
        self._branches.append(branch)
        return branch

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._branches]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Branch:
        for b in self._branches:
            if b.name == name:
                return b
        raise KeyError(f"no branch {name!r}; branches are {self.names}")

    def __iter__(self) -> Iterator[Branch]:
        return iter(self._branches)

    def __len__(self) -> int:
        return len(self._branches)

    @property
    def total(self) -> int:
        """Rows of the batched UNet call."""
        return len(self._branches) * self.batch_size

    def rows(self, name: str) -> slice:
        """The rows of the batch that branch ``name`` occupies."""
        i = self.names.index(name) if name in self.names else None
        if i is None:
            raise KeyError(f"no branch {name!r}; branches are {self.names}")
        return slice(i * self.batch_size, (i + 1) * self.batch_size)

    def embeddings(self) -> torch.Tensor:
        """All branches' embeddings stacked in layout order."""
        return torch.cat([b.embeddings for b in self._branches])

    def repeat(self, per_image: torch.Tensor) -> torch.Tensor:
        """Tile a per-image tensor (``batch_size`` rows) so every branch gets a copy."""
        return per_image.repeat(len(self._branches), *([1] * (per_image.ndim - 1)))

    def split(self, batched: torch.Tensor) -> "BranchPredictions":
        """Split a batched UNet output into per-branch tensors."""
        return BranchPredictions({b.name: batched[self.rows(b.name)] for b in self._branches})

    def subset(self, names: list[str]) -> "BranchLayout":
        """A layout holding only ``names`` (in that order), for an extra UNet pass over some branches."""
        sub = BranchLayout(self.batch_size)
        for n in names:
            b = self[n]
            sub.add(b.name, b.embeddings, b.owner)
        return sub


class BranchPredictions(MutableMapping[str, torch.Tensor]):
    """Per-branch UNet predictions of one step; assigning keeps the shape."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        self._data = dict(data)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._data[name]
        except KeyError:
            raise KeyError(f"no prediction for branch {name!r}; branches are {list(self._data)}") from None

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name in self._data and value.shape != self._data[name].shape:
            raise ValueError(
                f"prediction for branch {name!r} must keep shape {tuple(self._data[name].shape)}, "
                f"got {tuple(value.shape)}"
            )
        self._data[name] = value

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)
