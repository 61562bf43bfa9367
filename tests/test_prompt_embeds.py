"""``pipe(prompt_embeds=..., negative_prompt_embeds=...)``: diffusers' semantics and parity on the tiny random models,
a compel round trip, the errors, and how plugins that encode, edit or add tokens behave with given embeddings."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.errors import RequestError
from diffsteer.pipeline import Pipeline
from diffsteer.testing import branch_recorder, diffusers_pipeline, max_abs_diff

TOL = 1e-4
STEPS = 3


def embeds(pipe: Pipeline, texts: list[str], seed: int) -> torch.Tensor:
    """Encoded texts moved off anything the text encoder makes (a stand-in for compel or a cache), fp32."""
    g = torch.Generator().manual_seed(seed)
    encoded = pipe.text.encode(texts)
    return encoded + 0.3 * torch.randn(encoded.shape, generator=g)


def run(pipe, **kw):
    args = dict(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).images


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    """(diffsteer pipeline, diffusers StableDiffusionPipeline) on one tiny folder, both with DDIM."""
    folder = request.getfixturevalue(f"tiny_{request.param}")
    return Pipeline.from_pretrained(folder, scheduler="ddim"), diffusers_pipeline(folder, scheduler="DDIMScheduler")


CASES = {
    # given prompts, CFG on: diffusers encodes "" for the unconditional rows, as the call does
    "prompt_embeds": dict(pos=2),
    "both embeds, 2 images per prompt": dict(pos=2, neg=True, num_images_per_prompt=2),
    "prompt_embeds + negative_prompt text": dict(pos=2, negative_prompt=["green", "a yellow square"]),
    "prompt text + negative_prompt_embeds": dict(prompt=["a red circle", "a blue square"], neg=True),
    "guidance off": dict(pos=1, guidance_scale=1.0),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_diffusers(pair, case):
    ours, ref = pair
    kw = dict(CASES[case])
    pos, neg = kw.pop("pos", None), kw.pop("neg", False)
    rows = pos or len(kw["prompt"])
    if pos:
        kw["prompt_embeds"] = embeds(ours, ["a red circle", "a blue square"][:pos], seed=1)
    if neg:
        kw["negative_prompt_embeds"] = embeds(ours, ["green", "yellow"][:rows], seed=2)
    kw.setdefault("guidance_scale", 7.5)
    mine = run(ours, height=24, width=32, **kw)
    theirs = run(ref, height=24, width=32, **kw)
    d = max_abs_diff(mine, theirs)
    # The embeddings must steer: the same call on the texts they were made from differs.
    texts = dict(prompt=["a red circle", "a blue square"][:rows]) if pos else {}
    plain = run(ours, height=24, width=32, **{**{k: v for k, v in kw.items() if not k.endswith("_embeds")}, **texts})
    effect = max_abs_diff(mine, plain)
    print(f"{case}: max|Δ| vs diffusers = {d:.2e} (embeddings vs text moved the latents by {effect:.2e})")
    assert mine.shape[0] == rows * kw.get("num_images_per_prompt", 1)
    assert d <= TOL and effect > 1e-3


def test_encoded_prompt_equals_the_prompt(tiny_pipe):
    texts, negative = ["a red circle", "a blue square"], ["green", "yellow"]
    from_text = run(tiny_pipe, prompt=texts, negative_prompt=negative, num_images_per_prompt=2)
    given = run(tiny_pipe, prompt_embeds=tiny_pipe.text.encode(texts),
                negative_prompt_embeds=tiny_pipe.text.encode(negative), num_images_per_prompt=2)
    assert torch.equal(from_text, given)


def test_dtype_device_and_metadata(tiny_pipe):
    e = tiny_pipe.text.encode(["a red circle"])
    out = tiny_pipe(prompt_embeds=e.double(), num_inference_steps=1, seed=0, output_type="latent")
    assert torch.equal(out.images, run(tiny_pipe, prompt_embeds=e, num_inference_steps=1,
                                       generator=torch.Generator().manual_seed(0)))
    p = out.parameters
    assert p["prompt"] is None and p["prompt_embeds"] == "<tensor 1x77x32 float64>"
    assert p["negative_prompt_embeds"] is None
    assert tiny_pipe("a", num_inference_steps=1, output_type="latent").parameters["prompt_embeds"] is None


def test_edit_embeddings_plugins_see_the_given_rows(tiny_pipe):
    """Plugins that edit branch embeddings (diffsteer_edit_embeddings) and add branches work as with text."""
    seen: dict = {}

    class Shift(Plugin):
        name = "shift"

        @hookimpl
        def diffsteer_edit_embeddings(self, call, branch, embeddings):
            seen[branch.name] = embeddings.clone()
            return embeddings + 0.5 if branch.name == "cond" else None

    e = embeds(tiny_pipe, ["a red circle"], seed=3)
    shifted = run(tiny_pipe, prompt_embeds=e, plugins=[Shift()])
    torch.testing.assert_close(seen["cond"], e.repeat(1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(seen["uncond"], tiny_pipe.text.encode([""]), rtol=0, atol=0)
    assert torch.equal(shifted, run(tiny_pipe, prompt_embeds=e + 0.5))
    recorded: dict = {}
    run(tiny_pipe, prompt_embeds=e, num_images_per_prompt=2, plugins=[branch_recorder(recorded)])
    assert torch.equal(recorded["cond"], e.repeat_interleave(2, dim=0))


def test_prompt_weighting_refuses_given_embeddings(tiny_pipe):
    pw = pytest.importorskip("diffsteer_prompt_weighting")
    e = tiny_pipe.text.encode(["a red circle"])
    for kw in (dict(prompt_embeds=e), dict(prompt="a red++ circle", negative_prompt_embeds=e)):
        with pytest.raises(PluginError, match=r"plugin 'prompt-weighting': encodes prompt text itself.*"
                                              r"pass the text as prompt= with this plugin"):
            run(tiny_pipe, plugins=[pw.PromptWeighting()], **kw)


def test_textual_inversion_tokens_reach_the_text_the_call_encodes(tiny_pipe):
    """Given embeddings pass through; the plugin's tokens still apply to the negative prompt the call encodes."""
    ti = pytest.importorskip("diffsteer_textual_inversion")
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    plugin = ti.TextualInversion(tensors={"<x>": vectors})
    with_text = run(tiny_pipe, prompt="a red circle", negative_prompt="a <x> square", plugins=[plugin])
    given = run(tiny_pipe, prompt_embeds=tiny_pipe.text.encode(["a red circle"]), negative_prompt="a <x> square",
                plugins=[plugin])
    assert torch.equal(given, with_text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = run(tiny_pipe, prompt_embeds=tiny_pipe.text.encode(["a red circle"]), negative_prompt="a <x> square")
    assert max_abs_diff(given, without) > 1e-3


def test_compel_round_trip(tiny_sd1):
    """Weighted long prompts encoded by compel, passed in, equal diffusers with the same tensors and the
    prompt-weighting plugin with the same text."""
    compel = pytest.importorskip("compel")
    pw = pytest.importorskip("diffsteer_prompt_weighting")
    ours = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    ref = diffusers_pipeline(tiny_sd1, scheduler="DDIMScheduler")
    prompt = "a (red circle)1.4 on a white-- background, " + " ".join(["a blue square on the left"] * 12)
    negative = "a green++ triangle"
    proc = compel.Compel(ours.tokenizer, ours.text_encoder, truncate_long_prompts=False)
    with torch.no_grad():
        c, n = proc.pad_conditioning_tensors_to_same_length([proc(prompt), proc(negative)])
    tokens = c.shape[1]
    assert c.shape == n.shape and tokens > 77  # a long prompt: several chunks, the negative padded to match
    given = run(ours, prompt_embeds=c, negative_prompt_embeds=n)
    d_ref = max_abs_diff(given, run(ref, prompt_embeds=c, negative_prompt_embeds=n))
    d_plugin = max_abs_diff(given, run(ours, prompt=prompt, negative_prompt=negative, plugins=[pw.PromptWeighting()]))
    print(f"compel embeddings: max|Δ| vs diffusers = {d_ref:.2e}, vs the prompt-weighting plugin = {d_plugin:.2e}")
    assert d_ref <= TOL and d_plugin <= TOL
    # A negative prompt the call encodes (77 tokens) cannot pair with 154-token embeddings: the error says why.
    with pytest.raises(RequestError, match=rf"prompt_embeds have \({tokens}, 32\).*negative prompt to \(77, 32\).*"
                                           r"pass both prompt_embeds and negative_prompt_embeds"):
        run(ours, prompt_embeds=c, negative_prompt=negative)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_errors_name_the_argument(tiny_pipe):
    e = tiny_pipe.text.encode(["a", "b"])
    bad = [
        (dict(prompt="a", prompt_embeds=e), r"^prompt and prompt_embeds were both given"),
        (dict(), r"^prompt must be a string .*, got None \(or pass prompt_embeds"),
        (dict(prompt_embeds=e, negative_prompt="x", negative_prompt_embeds=e),
         r"^negative_prompt and negative_prompt_embeds were both given"),
        (dict(prompt_embeds=e.numpy()), r"^prompt_embeds must be a torch\.Tensor shaped \(prompts, tokens, 32\), got ndarray"),
        (dict(prompt_embeds=e[0]), r"^prompt_embeds must be shaped \(prompts, tokens, 32\), got \(77, 32\)"),
        (dict(prompt_embeds=e[:, :0]), r"got \(2, 0, 32\)"),
        (dict(prompt_embeds=e.long()), r"^prompt_embeds must hold floats, got torch\.int64"),
        (dict(prompt_embeds=torch.zeros(2, 77, 16)), r"^prompt_embeds have hidden size 16 but this model's UNet attends "
                                                     r"to 32 \(cross_attention_dim\)"),
        (dict(prompt_embeds=e * float("nan")), r"^prompt_embeds hold NaN or inf"),
        (dict(prompt_embeds=e, negative_prompt_embeds=e[:1]),
         r"^negative_prompt_embeds are shaped \(1, 77, 32\) but prompt_embeds \(2, 77, 32\): they must have the same"),
        (dict(prompt="a", negative_prompt_embeds=e), r"^negative_prompt_embeds have 2 rows for 1 prompts"),
        (dict(prompt_embeds=e, negative_prompt=["x", "y", "z"]), r"^negative_prompt has 3 entries for 2 prompts"),
        (dict(prompt="a", negative_prompt_embeds=torch.zeros(1, 154, 32)),
         r"^negative_prompt_embeds have \(154, 32\) \(tokens, hidden\) per row but the call encoded the prompt to "
         r"\(77, 32\): pass both"),
    ]
    for kw, message in bad:
        with pytest.raises(RequestError, match=message):
            run(tiny_pipe, **kw)
