"""Rename tables shared by the single-file converters.

A converter is a list of :class:`Rule` objects, one per module, built from the model config.
Each rule pairs a diffusers module path with its original (LDM) path and says how the names
*below* that module map. One table serves both directions, so reading and writing cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from diffsteer.loading.errors import WeightsError

Direction = Literal["to_diffusers", "to_original"]

# Leaf table for a module whose own parameters (weight, bias) are all it holds.
DIRECT: Mapping[str, str] = {"": ""}

_SHOW = 5


@dataclass(frozen=True)
class Rule:
    """One module: ``diffusers`` path <-> ``original`` path (no trailing dots).

    ``leaves`` maps diffusers sub-module names to original ones (``""`` is the module itself);
    ``None`` means every name below the module is the same in both layouts.
    """

    diffusers: str
    original: str
    leaves: Mapping[str, str] | None = None


def show_keys(keys: list[str]) -> str:
    """``'a', 'b' (and 3 more, 5 in all)``: enough to act on, short enough to read."""
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return f"{shown} (and {len(keys) - _SHOW} more, {len(keys)} in all)" if len(keys) > _SHOW else shown


class KeyMap:
    """Bidirectional key renaming driven by a list of :class:`Rule` s."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        self._index: dict[Direction, dict[str, tuple[Rule, Mapping[str, str] | None]]] = {
            "to_diffusers": {},
            "to_original": {},
        }
        for r in self.rules:
            back = None if r.leaves is None else {v: k for k, v in r.leaves.items()}
            self._index["to_diffusers"][r.original] = (r, back)
            self._index["to_original"][r.diffusers] = (r, r.leaves)

    def rename(self, key: str, direction: Direction) -> tuple[str, Rule] | None:
        """The renamed key and the rule that matched, or ``None`` for a key no rule covers."""
        index = self._index[direction]
        parts = key.split(".")
        # Longest module prefix wins, so a nested rule (e.g. a down-sampler conv) beats its parent.
        for i in range(len(parts) - 1, 0, -1):
            hit = index.get(".".join(parts[:i]))
            if hit is None:
                continue
            rule, leaves = hit
            target = rule.original if direction == "to_original" else rule.diffusers
            rest = parts[i:]
            if leaves is None:
                return ".".join([target, *rest]), rule
            sub = leaves.get(".".join(rest[:-1]))
            if sub is None:
                return None
            return ".".join(p for p in (target, sub, rest[-1]) if p), rule
        return None

    def convert(
        self,
        state_dict: Mapping[str, torch.Tensor],
        direction: Direction,
        *,
        source: str,
        in_prefix: str = "",
        out_prefix: str = "",
    ) -> dict[str, torch.Tensor]:
        """Rename every key; unknown keys and modules with no keys raise :class:`WeightsError`.

        ``in_prefix`` is prepended to keys in messages (so they read as they appear in the file);
        ``out_prefix`` is prepended to every output key.
        """
        out: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        used: set[int] = set()
        for key, value in state_dict.items():
            hit = self.rename(key, direction)
            if hit is None:
                unknown.append(in_prefix + key)
                continue
            new, rule = hit
            used.add(id(rule))
            out[out_prefix + new] = value
        if unknown:
            raise WeightsError(f"unknown keys: {show_keys(unknown)}", source=source)
        missing = [r for r in self.rules if id(r) not in used]
        if missing:
            side = (lambda r: r.original) if direction == "to_diffusers" else (lambda r: r.diffusers)
            other = (lambda r: r.diffusers) if direction == "to_diffusers" else (lambda r: r.original)
            names = [f"{in_prefix}{side(r)}.* (-> {other(r)})" for r in missing]
            raise WeightsError(f"missing keys: nothing found for {show_keys(names)}", source=source)
        return out


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}


def require(state_dict: Mapping[str, torch.Tensor], key: str, *, source: str, prefix: str = "") -> torch.Tensor:
    """``state_dict[key]``, or a :class:`WeightsError` naming the missing key as it appears in the file."""
    if key not in state_dict:
        raise WeightsError(f"missing key {prefix + key!r}", source=source)
    return state_dict[key]


def indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers ``N`` over keys that start with ``prefix + "N."``."""
    found = set()
    n = len(prefix)
    for k in keys:
        if k.startswith(prefix):
            head = k[n:].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)
