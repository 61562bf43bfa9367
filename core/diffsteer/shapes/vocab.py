"""Closed vocabulary of the shapes world: words, caption grammar, and a CLIP-BPE tokenizer builder.

Caption grammar (canonical form written by :func:`format_caption`, parsed leniently by :func:`parse_caption`)::

    caption := object ("and" object)? ["on a" BACKGROUND "background"]
    object  := "a" [SIZE] [COLOUR] (SHAPE | "shape") [POSITION]

e.g. "a red circle", "a small blue square on the left on a black background",
"a red circle on the left and a yellow triangle on the right".
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field

from ..atomic import atomic_directory
from functools import lru_cache
from pathlib import Path

# --- the world's vocabulary -------------------------------------------------------------------------------------------

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[str, ...] = ("white", "black")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

#: Pure saturated sRGB colours used by the renderer. The extra colours render but are never sampled by default
#: (they exist for DreamBooth / textual-inversion style "new concept" data).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 255),
    "orange": (255, 128, 0),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}

#: Shapes the renderer can draw but the default sampler never emits (new-concept data for TI / DreamBooth).
EXTRA_SHAPES: tuple[str, ...] = ("diamond", "hexagon", "star")

#: Canonical phrase for each position word.
POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

# Lenient parsing: synonyms a user may type map to the canonical word.
_SYNONYMS: dict[str, str] = {
    "big": "large",
    "tiny": "small",
    "little": "small",
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "upper": "top",
    "lower": "bottom",
}
_PLACEHOLDER_NOUNS = frozenset({"shape", "object", "thing"})

#: Every word the tokenizer encodes as exactly one token: caption words, instruction words, and spares a user may type.
VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *COLOURS, *SHAPES, *BACKGROUNDS, *SIZES, *POSITIONS, *EXTRA_SHAPES,
            # grammar
            "a", "an", "and", "on", "the", "at", "of", "in", "with", "to", "into", "is", "it", "there", "background",
            # edit instructions (instruct-pix2pix)
            "make", "turn", "change", "colour", "color", "replace", "move", "remove", "add", "by",
            # spares
            "photo", "image", "picture", "drawing", "painting", "render", "shape", "shapes", "object", "thing",
            "circles", "squares", "triangles", "big", "tiny", "little", "medium", "middle", "center", "centre",
            "corner", "upper", "lower", "above", "below", "next", "beside", "one", "two", "three",
            "purple", "orange", "pink", "cyan", "magenta", "brown", "grey", "gray", "dark", "light", "bright",
            "plain", "pentagon", "rectangle", "oval", "ellipse", "heart", "cross", "ring", "blurry", "noise", "sks",
        ]
    )
)

# --- caption specs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; ``None`` means "not mentioned"."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption says about a scene."""

    objects: tuple[ObjectSpec, ...] = field(default_factory=tuple)
    background: str | None = None


def format_object(o: ObjectSpec) -> str:
    words = ["a"] + [w for w in (o.size, o.colour) if w] + [o.shape or "shape"]
    if o.position:
        words.append(POSITION_PHRASE[o.position])
    return " ".join(words)


def format_caption(spec: CaptionSpec) -> str:
    """Canonical caption text for a spec (inverse of :func:`parse_caption`)."""
    text = " and ".join(format_object(o) for o in spec.objects)
    if spec.background:
        text += f" on a {spec.background} background"
    return text


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]


def parse_caption(caption: str) -> CaptionSpec:
    """Parse a caption leniently: unknown words are ignored, "and" separates objects.

    A phrase counts as an object when it names a colour, shape, size or position; e.g. "a red circle and a blue
    square on a black background" gives two objects and background "black".
    """
    words = _words(caption)
    background = None
    for i, w in enumerate(words):
        # "<bg> background"; the bg word is removed so "white"/"black" can't be read as anything else.
        if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            background = words[i - 1]
            words[i - 1] = words[i] = ""
    objects: list[ObjectSpec] = []
    phrase: list[str] = []
    for w in [*words, "and"]:
        if w != "and":
            phrase.append(w)
            continue
        spec = ObjectSpec(
            shape=next((x for x in phrase if x in SHAPES or x in EXTRA_SHAPES), None),
            colour=next((x for x in phrase if x in COLOUR_RGB), None),
            size=next((x for x in phrase if x in SIZES), None),
            position=next((x for x in phrase if x in POSITIONS), None),
        )
        if spec != ObjectSpec() or any(x in _PLACEHOLDER_NOUNS for x in phrase):
            objects.append(spec)
        phrase = []
    return CaptionSpec(tuple(objects), background)


# --- tokenizer --------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (same order as CLIP, so single-character ids match its layout)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge non-overlapping occurrences left to right, exactly like CLIPTokenizer.bpe does."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


@lru_cache(maxsize=1)
def build_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Learn BPE merges on :data:`VOCAB_WORDS` until each word is one token; return (vocab, merges).

    Merges are learned by ordinary BPE training (most frequent pair first, ties broken lexicographically so the
    result is deterministic); greedy lowest-rank-first encoding then reproduces the training segmentation, so every
    vocabulary word becomes a single ``word</w>`` token.
    """
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in VOCAB_WORDS]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for sym in corpus:
            for pair in zip(sym, sym[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        corpus = [_merge_pair(sym, best) for sym in corpus]
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for t in tokens:  # a merge may recreate an existing token; keep the first id
        vocab.setdefault(t, len(vocab))
    return vocab, tuple(merges)


def vocab_size() -> int:
    """Number of token ids; the text encoder's ``vocab_size`` must be at least this. EOS is the last id."""
    return len(build_vocab()[0])


def build_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """Write a CLIP-BPE tokenizer folder (vocab.json, merges.txt, configs) for the shapes vocabulary.

    ``transformers.CLIPTokenizer.from_pretrained(directory)`` loads it; every word of :data:`VOCAB_WORDS` is one
    token, other words fall back to sub-word / single-character tokens. The folder is written to a temporary sibling
    and renamed into place, so a reader never sees a half-written tokenizer.
    """
    target = Path(directory)
    vocab, merges = build_vocab()
    with atomic_directory(target) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **special,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return target


def load_tokenizer(directory: str | os.PathLike[str] | None = None):  # -> transformers.CLIPTokenizer
    """Load the shapes tokenizer from ``directory``, building it there first if it holds no vocab.json.

    Without ``directory`` it is built into a fresh temporary folder. An existing folder is never rewritten.
    """
    from transformers import CLIPTokenizer

    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="diffsteer-shapes-tok-")) / "tokenizer"
    directory = Path(directory)
    # A saved tokenizer holds vocab.json (slow format) or tokenizer.json (fast format, as transformers 5 saves
    # the packaged one); only a folder with neither is built.
    if not any((directory / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        build_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(str(directory))
