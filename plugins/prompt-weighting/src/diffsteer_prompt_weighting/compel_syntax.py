"""The compel prompt syntax, parsed by hand (compel's own parser is not used; its semantics are followed).

================================  ==========================================================================
``word+`` / ``word++``            weight 1.1 / 1.1² (each ``+`` multiplies by 1.1)
``word-`` / ``word--``            weight 0.9 / 0.9²
``(several words)1.3``            explicit weight for a group; ``(...)+``, ``(...)--`` work on groups too
``"quoted words"1.3``             a quoted group, weighted like a parenthesised one
``(a (b)1.5 c)0.8``               nesting multiplies: ``b`` gets 1.2
``("a", "b").blend(0.7, 0.3)``    weighted sum of the embeddings (``no_normalize`` as a last option)
``("a", "b").and()``              the parts side by side on the token axis (optional weights)
``\\(`` ``\\)`` ``\\"`` ``\\+``   literal characters
================================  ==========================================================================

Where this parser is stricter than compel (its grammar silently takes these as literal text):

* an unbalanced ``(`` / ``)`` or an unterminated ``"`` is an error naming the position;
* a weight after ``)`` or ``"`` must be a number, ``+``s or ``-``s: ``(red)1.2.3`` and ``(red)-0.5`` are errors;
* ``(`` always opens a group, also inside a word (compel keeps ``foo(bar)`` as literal text): escape it as ``\\(``;
* ``.swap()``, ``.attend()``, ``withLora()`` / ``useLora()`` are refused, and ``.blend()`` / ``.and()`` must be the
  whole prompt (as in compel).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

from .syntax import Blend, Conjunction, Fragment, Prompt, PromptSyntaxError

PLUS_BASE = 1.1
MINUS_BASE = 0.9

_WHITESPACE = " \t\r\n"
#: characters that end a word (besides whitespace)
_WORD_END = '()",'
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_SIGNED_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WHOLE_PROMPT_OPERATOR = re.compile(r"\.(blend|and|add)\(")
_UNSUPPORTED = {
    ".swap": "cross-attention control (.swap()) is not supported by prompt-weighting",
    ".attend": ".attend() is not supported: write (text)1.2 or text++ instead",
    "withLora": "LoRA loading (withLora()) is not supported in prompts",
    "useLora": "LoRA loading (useLora()) is not supported in prompts",
    ".blend": ".blend() must apply to the whole prompt, as in (\"a\", \"b\").blend(0.7, 0.3)",
    ".and": ".and() must apply to the whole prompt, as in (\"a\", \"b\").and()",
    ".add": ".add() must apply to the whole prompt, as in (\"a\", \"b\").add()",
}


@dataclass
class _Text:
    text: str
    start: int


@dataclass
class _Group:
    children: list
    weight: Optional[float]  # None: plain parentheses or quotes (no weight of their own)
    start: int


_Node = Union[_Text, _Group]


class _Parser:
    def __init__(self, prompt: str) -> None:
        self.s = prompt

    def error(self, message: str, position: int) -> PromptSyntaxError:
        return PromptSyntaxError(message, self.s, position, "compel")

    # -- whole-prompt operators -----------------------------------------------------------------------------------
    def parse(self) -> Conjunction:
        s = self.s
        first = len(s) - len(s.lstrip())
        if first < len(s) and s[first] == "(":
            close = self._matching(first)
            if close is not None:
                m = _WHOLE_PROMPT_OPERATOR.match(s, close + 1)
                if m:
                    return self._operator(first, close, m)
        nodes = self._sequence(0, len(s), None, 0)
        return Conjunction((self._prompt(nodes),), (1.0,))

    def _matching(self, open_at: int) -> Optional[int]:
        """Index of the ``)`` closing the ``(`` at ``open_at`` (quotes and escapes respected), or None."""
        s, depth, i, quoted = self.s, 0, open_at, False
        while i < len(s):
            c = s[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif not quoted and c == "(":
                depth += 1
            elif not quoted and c == ")":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        return None

    def _split_top_level(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of the comma-separated items of ``s[start:end]`` (commas inside quotes or parentheses kept)."""
        s, items, depth, quoted, i, item_start = self.s, [], 0, False, start, start
        while i < end:
            c = s[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif not quoted and c == "(":
                depth += 1
            elif not quoted and c == ")":
                depth -= 1
            elif not quoted and depth == 0 and c == ",":
                items.append((item_start, i))
                item_start = i + 1
            i += 1
        items.append((item_start, end))
        return items

    def _operator(self, open_at: int, close: int, m: re.Match) -> Conjunction:
        s, op = self.s, m.group(1)
        args_open = m.end() - 1
        args_close = self._matching(args_open)
        if args_close is None:
            raise self.error(f"unclosed '(' of .{op}(", args_open)
        if s[args_close + 1:].strip():
            rest = args_close + 1 + (len(s[args_close + 1:]) - len(s[args_close + 1:].lstrip()))
            raise self.error(f".{op}() must be the whole prompt; text follows it", rest)
        prompts = []
        for a, b in self._split_top_level(open_at + 1, close):
            if not s[a:b].strip():
                raise self.error(f"empty prompt in .{op}() list", a)
            prompts.append(self._prompt(self._sequence(a, b, None, a)))
        weights: list[float] = []
        normalize = True
        options = self._split_top_level(args_open + 1, args_close) if s[args_open + 1:args_close].strip() else []
        for k, (a, b) in enumerate(options):
            item = s[a:b].strip()
            at = a + (len(s[a:b]) - len(s[a:b].lstrip()))
            if op == "blend" and item == "no_normalize" and k == len(options) - 1:
                normalize = False
                continue
            if not _SIGNED_NUMBER.fullmatch(item):
                raise self.error(f"bad weight {item!r} in .{op}(): weights are numbers", at)
            value = float(item)
            if not math.isfinite(value):
                raise self.error(f"weight {item!r} in .{op}() is not finite", at)
            weights.append(value)
        if not weights:
            weights = [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise self.error(
                f".{op}() has {len(prompts)} prompts but {len(weights)} weights", args_open + 1
            )
        if op == "blend":
            if normalize and sum(weights) == 0:
                raise self.error(".blend() weights sum to 0 and cannot be normalised", args_open + 1)
            return Conjunction((Blend(tuple(prompts), tuple(weights), normalize),), (1.0,))
        return Conjunction(tuple(prompts), tuple(weights))

    # -- sequences ---------------------------------------------------------------------------------------------------
    def _sequence(self, i: int, end: int, closing: Optional[str], open_at: int) -> list:
        """Parse ``s[i:end]`` up to ``closing`` (``)`` or ``"``); returns the nodes (and sets ``self.pos``)."""
        s, nodes = self.s, []
        while True:
            while i < end and s[i] in _WHITESPACE:
                i += 1
            if i >= end:
                if closing == ")":
                    raise self.error("unbalanced '(': no ')' closes it", open_at)
                if closing == '"':
                    raise self.error("unterminated '\"': no closing quote", open_at)
                self.pos = i
                return nodes
            c = s[i]
            if c == closing:
                self.pos = i + 1
                return nodes
            if c == ")":
                raise self.error("unbalanced ')': no '(' opens it", i)
            if c in '("':
                children = self._sequence(i + 1, end, ")" if c == "(" else '"', i)
                weight, j, tail = self._weight_suffix(self.pos, end)
                nodes.append(_Group(children, weight, i))
                if tail is not None:
                    nodes.append(tail)
                i = j
                continue
            if c == ",":
                nodes.append(_Text(",", i))
                i += 1
                continue
            i = self._word(i, end, nodes, closing)

    def _word(self, i: int, end: int, nodes: list, closing: Optional[str]) -> int:
        """A run of text up to whitespace or ``( ) " ,``, with an optional ``+``/``-`` weight suffix."""
        s, start, chars = self.s, i, []  # (char, escaped)
        # A quote inside a word (a 5" square) is literal, unless it closes the quoted group the word is in.
        stops = '(),"' if closing == '"' else "(),"
        while i < end and s[i] not in _WHITESPACE and s[i] not in stops:
            if s[i] == "\\" and i + 1 < end:
                chars.append((s[i + 1], True))
                i += 2
            else:
                chars.append((s[i], False))
                i += 1
        raw = "".join(c for c, esc in chars if not esc)
        if i < end and s[i] == "(":
            for op, message in _UNSUPPORTED.items():
                if raw.endswith(op):
                    raise self.error(message, i - len(op))
        # trailing unescaped periods are their own text ("red++." is red++ then ".")
        trail = 0
        while trail < len(chars) and chars[len(chars) - 1 - trail] == (".", False):
            trail += 1
        body = chars[: len(chars) - trail]
        run = 0
        if body and body[-1][0] in "+-" and not body[-1][1]:
            sign = body[-1][0]
            while run < len(body) and body[len(body) - 1 - run] == (sign, False):
                run += 1
        if 0 < run < len(body):
            text = "".join(c for c, _ in body[: len(body) - run])
            weight = (PLUS_BASE if body[-1][0] == "+" else MINUS_BASE) ** run
            nodes.append(_Group([_Text(text, start)], weight, start))
        elif body:
            nodes.append(_Text("".join(c for c, _ in body), start))
        if trail:
            nodes.append(_Text("." * trail, i - trail))
        return i

    def _weight_suffix(self, j: int, end: int) -> tuple[Optional[float], int, Optional[_Text]]:
        """The weight written right after ``)`` or ``"``: ``+``s, ``-``s or a number."""
        s = self.s
        if j >= end:
            return None, j, None
        c = s[j]
        if c in "+-":
            run = len(s[j:end]) - len(s[j:end].lstrip(c))
            after = j + run
            if c == "-" and after < end and (s[after].isdigit() or s[after] == "."):
                raise self.error("negative weights are not allowed; lower a weight with (text)0.5 or (text)-", j)
            return (PLUS_BASE if c == "+" else MINUS_BASE) ** run, after, None
        if c.isdigit() or (c == "." and j + 1 < end and s[j + 1].isdigit()):
            k = j
            while k < end and s[k] not in _WHITESPACE and s[k] not in _WORD_END:
                k += 1
            token = s[j:k]
            if _NUMBER.fullmatch(token):
                return float(token), k, None
            stripped = token.rstrip(".")
            if stripped != token and _NUMBER.fullmatch(stripped):  # "(a circle)1.2." ends a sentence
                return float(stripped), k, _Text(token[len(stripped):], j + len(stripped))
            raise self.error(f"bad weight {token!r}: a weight after ')' is a number like 1.2, or +/- signs", j)
        for op, message in _UNSUPPORTED.items():
            if op.startswith(".") and s.startswith(op + "(", j):
                raise self.error(message, j)
        return None, j, None

    # -- flattening ----------------------------------------------------------------------------------------------------
    def _prompt(self, nodes: list) -> Prompt:
        flat: list[Fragment] = []
        self._flatten(nodes, 1.0, flat)
        fused: list[Fragment] = []
        for f in flat:
            if fused and fused[-1].weight == f.weight:
                fused[-1] = Fragment(fused[-1].text + " " + f.text, f.weight, fused[-1].start)
            else:
                fused.append(f)
        return Prompt(tuple(fused) or (Fragment("", 1.0, 0),))

    def _flatten(self, nodes: list, scale: float, out: list[Fragment]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                out.append(Fragment(node.text, 1.0 * scale, node.start))
            else:
                self._flatten(node.children, scale if node.weight is None else scale * node.weight, out)


def parse_compel(prompt: str) -> Conjunction:
    """Parse a compel-syntax prompt; raises :class:`PromptSyntaxError` naming the position of a mistake.

    >>> parse_compel("a red++ (large circle)0.8").parts[0].pairs()
    [('a', 1.0), ('red', 1.2100000000000002), ('large circle', 0.8)]
    """
    return _Parser(prompt).parse()
