"""textual-inversion with other plugins in one call.

* sega: a learned token in the prompt plus a SEGA concept, each keeping its effect (shapes model), and a SEGA
  concept that is itself the learned token (its branch reads the call's tokens).
* prompt-weighting: it owns prompt encoding (the exclusive encode_prompt hook); textual-inversion only adds tokens
  to the call's vocabulary, so weighted prompts may contain the token, in either plugin order.
"""

from __future__ import annotations

import pytest
import torch

from diffsteer.shapes import dominant_colour
from diffsteer.testing import branch_recorder
from diffsteer_prompt_weighting import PromptWeighting
from diffsteer_sega import Sega
from diffsteer_textual_inversion import TextualInversion
from diamonds import diamond_rate

N, STEPS = 16, 20



def branches(pipe, prompt, plugins):
    seen: dict = {}
    pipe(prompt, num_inference_steps=1, seed=0, output_type="latent", plugins=[*plugins, branch_recorder(seen)])
    return seen


def red_fraction(images):
    return sum(dominant_colour(im) == "red" for im in images) / len(images)


def test_learned_token_and_sega_concept_each_keep_their_effect(shapes_pipe):
    """Colour left open: the token decides the form, SEGA "+red" the colour.

    Measured (16 images, 20 steps, seed 0): diamond rate 0.0 without the token, 0.875 with it, 0.625 with it and
    SEGA; red 0.0 with the token alone (it comes out yellow, 16/16: the vector carries a colour), 1.0 with SEGA.
    SEGA edits the top 30 % of the latent (threshold 0.7): at its usual 0.9 red reached only 0.125 against the
    token's yellow. Thresholds leave ~0.35-0.5 of room below those.
    """
    prompt = ["a <diamond> on a black background"] * N
    ti = TextualInversion(embeddings=["diamond"])
    red = Sega(concepts=[dict(prompt="red", guidance_scale=5.0, warmup_steps=2, threshold=0.7)])
    base = shapes_pipe(["a shape on a black background"] * N, num_inference_steps=STEPS, seed=0).images
    alone = shapes_pipe(prompt, num_inference_steps=STEPS, seed=0, plugins=[ti]).images
    both = shapes_pipe(prompt, num_inference_steps=STEPS, seed=0, plugins=[ti, red]).images
    figures = {name: (diamond_rate(ims), red_fraction(ims)) for name, ims in
               (("no plugins ('a shape')", base), ("textual-inversion", alone), ("textual-inversion + sega +red", both))}
    print("\n" + "\n".join(f"{k}: diamond {d:.3f}, red {r:.3f}" for k, (d, r) in figures.items()))
    (d_base, _), (d_alone, r_alone), (d_both, r_both) = figures.values()
    assert d_alone >= d_base + 0.25, "the token draws diamonds"
    assert r_both >= r_alone + 0.3 and r_both >= 0.5, "SEGA's +red still works beside the token"
    assert d_both >= d_base + 0.25, "the token still draws diamonds under SEGA"


def test_sega_concept_may_be_the_learned_token(tiny_pipe):
    v = torch.randn(2, tiny_pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ti = TextualInversion(tensors={"<x>": v})
    seen = branches(tiny_pipe, "a square", [Sega(concepts=[dict(prompt="<x>", warmup_steps=0)]), ti])
    assert torch.equal(seen["sega:0"], branches(tiny_pipe, "<x>", [ti])["cond"])
    assert not torch.allclose(seen["sega:0"], branches(tiny_pipe, "<x>", [])["cond"])


@pytest.mark.parametrize("order", ["textual-inversion first", "prompt-weighting first"])
def test_weighted_prompts_may_contain_the_token(tiny_pipe, order):
    v = torch.randn(1, tiny_pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ti = TextualInversion(tensors={"<x>": v})

    def with_pw(prompt, **settings):
        pw = PromptWeighting(**settings)
        return branches(tiny_pipe, prompt, [ti, pw] if order == "textual-inversion first" else [pw, ti])["cond"]

    plain = branches(tiny_pipe, "a red <x> circle", [ti])["cond"]
    # Unweighted, prompt weighting encodes as the core does: the same embeddings, token included.
    assert torch.allclose(with_pw("a red <x> circle"), plain, atol=1e-6)
    # A1111 "(<x>:1.5)", no mean renormalisation: exactly the token's position scaled by 1.5.
    ids = tiny_pipe.tokenizer("a red", add_special_tokens=False)["input_ids"]
    position = 1 + len(ids)
    expected = plain.clone()
    expected[:, position] *= 1.5
    weighted = with_pw("a red (<x>:1.5) circle", syntax="a1111", normalize_emphasis=False)
    assert torch.allclose(weighted, expected, atol=1e-6)
    # and the token really is the learned vector there (without textual-inversion the prompt differs)
    pw_only = branches(tiny_pipe, "a red (<x>:1.5) circle", [PromptWeighting(syntax="a1111", normalize_emphasis=False)])
    assert not torch.allclose(pw_only["cond"], weighted, atol=1e-3)
