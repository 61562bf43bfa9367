"""The compel-syntax parser: weights, nesting, escapes and operators (the embeddings are checked against compel
itself in test_parity.py; here, the parse tree and where it deliberately differs)."""

from __future__ import annotations

import pytest

from diffsteer_prompt_weighting import Blend, PromptSyntaxError, parse_compel


def pairs(prompt):
    (part,) = parse_compel(prompt).parts
    return part.pairs()


def test_plus_and_minus():
    assert pairs("a red+ circle") == [("a", 1.0), ("red", 1.1), ("circle", 1.0)]
    assert pairs("a red+++ circle") == [("a", 1.0), ("red", 1.1 ** 3), ("circle", 1.0)]
    assert pairs("a red-- circle") == [("a", 1.0), ("red", 0.9 ** 2), ("circle", 1.0)]
    assert pairs("a well-known c++ compiler") == [("a well-known", 1.0), ("c", 1.1 ** 2), ("compiler", 1.0)]


def test_groups_and_nesting_multiply():
    assert pairs("a (red circle)1.5 on") == [("a", 1.0), ("red circle", 1.5), ("on", 1.0)]
    assert pairs("(a (red)2 b)0.5") == [("a", 0.5), ("red", 1.0), ("b", 0.5)]
    assert pairs("((red)++)1.1") == [("red", 1.1 * 1.1 ** 2)]
    assert pairs('"red circle"0.7 x') == [("red circle", 0.7), ("x", 1.0)]
    assert pairs("(red circle) x") == [("red circle x", 1.0)]  # parentheses alone weigh nothing


def test_sentence_punctuation_after_weights():
    assert pairs("a red++. a blue square") == [("a", 1.0), ("red", 1.1 ** 2), (". a blue square", 1.0)]
    assert pairs("(a circle)1.2. next") == [("a circle", 1.2), (". next", 1.0)]


def test_escapes_are_literal():
    assert pairs(r"\(red\) c\+\+") == [("(red) c++", 1.0)]
    assert pairs('a 5" square') == [('a 5" square', 1.0)]


def test_blend_and_conjunction():
    tree = parse_compel('("a red circle", "a blue++ square").blend(0.7, 0.3)')
    (blend,) = tree.parts
    assert isinstance(blend, Blend) and blend.weights == (0.7, 0.3) and blend.normalize
    assert blend.prompts[1].pairs() == [("a", 1.0), ("blue", 1.1 ** 2), ("square", 1.0)]
    assert not parse_compel('("a", "b").blend(1, 2, no_normalize)').parts[0].normalize
    tree = parse_compel('("a red circle", (a blue square)).and(1, 0.5)')
    assert [p.pairs() for p in tree.parts] == [[("a red circle", 1.0)], [("a blue square", 1.0)]]
    assert tree.weights == (1.0, 0.5)
    assert parse_compel('("a", "b").and()').weights == (1.0, 1.0)


def test_groups_inside_words_are_groups():
    # compel keeps "foo(bar)" as literal text with its parentheses; here "(" always opens a group
    assert pairs("a circle(red)1.5") == [("a circle", 1.0), ("red", 1.5)]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("(red", "unbalanced '('"),
        ("red)", "unbalanced ')'"),
        ("(red)1.2.3", "bad weight '1.2.3'"),
        ("(red)2x", "bad weight '2x'"),
        ("(red)-1", "negative weights"),
        ('("a", "b").blend()x', "must be the whole prompt"),
        ('("a", "b").blend(1, -1)', "sum to 0"),
        ('("a", ).and()', "empty prompt in .and() list"),
        ("a (red).blend(1) circle", ".blend() must apply to the whole prompt"),
        ("red.attend(1.2)", ".attend() is not supported"),
        ("withLora(x, 0.5) a red circle", "LoRA"),
    ],
)
def test_errors(prompt, message):
    with pytest.raises(PromptSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_compel(prompt)
