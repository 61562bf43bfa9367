"""The A1111 syntax: parser weights (checked against A1111's own documented examples), chunking with comma
backtracking and BREAK, and the "Original" emphasis arithmetic."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from diffsteer_prompt_weighting import Break, PromptSyntaxError, WeightedPromptEncoder, parse_a1111


def pairs(prompt):
    return parse_a1111(prompt).parts[0].pairs()


# Examples from the docstring of A1111's modules/prompt_parser.parse_prompt_attention (balanced where A1111's
# example relies on its silent repair of a missing ')': the missing pair closes at the end, which is the same).
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),
    ],
)
def test_a1111_documented_examples(prompt, expected):
    assert pairs(prompt) == expected


def test_nested_brackets_multiply():
    assert pairs("((red))") == [("red", 1.1 * 1.1)]
    assert pairs("(((red)))") == [("red", 1.1 * 1.1 * 1.1)]
    assert pairs("[red]") == [("red", 1 / 1.1)]
    assert pairs("[[red]]") == [("red", (1 / 1.1) * (1 / 1.1))]
    assert pairs("([red])") == [("red", pytest.approx(1.0))]
    # an explicit weight replaces the 1.1 of its own pair; enclosing pairs still multiply
    assert pairs("((red:1.5))") == [("red", 1.5 * 1.1)]
    assert pairs("a (red (circle) big:0.5) b") == [
        ("a ", 1.0), ("red ", 0.5), ("circle", 1.1 * 0.5), (" big", 0.5), (" b", 1.0)
    ]


def test_explicit_weights():
    assert pairs("(red:0.5)") == [("red", 0.5)]
    assert pairs("(red: 1.25 )") == [("red", 1.25)]
    assert pairs("(red:2)") == [("red", 2.0)]
    assert pairs("(red:.5)") == [("red", 0.5)]
    assert pairs("(red:0)") == [("red", 0.0)]
    assert pairs("(red circle:1.3) on a (white:0.9) background") == [
        ("red circle", 1.3), (" on a ", 1.0), ("white", 0.9), (" background", 1.0)
    ]


def test_escapes():
    assert pairs("\\(red\\) \\[blue\\]") == [("(red) [blue]", 1.0)]
    assert pairs("a \\\\ b") == [("a \\ b", 1.0)]
    assert pairs("(time\\: noon)") == [("time: noon", 1.1)]
    assert pairs("ratio 16:9") == [("ratio 16:9", 1.0)]  # a colon outside parentheses is text
    assert pairs("(a \\) b)") == [("a ) b", 1.1)]


def test_break_splits_chunks():
    tree = parse_a1111("a red circle BREAK a blue square")
    frags = tree.parts[0].fragments
    assert isinstance(frags[1], Break)
    assert tree.parts[0].pairs() == [("a red circle", 1.0), ("BREAK", -1.0), ("a blue square", 1.0)]
    assert pairs("aBREAKb BREAKfast") == [("aBREAKb BREAKfast", 1.0)]  # only the whole word


def test_empty_prompt():
    assert pairs("") == [("", 1.0)]


@pytest.mark.parametrize(
    "prompt, message, position",
    [
        ("a (red circle", "unbalanced '('", 2),
        ("a red) circle", "unbalanced ')'", 5),
        ("a [red circle", "unbalanced '['", 2),
        ("a (red] circle", "']' closes the '('", 6),
        ("a (red:abc) circle", "bad weight 'abc'", 7),
        ("a (red:1.2.3) circle", "bad weight '1.2.3'", 7),
        ("a (red:) circle", "missing weight", 6),
        ("a (red:-1) circle", "negative weight", 7),
        ("a [red:blue:0.5] circle", "prompt editing", 6),
        ("a [red|blue] circle", "alternation", 6),
        ("(a BREAK b)", "BREAK cannot be inside brackets", 3),
    ],
)
def test_syntax_errors_name_the_position(prompt, message, position):
    with pytest.raises(PromptSyntaxError, match=re.escape(message)) as info:
        parse_a1111(prompt)
    assert info.value.position == position
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 4 == position  # the caret sits under the offending character


# -- chunking -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def a1111(tiny_pipe):
    return WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, syntax="a1111")


def chunk_tokens(encoder, text):
    """The prompt tokens (no BOS/EOS/padding) of each chunk."""
    plan = encoder.plan(text)
    out = []
    for row in plan.parts[0].ids.tolist():
        end = row.index(encoder.eos, 1)
        out.append(row[1:end])
    return out


def test_short_prompt_is_one_chunk(a1111, tiny_pipe):
    ids = a1111.plan("a (red:1.5) circle").parts[0].ids
    core = tiny_pipe.text.token_ids(["a red circle"])
    assert torch.equal(ids, core)  # the same layout as the core's encoder: BOS, tokens, EOS, padding
    weights = a1111.plan("a (red:1.5) circle").parts[0].weights[0]
    assert weights[:5].tolist() == [1.0, 1.0, 1.5, 1.0, 1.0]


def test_long_prompt_chunks_at_75_tokens(a1111):
    words = " ".join(["red"] * 160)  # one token each, no commas
    chunks = chunk_tokens(a1111, words)
    assert [len(c) for c in chunks] == [75, 75, 10]
    assert a1111.plan(words).chunks == 3


def test_comma_backtracking(a1111):
    # 70 words, a comma, 10 words: the chunk fills at 75 with a comma 5 tokens back, so the 4 words after the
    # comma move to the next chunk (A1111's comma_padding_backtrack=20)
    text = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    chunks = chunk_tokens(a1111, text)
    assert [len(c) for c in chunks] == [71, 10]
    assert chunks[0][-1] == a1111.comma
    # a comma more than 20 tokens before the end does not move anything
    text = " ".join(["red"] * 50) + ", " + " ".join(["blue"] * 40)
    assert [len(c) for c in chunk_tokens(a1111, text)] == [75, 16]


def test_break_closes_the_chunk(a1111):
    assert [len(c) for c in chunk_tokens(a1111, "a red circle BREAK a blue square")] == [3, 3]
    assert a1111.plan("a red circle BREAK").chunks == 1  # nothing after the break: no empty chunk
    assert a1111.plan("BREAK a red circle").chunks == 2  # an empty first chunk, as A1111 makes


def test_truncation(tiny_pipe):
    enc = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, syntax="a1111", truncate_long_prompts=True)
    plan = enc.plan(" ".join(["red"] * 100))
    assert plan.chunks == 1 and plan.truncated == 25


# -- emphasis ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def biased_encoder(tiny_pipe):
    """The tiny text encoder with a final layer-norm bias, as trained encoders have: its hidden states then have
    a mean clearly away from 0 (a fresh LayerNorm's outputs have mean ~0 at every token)."""
    encoder = copy.deepcopy(tiny_pipe.text_encoder)
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(torch.linspace(-0.2, 0.6, norm.bias.numel()))
    return encoder


def test_original_emphasis_keeps_the_chunk_mean(tiny_pipe, biased_encoder):
    enc = WeightedPromptEncoder(tiny_pipe.tokenizer, biased_encoder, syntax="a1111")
    got = enc.encode(["a (red:1.5) [circle] on a white background"])[0]
    plain = enc.encode(["a red circle on a white background"])[0]
    assert abs(float(plain.mean())) > 0.1
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    expected = plain * w[:, None]
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.mean(), plain.mean(), atol=1e-6)


