"""The AUTOMATIC1111 (stable-diffusion-webui) attention syntax, parsed by hand with A1111's semantics.

==================  ==========================================================================================
``(word)``          weight × 1.1
``((word))``        × 1.1² (each pair multiplies)
``[word]``          weight ÷ 1.1
``(word:1.3)``      weight × 1.3 (replaces the 1.1 of that pair); ``(a (b) c:0.5)`` scales everything inside
``\\(`` ``\\)``       literal brackets; also ``\\[``, ``\\]``, ``\\:``, ``\\\\``
``BREAK``           end the current 75-token chunk here and start a new one
==================  ==========================================================================================

Weights multiply in the order brackets close, as in A1111, so ``((house:1.3))`` is 1.3 · 1.1 · 1.1.
Stricter than A1111, which silently repairs these: an unbalanced bracket, a ``:`` weight that is not a
number (write a literal colon inside parentheses as ``\\:``) or a negative weight is an error naming the
position. A1111's prompt editing ``[a:b:0.5]`` and alternation ``[a|b]`` change the prompt per step, which
an embedding cannot do: they are refused.
"""

from __future__ import annotations

import math
import re

from .syntax import Break, Conjunction, Fragment, Prompt, PromptSyntaxError

ROUND = 1.1
SQUARE = 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT = re.compile(r"\+?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_a1111(prompt: str) -> Conjunction:
    """Parse an A1111-syntax prompt; raises :class:`PromptSyntaxError` naming the position of a mistake.

    >>> parse_a1111("an (important) word").parts[0].pairs()
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    s = prompt

    def error(message: str, position: int) -> PromptSyntaxError:
        return PromptSyntaxError(message, s, position, "a1111")

    res: list[list] = []  # [text, weight, start] or [None, None, start] for BREAK
    stack: list[tuple[str, int, int]] = []  # (bracket, index into res where it opened, position)
    buf: list[str] = []
    where: list[int] = []  # the prompt position of each character of buf

    def flush() -> None:
        if not buf:
            return
        text, cut = "".join(buf), 0
        for m in [*_BREAK.finditer(text), None]:
            part = text[cut:m.start() if m else len(text)]
            if part:
                res.append([part, 1.0, where[cut]])
            if m is None:
                break
            if stack:
                word = m.start() + len(m.group(0)) - len(m.group(0).lstrip())
                raise error("BREAK cannot be inside brackets", where[word])
            res.append([None, None, where[m.start()]])
            cut = m.end()
        buf.clear()
        where.clear()

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[0] is not None:
                item[1] *= factor

    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            buf.append(s[i + 1] if i + 1 < len(s) else "\\")
            where.append(i)
            i += 2
            continue
        if c in "([":
            flush()
            stack.append((c, len(res), i))
            i += 1
            continue
        if c in ")]":
            flush()
            want = "(" if c == ")" else "["
            if not stack:
                raise error(f"unbalanced '{c}': no '{want}' opens it", i)
            if stack[-1][0] != want:
                raise error(f"'{c}' closes the '{stack[-1][0]}' opened at character {stack[-1][2] + 1}", i)
            _, start, _ = stack.pop()
            multiply(start, ROUND if c == ")" else SQUARE)
            i += 1
            continue
        if c == ":" and stack:
            if stack[-1][0] == "[":
                raise error("prompt editing [from:to:when] is not supported (it changes the prompt per step)", i)
            close = s.find(")", i)
            if close < 0:
                raise error("unbalanced '(': no ')' closes it", stack[-1][2])
            token = s[i + 1:close].strip()
            at = i + 1 + (len(s[i + 1:close]) - len(s[i + 1:close].lstrip()))
            if not token:
                raise error("missing weight after ':' (write (text:1.3), or \\: for a literal colon)", i)
            if token.startswith("-") and _WEIGHT.fullmatch(token[1:]):
                raise error(f"negative weight {token!r}: weights must be >= 0", at)
            if not _WEIGHT.fullmatch(token) or not math.isfinite(float(token)):
                raise error(f"bad weight {token!r}: write (text:1.3), or \\: for a literal colon", at)
            flush()
            _, start, _ = stack.pop()
            multiply(start, float(token))
            i = close + 1
            continue
        if c == "|" and stack and stack[-1][0] == "[":
            raise error("alternation [a|b] is not supported (it changes the prompt per step)", i)
        buf.append(c)
        where.append(i)
        i += 1
    flush()
    if stack:
        bracket, _, position = stack[-1]
        raise error(f"unbalanced '{bracket}': no '{')' if bracket == '(' else ']'}' closes it", position)

    fragments: list = []
    for text, weight, start in res:
        if text is None:
            fragments.append(Break(start))
        elif fragments and isinstance(fragments[-1], Fragment) and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight, fragments[-1].start)
        else:
            fragments.append(Fragment(text, weight, start))
    return Conjunction((Prompt(tuple(fragments) or (Fragment("", 1.0, 0),)),), (1.0,))
