"""Parity with compel 2.5.1 (the test-only oracle) on the tiny model's own tokenizer and text encoder.

compel runs on exactly the objects the pipeline holds (``tiny_pipe.tokenizer``, ``tiny_pipe.text_encoder``), with
``truncate_long_prompts=False`` for the long prompts, and pads positive/negative with
``pad_conditioning_tensors_to_same_length``. Tolerance: max |Δ| ≤ 1e-5 in fp32 (the math is the same; the only
differences are batching of the encoder rows).

transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``). compel's default path (last hidden state) does not
need it; its "clip skip" path reads ``text_encoder.text_model.final_layer_norm``, so that test hands compel a thin
wrapper that exposes the flattened model under that name.
"""

from __future__ import annotations

import pytest
import torch

from diffsteer import Plugin, hookimpl
from diffsteer.testing import max_abs_diff
from diffsteer_prompt_weighting import PromptWeighting, WeightedPromptEncoder

compel = pytest.importorskip("compel")

TOLERANCE = 1e-5

SENTENCE = "a red circle and a blue square on a white background."
#: 9 sentences of 11 tokens: 99 tokens, split after the 6th sentence (compel cuts at the last "." that fits).
LONG_SENTENCES = " ".join([SENTENCE] * 9)
#: no sentence ends: compel falls back to the last phrase end (",") ...
LONG_PHRASES = ", ".join(["a red circle and a blue square on the left"] * 9)
#: ... or to the last word end
LONG_WORDS = " ".join(["a green triangle on a black background"] * 14)
#: a down-weighted group (masked out in compel's < 1 path) that straddles the chunk boundary
LONG_DOWN_ACROSS = "a red circle (" + " ".join(["and a blue square on the left"] * 12) + ")0.6 on a white background"
LONG_UP = ("a red circle and a blue square on the left " * 8) + ("(a green triangle on a black background)1.3 " * 5)

CASES = {
    "plain": "a red circle on a white background",
    "empty": "",
    "plus": "a red++ circle and a blue square",
    "minus": "a red circle and a blue-- square",
    "number up": "a (red circle)1.4 on a white background",
    "number down": "a (red circle)0.5 on a white background",
    "zero": "a (red)0 circle",
    "quoted": '"a red circle"1.3 on a white background',
    "nested": "a (red (large circle)1.2)++ on a-- white- background",
    "several downweighted": "a red-- circle and a (blue square)0.3 on a white- background",
    "commas": "(a red, circle)1.2, a blue square,on a black background",
    "blend": '("a red circle", "a blue square").blend(0.7, 0.3)',
    "blend no_normalize": '("a red++ circle", "a blue square").blend(0.5, 0.25, no_normalize)',
    "and": '("a red circle", "a blue square").and()',
    "and weighted": '("a red++ circle", "a blue square").and(1.0, 0.5)',
    "long sentences": LONG_SENTENCES,
    "long phrases": LONG_PHRASES,
    "long words": LONG_WORDS,
    "long downweighted across chunks": LONG_DOWN_ACROSS,
    "long upweighted": LONG_UP,
    "long blend": f'("{LONG_SENTENCES}", "a blue square").blend(0.4, 0.6)',
    "long and": f'("{LONG_UP}", "a blue-- square").and(0.8, 1.2)',
}


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    return compel.Compel(tiny_pipe.tokenizer, tiny_pipe.text_encoder, truncate_long_prompts=False)


@pytest.fixture(scope="module")
def ours(tiny_pipe):
    return WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, syntax="compel")


