"""Training mechanics on the shapes model (kept small for CI): the token's denoising loss falls, only the new rows
change (every other embedding row, the rest of the text encoder and the UNet stay bit-identical), the result is
the diffusers layout, resume ends where an uninterrupted run ends, the CLI runs, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from diffsteer import PluginError
from diffsteer.cli import main
from diffsteer.loading.pipeline_loader import load_pipeline_parts
from diffsteer.schedulers import make_scheduler
from diffsteer.training import training_target
from diffsteer_textual_inversion import read_embedding
from diffsteer_textual_inversion.train import EMBEDS_FILE, to_pixels, train_embedding
from concepts import concept_set

TOKEN = "<diamond>"


@torch.no_grad()
def token_loss(parts, vectors: torch.Tensor, images, captions) -> float:
    """Denoising loss of the captions with TOKEN's row set to ``vectors``, at fixed noise and timesteps."""
    tok, te = parts.tokenizer, parts.text_encoder
    if TOKEN not in tok.get_vocab():
        tok.add_tokens([TOKEN])
        te.resize_token_embeddings(len(tok), mean_resizing=False)
    te.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOKEN)] = vectors[0]
    sched = make_scheduler("ddpm", parts.scheduler_config)
    latents = parts.vae.encode(to_pixels(images, 64)).mean * parts.vae.config.scaling_factor
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.full((len(images),), t)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pred = parts.unet(sched.add_noise(latents, noise, timesteps), timesteps, te(ids)[0])
        total += float((pred - training_target(sched, latents, noise, timesteps)).pow(2).mean())
    return total / 5


def test_only_the_token_rows_learn_and_its_loss_falls(tmp_path):
    images, captions = concept_set("diamond", 8, seed=1, token=TOKEN)
    before = load_pipeline_parts("shapes")
    emb_before = before.text_encoder.get_input_embeddings().weight.clone()
    path, result, trainer = train_embedding("shapes", images, captions, tmp_path, token=TOKEN, init_token="square",
                                            config=dict(steps=12, batch_size=4, lr=2e-2))
    token, learned = read_embedding(path)
    assert token == TOKEN and learned.shape == (1, emb_before.shape[1])

    # Bit-identical: every old embedding row, every other text-encoder weight, the whole UNet.
    weight = trainer.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == emb_before.shape[0] + 1
    assert torch.equal(weight[: emb_before.shape[0]], emb_before)
    for (name, p), (_, q) in zip(trainer.text_encoder.named_parameters(), before.text_encoder.named_parameters()):
        if "token_embedding" not in name:
            assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(trainer.unet.named_parameters(), before.unet.named_parameters()):
        assert torch.equal(p, q), name
    square = emb_before[before.tokenizer.convert_tokens_to_ids("square</w>")]
    assert not torch.equal(learned[0], square), "the token row did not move"

    # The learned vector explains the diamonds better than its starting point ("square"), at fixed noise.
    start = token_loss(before, square[None], images, captions)
    end = token_loss(load_pipeline_parts("shapes"), learned, images, captions)
    print(f"\ntoken denoising loss on its images: init 'square' {start:.4f} -> learned {end:.4f} (12 steps)")
    assert end < start

    # diffusers layout: final/ holds the embedding (no unet/ or text_encoder/ copies), and so does the run folder.
    final = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert final == [EMBEDS_FILE, "training.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    images, captions = concept_set("diamond", 4, seed=2, token=TOKEN)
    kw = dict(token=TOKEN, init_token="square", num_vectors=2)
    cfg = dict(batch_size=2, lr=2e-2, checkpoint_every=2)
    whole, r_whole, _ = train_embedding("shapes", images, captions, tmp_path / "a", config=dict(steps=4, **cfg), **kw)
    # "interrupted" after 2 steps (its checkpoint is on disk), then run again to 4 steps
    train_embedding("shapes", images, captions, tmp_path / "b", config=dict(steps=2, **cfg), **kw)
    resumed, r_resumed, _ = train_embedding("shapes", images, captions, tmp_path / "b", config=dict(steps=4, **cfg), **kw)
    assert r_resumed.losses == r_whole.losses
    assert torch.equal(read_embedding(resumed)[1], read_embedding(whole)[1])


def test_cli_trains_and_writes_a_loadable_embedding(tmp_path, capsys):
    images, _ = concept_set("diamond", 2, seed=3)
    folder = tmp_path / "images"
    folder.mkdir()
    for k, im in enumerate(images):
        im.save(folder / f"{k}.png")
    (folder / "0.txt").write_text("a green {} on a white background")
    out = tmp_path / "run"
    assert main(["train", "textual-inversion", "--token", "<d>", "--init-token", "square", "--images", str(folder),
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--threads", "1"]) == 0
    assert str(out / EMBEDS_FILE) in capsys.readouterr().out
    assert read_embedding(out)[0] == "<d>"


def test_bad_training_input_is_refused(tmp_path):
    images, captions = concept_set("diamond", 2, token=TOKEN)
    with pytest.raises(PluginError, match="init-token 'a large' is 2 tokens"):
        train_embedding("shapes", images, captions, tmp_path, token=TOKEN, init_token="a large", config=dict(steps=1))
    with pytest.raises(PluginError, match="'red' is already in the tokenizer"):
        train_embedding("shapes", images, captions, tmp_path, token="red", init_token="square", config=dict(steps=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["train", "textual-inversion"])  # missing required options: argparse's usage error
    from diffsteer_textual_inversion.train import read_images

    with pytest.raises(PluginError, match="no images"):
        read_images(empty, TOKEN)
    images[0].save(empty / "a.png")
    (empty / "a.txt").write_text("a red diamond")
    with pytest.raises(PluginError, match="a.txt.*neither"):
        read_images(empty, TOKEN)
