"""A pipeline written as one original-layout file loads back (ours and diffusers') and generates the same."""

from __future__ import annotations

import pytest
import torch

from diffsteer.loading.errors import ModelLoadError, WeightsError
from diffsteer.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
    """A tiny model whose unreadable hyper-parameters (heads, groups) match SD 1.5's conventions."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsteer.testing import SD1_SCHEDULER
    from diffsteer.shapes.vocab import build_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("sf")
    tok = load_tokenizer(build_tokenizer(root / "tok"))
    torch.manual_seed(1)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, norm_num_groups=32,
        ),
        vae=AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )),
        tokenizer=tok, scheduler=DDIMScheduler.from_config(SD1_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    return root / "folder"


def test_single_file_round_trip_generates_identically(sd_like, tmp_path):
    folder = Pipeline.from_pretrained(sd_like, scheduler="ddim")
    path = tmp_path / "model.safetensors"
    folder.save_single_file(path)
    single = Pipeline.from_single_file(path, tokenizer=sd_like / "tokenizer", scheduler="ddim")
    # the file does not record the training resolution (detection assumes SD's 512 px): pass the size
    kw = dict(prompt="a red circle", num_inference_steps=3, output_type="latent", height=32, width=32)
    a = folder(generator=torch.Generator().manual_seed(0), **kw).images
    b = single(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)


def test_diffusers_reads_our_single_file(sd_like, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    ours = Pipeline.from_pretrained(sd_like)
    path = tmp_path / "model.safetensors"
    ours.save_single_file(path)
    converted = convert_ldm_unet_checkpoint(load_file(path), dict(ours.unet.config.to_diffusers_dict()))
    expected = ours.unet.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_single_file_errors_name_the_file(sd_like, tmp_path):
    with pytest.raises(WeightsError, match="nowhere.safetensors.*not found"):
        Pipeline.from_single_file(tmp_path / "nowhere.safetensors", tokenizer=sd_like / "tokenizer")
    path = tmp_path / "m.safetensors"
    Pipeline.from_pretrained(sd_like).save_single_file(path)
    with pytest.raises(ModelLoadError, match="cannot load a CLIP tokenizer"):
        Pipeline.from_single_file(path, tokenizer=tmp_path / "no-tokenizer")
