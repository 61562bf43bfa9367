"""What the prompt parsers produce: weighted fragments, blends and conjunctions, and syntax errors.

Both syntaxes (:mod:`.compel_syntax`, :mod:`.a1111_syntax`) parse a prompt string into the same small tree, which
:mod:`.encoder` turns into embeddings::

    Conjunction(parts=[Prompt | Blend, ...], weights=[...])   # ("a", "b").and() -> parts side by side (token axis)
    Blend(prompts=[Prompt, ...], weights=[...], normalize)    # ("a", "b").blend(0.7, 0.3) -> a weighted sum
    Prompt(fragments=[Fragment | Break, ...])                 # text runs, each with one weight
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text whose tokens all get ``weight``; ``start`` is its offset in the prompt string."""

    text: str
    weight: float = 1.0
    start: int = 0


@dataclass(frozen=True)
class Break:
    """A forced chunk boundary (A1111's ``BREAK``): the next fragment starts a new 75-token chunk."""

    start: int = 0


@dataclass(frozen=True)
class Prompt:
    """One token sequence: fragments in order."""

    fragments: tuple[Union[Fragment, Break], ...]

    def pairs(self) -> list[tuple[str, float]]:
        """``(text, weight)`` of each fragment (``("BREAK", -1.0)`` for a break), for tests and inspection."""
        return [("BREAK", -1.0) if isinstance(f, Break) else (f.text, f.weight) for f in self.fragments]


@dataclass(frozen=True)
class Blend:
    """A weighted sum of the embeddings of several prompts (compel's ``.blend()``)."""

    prompts: tuple[Prompt, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class Conjunction:
    """Parts encoded separately and concatenated along the token axis (compel's ``.and()``), each scaled by its
    weight relative to the empty prompt. A plain prompt is a conjunction of one part with weight 1."""

    parts: tuple[Union[Prompt, Blend], ...]
    weights: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.weights:
            object.__setattr__(self, "weights", (1.0,) * len(self.parts))


class PromptSyntaxError(ValueError):
    """A prompt that does not parse: ``message``, the ``prompt`` and the character ``position`` at fault."""

    def __init__(self, message: str, prompt: str, position: int, syntax: str) -> None:
        self.message, self.prompt, self.position, self.syntax = message, prompt, max(0, position), syntax
        super().__init__(self.describe())

    def describe(self) -> str:
        """The message, then the prompt with a caret under the offending character."""
        line, pointer = _excerpt(self.prompt, self.position)
        return f"{self.message} (character {self.position + 1}, {self.syntax} syntax)\n    {line}\n    {pointer}"


def _excerpt(prompt: str, position: int, width: int = 70) -> tuple[str, str]:
    """A one-line window of ``prompt`` around ``position`` and a caret line under it."""
    flat = prompt.replace("\n", " ").replace("\t", " ")
    start = max(0, min(position - width // 2, len(flat) - width))
    end = min(len(flat), start + width)
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(flat) else ""
    line = prefix + flat[start:end] + suffix
    return line, " " * (len(prefix) + position - start) + "^"