@pytest.mark.parametrize("prompt", list(CASES.values()), ids=list(CASES))
def test_embeddings_equal_compel(reference, ours, prompt):
    with torch.no_grad():
        expected = reference(prompt)
    got = ours.encode([prompt])
    assert got.shape == expected.shape
    diff = max_abs_diff(got, expected)
    print(f"{prompt[:50]!r}: {tuple(got.shape)} max|Δ| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_long_prompts_really_are_long(ours):
    # the long cases must exercise chunking, each split rule and the downweight mask across a boundary
    for name in ("long sentences", "long phrases", "long words", "long downweighted across chunks", "long upweighted"):
        assert ours.plan(CASES[name]).chunks >= 2, name
    assert ours.plan(CASES["long and"]).chunks == 3


def test_positive_and_negative_padded_like_compel(reference, ours):
    texts = [LONG_UP, "a blue-- square", ""]
    with torch.no_grad():
        expected = torch.cat(reference.pad_conditioning_tensors_to_same_length([reference(t) for t in texts]))
    got = ours.encode(texts)
    assert got.shape == expected.shape == (3, 2 * 77, 32)
    diff = max_abs_diff(got, expected)
    print(f"padded batch max|Δ| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_truncated_like_compel(tiny_pipe):
    reference = compel.Compel(tiny_pipe.tokenizer, tiny_pipe.text_encoder, truncate_long_prompts=True)
    ours = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, truncate_long_prompts=True)
    for prompt in (LONG_UP, "a red++ circle " + LONG_WORDS, CASES["and weighted"]):
        with torch.no_grad():
            expected = reference(prompt)
        got = ours.encode([prompt])
        assert got.shape == expected.shape
        assert max_abs_diff(got, expected) <= TOLERANCE
    assert ours.plan(LONG_UP).truncated > 0


class _CompelView(torch.nn.Module):
    """The flattened transformers-5 CLIPTextModel under the ``.text_model`` name compel 2.5.1 reads."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @property
    def text_model(self):
        return self.encoder

    @property
    def device(self):
        return self.encoder.device

    @property
    def dtype(self):
        return self.encoder.dtype

    def forward(self, *args, **kwargs):
        return self.encoder(*args, **kwargs)


def test_clip_skip_equals_compel_penultimate(tiny_pipe):
    reference = compel.Compel(
        tiny_pipe.tokenizer, _CompelView(tiny_pipe.text_encoder), truncate_long_prompts=False,
        returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
    )
    ours = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, clip_skip=1)
    for prompt in (CASES["nested"], LONG_DOWN_ACROSS):
        with torch.no_grad():
            expected = reference(prompt)
        assert max_abs_diff(ours.encode([prompt]), expected) <= TOLERANCE


class _Capture(Plugin):
    """Records the text embeddings of each branch as the main UNet pass receives them."""

    name = "capture"

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        if inputs.pass_name == "main" and step.index == 0:
            for name in inputs.layout.names:
                self.seen[name] = inputs.encoder_hidden_states[inputs.layout.rows(name)].clone()


def test_pipeline_call_equals_compel(tiny_pipe, reference):
    """The whole path: a long weighted prompt and a short negative, as the UNet receives them."""
    seen = {}
    tiny_pipe(LONG_UP, negative_prompt="a blue-- square", num_inference_steps=1, seed=0, output_type="latent",
              plugins=[PromptWeighting(), _Capture(seen)])
    with torch.no_grad():
        pos, neg = reference.pad_conditioning_tensors_to_same_length(
            [reference(LONG_UP), reference("a blue-- square")]
        )
    assert seen["cond"].shape == seen["uncond"].shape == (1, 154, 32)
    diffs = max_abs_diff(seen["cond"], pos), max_abs_diff(seen["uncond"], neg)
    print(f"pipeline: cond max|Δ| = {diffs[0]:.2e}, uncond max|Δ| = {diffs[1]:.2e}")
    assert max(diffs) <= TOLERANCE


@pytest.mark.parametrize("syntax", ["compel", "a1111"])
def test_plain_prompts_are_unchanged(tiny_pipe, syntax):
    """Without weights or long prompts the plugin gives the core's embeddings bit for bit."""
    kw = dict(num_inference_steps=2, seed=0, output_type="latent", negative_prompt="a green square")
    prompts = ["a red circle on a white background", "a blue triangle"]
    plain = tiny_pipe(prompts, **kw).images
    weighted = tiny_pipe(prompts, plugins=[PromptWeighting(syntax=syntax)], **kw).images
    assert torch.equal(plain, weighted)