def test_emphasis_skips_the_rescale_when_the_mean_is_noise(a1111, tiny_pipe):
    # the fixture's random encoder has an unbiased final layer norm: mean ~1e-9, a ratio of noise
    plain = tiny_pipe.text.encode(["a red circle"])[0]
    assert abs(float(plain.mean())) < 1e-5
    got = a1111.encode(["a (red:2) circle"])[0]
    assert torch.allclose(got[2], 2 * plain[2], atol=1e-6) and torch.isfinite(got).all()


def test_no_norm_emphasis_only_multiplies(tiny_pipe):
    enc = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, syntax="a1111", normalize_emphasis=False)
    got = enc.encode(["a (red:2) circle"])[0]
    plain = tiny_pipe.text.encode(["a red circle"])[0]
    assert torch.allclose(got[2], 2 * plain[2], atol=1e-6)
    assert torch.equal(got[3:], plain[3:])


def test_long_a1111_prompt_chunks_encode_separately(a1111):
    text = " ".join(["a red circle and a blue square on the left"] * 10) + " BREAK a (green:1.2) triangle"
    z = a1111.encode([text])
    plan = a1111.plan(text)
    assert z.shape == (1, plan.chunks * 77, 32) and plan.chunks == 3
    # each chunk is an independent 77-token encoding: the last one equals encoding its text alone
    alone = a1111.encode(["a (green:1.2) triangle"])
    assert torch.allclose(z[:, 2 * 77:], alone, atol=1e-6)
