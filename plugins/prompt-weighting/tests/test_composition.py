"""prompt-weighting with a plugin that adds a guidance branch through ``call.encode_per_image``: the branch text
is weighted too, and every branch of the UNet batch has the same token count, long prompts included."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer_prompt_weighting import PromptWeighting, WeightedPromptEncoder

LONG = " ".join(["a red circle and a blue square on a white background."] * 9)  # 2 chunks
LONG_BRANCH = " ".join(["a green++ triangle on the left"] * 14)  # 2 chunks


class Concept(Plugin):
    """A SEGA-like guidance term toward a concept text, in its own branch of the batched UNet call."""

    name = "concept"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str
        scale: float = 2.0

    def __init__(self, seen=None, **settings):
        super().__init__(**settings)
        self.seen = seen if seen is not None else {}

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        embeddings = call.encode_per_image([self.settings.text] * len(call.request.prompts))
        branches.add("concept", embeddings, owner=self.name)
        self.seen.update({name: branches[name].embeddings.clone() for name in branches.names})

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        base = predictions["uncond"] if "uncond" in predictions else predictions["cond"]
        return self.settings.scale * (predictions["concept"] - base)


def run(pipe, prompt, plugins, **kw):
    args = dict(num_inference_steps=2, seed=0, output_type="latent")
    args.update(kw)
    return pipe(prompt, plugins=plugins, **args).images


@pytest.mark.parametrize("order", ["weighting first", "concept first"])
def test_branch_text_is_weighted_and_padded_to_the_long_prompt(tiny_pipe, order):
    seen: dict = {}
    concept = Concept(seen, text="a green++ triangle")
    weighting = PromptWeighting()
    plugins = [weighting, concept] if order == "weighting first" else [concept, weighting]
    latents = run(tiny_pipe, LONG, plugins, num_images_per_prompt=2)
    assert torch.isfinite(latents).all()
    assert {name: tuple(t.shape) for name, t in seen.items()} == {
        "uncond": (2, 154, 32), "cond": (2, 154, 32), "concept": (2, 154, 32)
    }
    encoder = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    expected = encoder.encode(["a green++ triangle"], chunks=2)
    assert torch.equal(seen["concept"], expected.repeat(2, 1, 1))  # weighted, then padded with empty chunks
    unweighted = encoder.encode(["a green triangle"], chunks=2)
    assert not torch.allclose(seen["concept"][:1], unweighted)  # the ++ did something
    assert torch.equal(seen["cond"][0], encoder.encode([LONG])[0])


def test_weighting_changes_the_branch_effect(tiny_pipe):
    a = run(tiny_pipe, "a red circle", [PromptWeighting(), Concept(text="a (green triangle)1.5")])
    b = run(tiny_pipe, "a red circle", [PromptWeighting(), Concept(text="a green triangle")])
    c = run(tiny_pipe, "a red circle", [Concept(text="a green triangle")])
    assert not torch.allclose(a, b)
    assert torch.equal(b, c)  # unweighted text: the plugin is exactly the core encoder


def test_long_branch_text_needs_min_chunks(tiny_pipe):
    with pytest.raises(PluginError, match=r"plugin 'prompt-weighting': .* needs 2 chunks .* raise min_chunks to 2"):
        run(tiny_pipe, "a red circle", [PromptWeighting(), Concept(text=LONG_BRANCH)])
    seen: dict = {}
    run(tiny_pipe, "a red circle", [PromptWeighting(min_chunks=2), Concept(seen, text=LONG_BRANCH)])
    assert all(t.shape[1] == 154 for t in seen.values())


def test_several_prompts_with_different_lengths(tiny_pipe):
    seen: dict = {}
    prompts = [LONG, "a (blue square)1.2"]
    run(tiny_pipe, prompts, [PromptWeighting(), Concept(seen, text="a yellow-- circle")],
        negative_prompt=["a green triangle", LONG_BRANCH])
    assert {tuple(t.shape) for t in seen.values()} == {(2, 154, 32)}


def test_without_guidance_the_negative_is_not_counted(tiny_pipe):
    seen: dict = {}
    run(tiny_pipe, "a red circle", [PromptWeighting(), Concept(seen, text="a green triangle")], guidance_scale=1.0,
        negative_prompt=LONG)
    assert set(seen) == {"cond", "concept"} and seen["cond"].shape[1] == 77
