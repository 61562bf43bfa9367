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


def colour_fraction(images, colour):
    return sum(dominant_colour(im) == colour for im in images) / len(images)


def test_learned_token_and_sega_concept_each_keep_their_effect(shapes_pipe):
    """Colour left open: the token decides the form, SEGA "+green" the colour.

    Measured (16 images, 20 steps, seed 0): diamond rate 0.0 without the token, 0.75 with it, 1.0 with it and
    SEGA; green 0.0 with the token alone (15 of 16 come out red, the model's colour for open prompts on white),
    1.0 with SEGA. SEGA edits the top 30 % of the latent (threshold 0.7). Thresholds leave ~0.35-0.5 of room.

    On the stage-6 model this test used a black background and "+red"; on stage 7 open prompts on black come out
    as a green frame along two borders or a small green blob (the token's diamond rate there is 0.06), so the
    test moved to white. "+blue" on white did not recolour the token's red diamonds (16 of 16 stayed red): noted
    in docs/textual-inversion.md, not tested.
    """
    prompt = ["a <diamond> on a white background"] * N
    ti = TextualInversion(embeddings=["diamond"])
    green = Sega(concepts=[dict(prompt="green", guidance_scale=5.0, warmup_steps=2, threshold=0.7)])
    base = shapes_pipe(["a shape on a white background"] * N, num_inference_steps=STEPS, seed=0).images
    alone = shapes_pipe(prompt, num_inference_steps=STEPS, seed=0, plugins=[ti]).images
    both = shapes_pipe(prompt, num_inference_steps=STEPS, seed=0, plugins=[ti, green]).images
    figures = {name: (diamond_rate(ims), colour_fraction(ims, "green")) for name, ims in
               (("no plugins ('a shape')", base), ("textual-inversion", alone), ("textual-inversion + sega +green", both))}
    print("\n" + "\n".join(f"{k}: diamond {d:.3f}, green {g:.3f}" for k, (d, g) in figures.items()))
    (d_base, _), (d_alone, g_alone), (d_both, g_both) = figures.values()
    assert d_alone >= d_base + 0.25, "the token draws diamonds"
    assert g_both >= g_alone + 0.3 and g_both >= 0.5, "SEGA's +green still works beside the token"
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
