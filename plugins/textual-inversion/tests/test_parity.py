"""Parity with diffusers 0.42.1's ``load_textual_inversion`` on the same tiny random SD folder (fp32): the same
prompt embeddings (|Δ| ≤ 1e-6) and the same image (≤ 1e-4), for every file layout and a multi-vector token; and a
diffsteer-trained embedding loads in diffusers to the same vectors and prompt embeddings (artifact parity)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsteer.pipeline import Pipeline
from diffsteer.testing import branch_recorder, diffusers_pipeline, max_abs_diff
from diffsteer_textual_inversion import TextualInversion, read_embedding
from diffsteer_textual_inversion.train import train_embedding

EMBED_TOL = 1e-6
IMAGE_TOL = 1e-4
PROMPT = "a red <x> circle and a <x> square"
STEPS = 4



def write(kind: str, folder, vectors: torch.Tensor):
    """The embedding in one of the four layouts; returns (file, what to pass diffusers as token=)."""
    if kind == "diffusers-safetensors":
        save_file({"<x>": vectors}, folder / "learned_embeds.safetensors")
        return folder / "learned_embeds.safetensors", None
    if kind == "diffusers-bin":
        torch.save({"<x>": vectors}, folder / "learned_embeds.bin")
        return folder / "learned_embeds.bin", None
    if kind == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "<x>", "step": 100,
                    "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"}, folder / "x.pt")
        return folder / "x.pt", None
    # A1111 .safetensors: {"emb_params": ...}; the token is the file name (diffusers must be told it)
    save_file({"emb_params": vectors}, folder / "<x>.safetensors")
    return folder / "<x>.safetensors", "<x>"


KINDS = ["diffusers-safetensors", "diffusers-bin", "a1111-pt", "a1111-safetensors"]


@pytest.mark.parametrize("kind, vectors", [(k, 1) for k in KINDS] + [("diffusers-safetensors", 3), ("a1111-pt", 2)])
def test_embeddings_and_image_match_diffusers(tiny_sd1, tmp_path, kind, vectors):
    ours = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    ref = diffusers_pipeline(tiny_sd1, scheduler="DDIMScheduler")
    hidden = ours.text_encoder.config.hidden_size
    v = torch.randn(vectors, hidden, generator=torch.Generator().manual_seed(vectors)) * 0.5
    file, token = write(kind, tmp_path, v)
    if file.suffix == ".safetensors":
        ref.load_textual_inversion(str(file), token=token)
    else:
        ref.load_textual_inversion(str(file.parent), weight_name=file.name, token=token, use_safetensors=False)

    seen: dict = {}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    got = ours(PROMPT, num_inference_steps=STEPS, latents=latents, output_type="np",
               plugins=[TextualInversion(embeddings=[file]), branch_recorder(seen)]).images
    with torch.no_grad():
        ref_embeds, _ = ref.encode_prompt(PROMPT, "cpu", 1, False)
    want = ref(PROMPT, num_inference_steps=STEPS, latents=latents.clone(), output_type="np").images

    d_embed = max_abs_diff(seen["cond"], ref_embeds)
    d_image = max_abs_diff(got, want)
    print(f"\n{kind} x{vectors}: prompt embeddings max|Δ| {d_embed:.2e}, image max|Δ| {d_image:.2e}")
    assert d_embed <= EMBED_TOL
    assert d_image <= IMAGE_TOL
    # the token changed the embeddings (the comparison is not between two plain prompts)
    with torch.no_grad():
        plain, _ = ref.encode_prompt("a red circle and a square", "cpu", 1, False)
    assert max_abs_diff(ref_embeds, plain) > 1e-3


def test_diffsteer_trained_embedding_loads_in_diffusers(tiny_sd1, tmp_path):
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green", "yellow")]
    captions = ["a <t> circle"] * 4
    path, result, _ = train_embedding(tiny_sd1, images, captions, tmp_path / "run", token="<t>", init_token="red",
                                      num_vectors=2, config=dict(steps=2, batch_size=2, lr=1e-2))
    token, learned = read_embedding(path)
    assert token == "<t>" and learned.shape == (2, 32)

    ref = diffusers_pipeline(tiny_sd1)
    ref.load_textual_inversion(str(path.parent))  # finds learned_embeds.safetensors as diffusers names it
    ids = ref.tokenizer.convert_tokens_to_ids(["<t>", "<t>_1"])
    loaded = ref.text_encoder.get_input_embeddings().weight[ids]
    assert max_abs_diff(loaded, learned) == 0.0

    ours = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    seen: dict = {}
    ours("a <t> square", num_inference_steps=1, seed=0, output_type="latent",
         plugins=[TextualInversion(embeddings=[path]), branch_recorder(seen)])
    with torch.no_grad():
        ref_embeds, _ = ref.encode_prompt("a <t> square", "cpu", 1, False)
    d = max_abs_diff(seen["cond"], ref_embeds)
    print(f"\ntrained embedding in diffusers: prompt embeddings max|Δ| {d:.2e}")
    assert d <= EMBED_TOL
