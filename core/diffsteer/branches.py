"""The guidance branch layout: which slices of the batched UNet call belong to which branch.

Classifier-free guidance stacks an ``uncond`` and a ``cond`` branch into one UNet batch; plugins add
more (SEGA concepts, an image-unconditional branch). Conditioning injectors read the layout so that
what they add covers every branch, whatever other plugins put in the batch, and read each branch's
*role* to decide what it gets: :data:`UNCONDITIONAL` (what guidance measures against: the core's
``uncond``), :data:`CONDITIONAL` (the prompt: the core's ``cond``) or :data:`EXTRA` (anything a plugin
adds: a SEGA concept, instruct-pix2pix's image-only branch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, MutableMapping

import torch

from .errors import PluginError

#: The branch guidance is measured against (classifier-free guidance's negative prompt).
UNCONDITIONAL = "unconditional"
#: The branch of the user's prompt.
CONDITIONAL = "conditional"
#: Any other branch a plugin adds.
EXTRA = "extra"
ROLES = (UNCONDITIONAL, CONDITIONAL, EXTRA)


@dataclass(frozen=True)
class Branch:
    """One guidance branch: ``embeddings`` has one row per image of the call."""

    name: str
    embeddings: torch.Tensor
    owner: str = "core"
    #: :data:`UNCONDITIONAL`, :data:`CONDITIONAL` or :data:`EXTRA`.
    role: str = EXTRA


class BranchLayout:
    """The ordered branches of one UNet batch; branch ``i`` occupies rows ``[i*B, (i+1)*B)``."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._branches: list[Branch] = []

    def add(self, name: str, embeddings: torch.Tensor, owner: str = "core", role: str = EXTRA) -> Branch:
        """Append a branch; its embeddings must have ``batch_size`` rows and the existing token shape.

        ``role`` says what injectors give it (see the module docs); plugins' branches are :data:`EXTRA`
        unless they stand in for the unconditional or conditional one.
        """
        if name in self.names:
            other = self[name].owner
            raise PluginError(owner, f"branch {name!r} already exists (added by {other!r})")
        if role not in ROLES:
            raise PluginError(owner, f"branch {name!r} has role {role!r}; roles are {', '.join(ROLES)}")
        self._check(owner, name, embeddings)
        branch = Branch(name, embeddings, owner, role)
        self._branches.append(branch)
        return branch

    def _check(self, owner: str, name: str, embeddings: torch.Tensor) -> None:
        if embeddings.shape[0] != self.batch_size:
            raise PluginError(
                owner, f"branch {name!r} has {embeddings.shape[0]} rows of embeddings, the call has {self.batch_size}"
            )
        others = [b for b in self._branches if b.name != name]
        if others and embeddings.shape[1:] != others[0].embeddings.shape[1:]:
            raise PluginError(
                owner,
                f"branch {name!r} has embeddings {tuple(embeddings.shape[1:])}, "
                f"other branches {tuple(others[0].embeddings.shape[1:])}",
            )

    def replace_embeddings(self, name: str, embeddings: torch.Tensor, owner: str) -> Branch:
        """Give branch ``name`` new embeddings of the same shape (its name, owner and role stay)."""
        old = self[name]
        if embeddings.shape != old.embeddings.shape:
            raise PluginError(
                owner, f"edited embeddings of branch {name!r} are {tuple(embeddings.shape)}, "
                f"they must stay {tuple(old.embeddings.shape)}"
            )
        branch = Branch(old.name, embeddings, old.owner, old.role)
        self._branches[self.names.index(name)] = branch
        return branch

    def with_role(self, role: str) -> list[str]:
        """Names of the branches that have ``role``, in layout order."""
        return [b.name for b in self._branches if b.role == role]

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
            sub.add(b.name, b.embeddings, b.owner, b.role)
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
