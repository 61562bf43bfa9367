"""Warnings about prompts that run but are probably not read as meant.

* a prompt longer than the text encoder's window is truncated (the ``prompt-weighting`` plugin encodes long
  prompts in chunks);
* weighting syntax (``(red:1.5)``, ``(red)1.5``, ``red++``) with no plugin that encodes prompts is read as
  literal text;
* on a closed-vocabulary model (the shapes world), words it was never trained on carry no meaning;
* an angle-bracket token (``<wedge>``) that no plugin added is read as plain text.

Each is a :class:`~diffsteer.errors.DiffsteerWarning`, raised once per call, after the plugins' setup (where
textual inversion adds its tokens).
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Optional

from .errors import DiffsteerWarning

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall

WEIGHTING_PLUGIN = "prompt-weighting"

_WEIGHT_SYNTAX = re.compile(
    r"\([^()]*:\s*-?\d*\.?\d+\s*\)"  # A1111: (red:1.5)
    r"|\)\s*-?\d*\.\d+|\)\s*\d+(?![\w.])"  # compel: (red)1.5
    r"|[A-Za-z]\+\++|[A-Za-z]\+(?=[\s,.)]|$)"  # compel: red+, red++
    r"|[A-Za-z]--+(?=[\s,.)]|$)"  # compel: red--
    r"|\.(?:blend|and)\("  # compel conjunctions
)
_ANGLE_TOKEN = re.compile(r"<[^<>\s|]+>")
_CONJUNCTION = re.compile(r"\.(?:blend|and)\(")


@lru_cache(maxsize=1)
def shapes_trained_words() -> frozenset[str]:
    """The words the shapes-world captions use (the words such a model was trained on)."""
    from .shapes.vocab import BACKGROUNDS, COLOURS, POSITION_PHRASE, POSITIONS, SHAPES, SIZES

    grammar = {"a", "and", "on", "background", "shape"}
    phrases = {w for phrase in POSITION_PHRASE.values() for w in phrase.split()}
    return frozenset({*COLOURS, *SHAPES, *BACKGROUNDS, *SIZES, *POSITIONS, *grammar, *phrases})


def closed_vocabulary(tokenizer: object) -> Optional[frozenset[str]]:
    """The trained words when ``tokenizer`` is the shapes world's (a small BPE where each world word is one
    token), else None: an open-vocabulary tokenizer (CLIP's 49408 tokens) says nothing about training."""
    from .shapes.vocab import VOCAB_WORDS

    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab()
    if len(vocab) > 4096 or not all(f"{w}</w>" in vocab for w in VOCAB_WORDS):
        return None
    return shapes_trained_words()


def weighting_fragments(prompt: str) -> list[str]:
    """The pieces of ``prompt`` that look like prompt-weighting syntax."""
    return [m.group(0) for m in _WEIGHT_SYNTAX.finditer(prompt)]


def unknown_words(prompt: str, known: Iterable[str]) -> list[str]:
    """Words of ``prompt`` (outside angle-bracket tokens) that are not in ``known``, in order, once each."""
    known = set(known)
    text = _CONJUNCTION.sub(" ", _ANGLE_TOKEN.sub(" ", prompt.lower()))
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text) if w not in known))


def undefined_tokens(prompt: str, defined: Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """Angle-bracket tokens of ``prompt`` that neither a plugin added nor the tokenizer knows."""
    have = {t.lower() for t in defined} | {t.lower() for t in vocabulary}
    return list(dict.fromkeys(t for t in _ANGLE_TOKEN.findall(prompt) if t.lower() not in have))


def _warn(message: str) -> None:
    warnings.warn(message, DiffsteerWarning, stacklevel=4)


def warn_about_prompts(call: "GenerationCall") -> None:
    """Warn about each prompt of ``call`` that the call will not read as its user probably meant."""
    request = call.request
    prompts = [("prompt", p) for p in dict.fromkeys(request.prompts)]
    prompts += [("negative_prompt", p) for p in dict.fromkeys(request.negative_prompts or [])]
    # A plugin that encodes prompts itself (prompt weighting) reads weights and long prompts.
    encodes = bool(call.hook.diffsteer_encode_prompt.get_hookimpls())
    tokenizer = call.text.tokenizer
    base_vocab = tokenizer.get_vocab()
    closed = closed_vocabulary(tokenizer)
    limit = call.text.max_length
    for label, prompt in prompts:
        if not encodes:
            length = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if length > limit:
                _warn(
                    f"{label} is {length} tokens long and the text encoder reads {limit}: the end is cut off "
                    f"(the {WEIGHTING_PLUGIN!r} plugin encodes long prompts whole)"
                )
            fragments = weighting_fragments(prompt)
            if fragments:
                _warn(
                    f"{label} has weighting syntax {', '.join(map(repr, fragments))}, which is read as plain text "
                    f"without the {WEIGHTING_PLUGIN!r} plugin (--plugin {WEIGHTING_PLUGIN})"
                )
        missing = undefined_tokens(prompt, call.tokens.names, base_vocab)
        if missing:
            _warn(
                f"{label} has {', '.join(missing)}, which no plugin defines: read as plain text (load an "
                "embedding with the 'textual-inversion' plugin)"
            )
        if closed is not None:
            words = unknown_words(prompt, closed)
            if words:
                _warn(
                    f"{label}: this model was not trained on {', '.join(map(repr, words))} and ignores "
                    f"{'it' if len(words) == 1 else 'them'} (its words: {', '.join(sorted(closed))})"
                )
