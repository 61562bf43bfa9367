"""Single-file (LDM / A1111) conversion, checked against diffusers' own converters as the oracle.

Tiny diffusers/transformers models give real tensors to compare exactly; full-size SD 1.5 / 2.1
models built on the meta device check the real key layout and config detection without memory.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from diffsteer.loading import (
    WeightsError,
    align_text_encoder_keys,
    apply_state_dict,
    detect_single_file,
    load_single_file,
    split_single_file,
    to_single_file,
    write_single_file,
)

TINY_UNET_COMMON: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=4,
)
SD1_TINY = dict(TINY_UNET_COMMON, cross_attention_dim=12, attention_head_dim=2)
SD2_TINY = dict(TINY_UNET_COMMON, cross_attention_dim=16, attention_head_dim=[1, 2, 2], use_linear_projection=True)
VAE_TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=4,
)


def clip_config(layers: int, hidden: int = 16, act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=layers,
        vocab_size=64,
        max_position_embeddings=8,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    # Default inits leave many tensors identical (zeros/ones); random values catch any mix-up.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 drops the ``text_model.`` prefix from CLIPTextModel's own state dict."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].shape == v.shape, k
        if v.device.type != "meta":
            assert torch.equal(actual[k], v), k


@pytest.fixture(scope="module")
def sd1() -> dict[str, Any]:
    torch.manual_seed(0)
    unet = randomized(UNet2DConditionModel(**SD1_TINY))
    return {
        "unet": unet,
        "vae": randomized(AutoencoderKL(**VAE_TINY)),
        "te": randomized(CLIPTextModel(clip_config(2))),
        "config": dict(unet.config),
    }


@pytest.fixture(scope="module")
def sd2() -> dict[str, Any]:
    unet = randomized(UNet2DConditionModel(**SD2_TINY))
    # 23 layers, as SD 2.x: diffusers' OpenCLIP converter hard-codes resblocks.23 as the dropped block.
    return {
        "unet": unet,
        "vae": randomized(AutoencoderKL(**VAE_TINY)),
        "te": randomized(CLIPTextModel(clip_config(23, act="gelu"))),
        "config": dict(unet.config),
    }


def single(models: dict[str, Any], **kw: Any) -> dict[str, torch.Tensor]:
    return to_single_file(
        models["unet"].state_dict(), models["vae"].state_dict(), models["te"].state_dict(), models["config"], **kw
    )


# --- writer, read back by diffusers ---------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_unet_writer_read_by_diffusers(flavour: str, request: pytest.FixtureRequest) -> None:
    m = request.getfixturevalue(flavour)
    ckpt = single(m)
    assert_same(convert_ldm_unet_checkpoint(ckpt, m["config"]), m["unet"].state_dict())


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_vae_writer_read_by_diffusers(flavour: str, request: pytest.FixtureRequest) -> None:
    m = request.getfixturevalue(flavour)
    ckpt = single(m)
    # Original layout: mid-block attention projections are 1x1 convs.
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ckpt["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert_same(convert_ldm_vae_checkpoint(ckpt, dict(m["vae"].config)), m["vae"].state_dict())


def test_clip_writer_read_by_diffusers(sd1: dict[str, Any]) -> None:
    ckpt = single(sd1)
    assert not any(k.startswith("cond_stage_model.model.") for k in ckpt)
    assert_same(convert_ldm_clip_checkpoint(ckpt), canonical(sd1["te"].state_dict()))


def test_open_clip_writer_read_by_diffusers(sd2: dict[str, Any]) -> None:
    ckpt = single(sd2)
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in ckpt
    # The block SD 2.x never runs is written back (identity), as OpenCLIP loaders expect 24 blocks.
    assert torch.equal(
        ckpt["cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight"], torch.zeros(16, 32)
    )
    assert ckpt["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (48, 16)
    assert_same(convert_open_clip_checkpoint(sd2["te"], ckpt), canonical(sd2["te"].state_dict()))


def test_open_clip_writer_without_padding(sd2: dict[str, Any]) -> None:
    ckpt = single(sd2, pad_open_clip=False)
    assert not any(".resblocks.23." in k or k.endswith(("text_projection", "logit_scale")) for k in ckpt)


# --- reader: our split vs the originals and vs diffusers' reader ----------------------------


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_reader_returns_original_tensors(flavour: str, request: pytest.FixtureRequest) -> None:
    m = request.getfixturevalue(flavour)
    ckpt = single(m)
    parts = split_single_file(ckpt, source="tiny.safetensors")
    assert_same(parts["unet"], m["unet"].state_dict())
    assert_same(parts["vae"], m["vae"].state_dict())
    assert_same(parts["text_encoder"], canonical(m["te"].state_dict()))
    # Same answer as diffusers' reader on the same original-layout dict.
    assert_same(parts["unet"], convert_ldm_unet_checkpoint(ckpt, m["config"]))
    assert_same(parts["vae"], convert_ldm_vae_checkpoint(ckpt, dict(m["vae"].config)))


def test_split_loads_strictly_into_models(sd2: dict[str, Any]) -> None:
    parts = split_single_file(single(sd2))
    fresh_unet = UNet2DConditionModel(**SD2_TINY)
    apply_state_dict(fresh_unet, parts["unet"], source="tiny")
    assert torch.equal(fresh_unet.conv_in.weight, sd2["unet"].conv_in.weight)
    fresh_te = CLIPTextModel(clip_config(23, act="gelu"))
    apply_state_dict(fresh_te, align_text_encoder_keys(parts["text_encoder"], fresh_te), source="tiny")
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(fresh_te(ids).last_hidden_state, sd2["te"](ids).last_hidden_state)


def test_proj_reshaped_to_config_layout(sd1: dict[str, Any]) -> None:
    # A file whose transformer projections are linear, read for a conv-projection (SD 1.x) config.
    ckpt = single(sd1)
    proj = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    linear = dict(ckpt, **{proj: ckpt[proj][:, :, 0, 0]})
    unet = split_single_file(linear, components=("unet",), unet_config=sd1["config"])["unet"]
    assert_same(unet, sd1["unet"].state_dict())
    sd2_config = dict(sd1["config"], use_linear_projection=True)
    unet2 = split_single_file(ckpt, components=("unet",), unet_config=sd2_config)["unet"]
    assert unet2["down_blocks.0.attentions.0.proj_in.weight"].shape == (8, 8)


def test_write_and_load_file(sd2: dict[str, Any], tmp_path: Any) -> None:
    path = tmp_path / "model.safetensors"
    write_single_file(
        path, sd2["unet"].state_dict(), sd2["vae"].state_dict(), sd2["te"].state_dict(), sd2["config"],
        metadata={"format": "pt"}, extra={"alphas_cumprod": torch.linspace(1, 0, 10)},
    )
    info, parts = load_single_file(path, prediction_type="v_prediction")
    assert info.version == "sd2" and info.text_encoder_layout == "open_clip"
    assert info.prediction_type == "v_prediction" and info.prediction_type_known
    assert_same(parts["unet"], sd2["unet"].state_dict())
    assert_same(parts["text_encoder"], canonical(sd2["te"].state_dict()))
    assert info.text_encoder_config["num_hidden_layers"] == 23
    assert info.text_encoder_config["hidden_act"] == "gelu"


# --- detection ---------------------------------------------------------------------------------


def test_detect_tiny_structure(sd1: dict[str, Any], sd2: dict[str, Any]) -> None:
    for m, version, linear in ((sd1, "sd1", False), (sd2, "sd2", True)):
        info = detect_single_file(single(m))
        assert info.version == version
        cfg = info.unet_config
        for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim"):
            assert cfg[key] == m["config"][key], key
        assert cfg["block_out_channels"] == list(m["config"]["block_out_channels"])
        assert cfg["down_block_types"] == list(m["config"]["down_block_types"])
        assert cfg["up_block_types"] == list(m["config"]["up_block_types"])
        assert cfg["use_linear_projection"] is linear
        vcfg = info.vae_config
        assert vcfg["block_out_channels"] == [8, 16] and vcfg["layers_per_block"] == 2
        assert vcfg["latent_channels"] == 4
    info = detect_single_file(single(sd2))
    assert info.prediction_type == "epsilon" and not info.prediction_type_known
    assert detect_single_file(single(sd1)).prediction_type_known


def test_detect_inpainting_channels(sd1: dict[str, Any]) -> None:
    ckpt = single(sd1)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ckpt[key] = torch.zeros(8, 9, 3, 3)
    info = detect_single_file(ckpt)
    assert info.in_channels == 9 and info.is_inpainting and info.unet_config["in_channels"] == 9


SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
SD2_TEXT = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"
)
StateDict = dict[str, torch.Tensor]


def _meta_models(version: str) -> tuple[StateDict, StateDict, StateDict, dict[str, Any]]:
    vae_kw = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
    )
    with torch.device("meta"):
        if version == "sd1":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            te = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
        else:
            unet = UNet2DConditionModel(
                sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
            )
            te = CLIPTextModel(CLIPTextConfig(**SD2_TEXT))
        vae = AutoencoderKL(**vae_kw)
    return unet.state_dict(), vae.state_dict(), canonical(te.state_dict()), dict(unet.config)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_layout_and_detection(version: str) -> None:
    unet_sd, vae_sd, te_sd, config = _meta_models(version)
    ckpt = to_single_file(unet_sd, vae_sd, te_sd, config)
    # Real SD 1.x/2.x files: 686 UNet tensors; the key diffusers uses to recognise SD 1.x.
    assert sum(k.startswith("model.diffusion_model.") for k in ckpt) == 686
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ckpt
    assert_same(convert_ldm_unet_checkpoint(ckpt, config), unet_sd)
    info = detect_single_file(ckpt, prediction_type="v_prediction" if version == "sd2" else None)
    expected = {
        "in_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    if version == "sd1":
        expected.update(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, sample_size=64)
        te_expected = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
    else:
        expected.update(
            cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96
        )
        te_expected = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
        assert info.unet_config["upcast_attention"] and info.image_size == 768
    for k, v in expected.items():
        assert info.unet_config[k] == v, k
    for k, v in te_expected.items():
        assert info.text_encoder_config[k] == v, k
    assert info.vae_config["block_out_channels"] == [128, 256, 512, 512]
    parts = split_single_file(ckpt)
    assert_same(parts["unet"], unet_sd)
    assert_same(parts["vae"], vae_sd)


def test_full_size_open_clip_matches_diffusers_drop() -> None:
    # A real SD 2.x file has 24 resblocks; diffusers drops resblocks.23, and so do we.
    unet_sd, vae_sd, te_sd, config = _meta_models("sd2")
    ckpt = to_single_file(unet_sd, vae_sd, te_sd, config)
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ckpt
    parts = split_single_file(ckpt, components=("text_encoder",))
    assert_same(parts["text_encoder"], te_sd)
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(**SD2_TEXT))
    assert_same(convert_open_clip_checkpoint(te, ckpt), te_sd)
    assert not any("layers.23." in k for k in parts["text_encoder"])


# --- errors ------------------------------------------------------------------------------------


def test_ignores_training_bookkeeping(sd1: dict[str, Any]) -> None:
    ckpt = single(sd1)
    ckpt.update(
        {
            "alphas_cumprod": torch.ones(3),
            "model_ema.decay": torch.tensor(0.99),
            "model_ema.diffusion_modelconv_in": torch.ones(1),
            "first_stage_model.loss.logvar": torch.zeros(()),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(8)[None],
        }
    )
    parts = split_single_file(ckpt)
    assert_same(parts["text_encoder"], canonical(sd1["te"].state_dict()))


def test_unknown_top_level_key_names_file_and_key(sd1: dict[str, Any]) -> None:
    ckpt = dict(single(sd1), **{"mystery.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"odd\.safetensors.*unknown keys.*mystery\.weight"):
        split_single_file(ckpt, source="odd.safetensors")
    assert "unet" in split_single_file(ckpt, strict=False)


def test_unknown_unet_key_names_file_and_key(sd1: dict[str, Any]) -> None:
    ckpt = dict(single(sd1), **{"model.diffusion_model.input_blocks.1.0.in_layers.7.weight": torch.zeros(1)})
    key = r"model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.7\.weight"
    with pytest.raises(WeightsError, match=rf"odd\.ckpt.*{key}"):
        split_single_file(ckpt, source="odd.ckpt")


def test_missing_block_names_file_and_key(sd1: dict[str, Any]) -> None:
    ckpt = {k: v for k, v in single(sd1).items() if ".output_blocks.4.1." not in k}
    with pytest.raises(WeightsError, match=r"cut\.safetensors.*missing.*model\.diffusion_model\.output_blocks\.4\.1"):
        split_single_file(ckpt, unet_config=sd1["config"], source="cut.safetensors")


def test_missing_component_and_unsupported_family(sd1: dict[str, Any]) -> None:
    no_vae = {k: v for k, v in single(sd1).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(WeightsError, match=r"a\.safetensors.*missing component vae.*first_stage_model"):
        split_single_file(no_vae, source="a.safetensors")
    assert set(split_single_file(no_vae, components=("unet", "text_encoder"))) == {"unet", "text_encoder"}
    assert detect_single_file(no_vae).vae_config is None
    sdxl = dict(single(sd1), **{"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)})
    with pytest.raises(WeightsError, match="SDXL"):
        detect_single_file(sdxl, source="xl.safetensors")


def test_writer_rejects_unknown_diffusers_key(sd1: dict[str, Any]) -> None:
    bad = dict(sd1["unet"].state_dict(), **{"down_blocks.0.resnets.0.wobble.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"UNet state dict.*down_blocks\.0\.resnets\.0\.wobble\.weight"):
        to_single_file(bad, None, None, sd1["config"])


def test_identity_block_is_identity(sd2: dict[str, Any]) -> None:
    ckpt = single(sd2)
    scale = ckpt["cond_stage_model.model.logit_scale"]
    assert math.isclose(float(scale), math.log(1 / 0.07), rel_tol=1e-6)
    assert torch.equal(ckpt["cond_stage_model.model.text_projection"], torch.eye(16))


def test_loading_never_imports_diffusers() -> None:
    import subprocess
    import sys

    code = "import sys, diffsteer.loading; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
