"""Parity of diffsteer's UNet and VAE with diffusers (the test-only oracle) on tiny random models.

Each test builds a small diffusers model, copies its weights into ours with ``strict=True`` and compares
float32 outputs; the same seeds give the same weights and inputs, so the reference is deterministic.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor  # noqa: E402

from diffsteer.models import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLConfig,
    ForwardContext,
    UNet2DConditionModel,
    UNetConfig,
    randn_tensor,
)
from diffsteer.testing import residual_shapes  # noqa: E402

ATOL = 1e-5

SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Tiny SD1-like UNet: integer head count, conv projections.
SD1_TINY: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
)

# Tiny SD2-like UNet: per-block head counts, linear projections, upcast attention, 3 levels.
SD2_TINY: dict[str, Any] = dict(
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=[2, 4, 8],
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=24,
    norm_num_groups=16,
    transformer_layers_per_block=2,
    sample_size=16,
)

# The layout of diffusers' hf-internal-testing tiny UNets: the resnet-only block comes first and downsamples.
RESNET_FIRST_TINY: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=16,
)

TINY_VAE: dict[str, Any] = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def unet_pair(config: dict[str, Any], seed: int = 0) -> tuple[Any, UNet2DConditionModel]:
    torch.manual_seed(seed)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def vae_pair(config: dict[str, Any], seed: int = 0) -> tuple[Any, AutoencoderKL]:
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(**config).eval()
    ours = AutoencoderKL.from_config(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def inputs(config: dict[str, Any], batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.get("in_channels", 4), *size, generator=g)
    text = torch.randn(batch, 7, config["cross_attention_dim"], generator=g)
    return sample, text


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()



# -- UNet parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY, RESNET_FIRST_TINY], ids=["sd1", "sd2", "resnet-first"])
@torch.no_grad()
def test_unet_matches_diffusers(config: dict[str, Any]) -> None:
    reference, ours = unet_pair(config)
    sample, text = inputs(config)
    expected = reference(sample, 999, text).sample
    assert max_diff(ours(sample, 999, text), expected) <= ATOL


@pytest.mark.parametrize("in_channels", [5, 8, 9])
@torch.no_grad()
def test_unet_extra_input_channels(in_channels: int) -> None:
    config = {**SD1_TINY, "layers_per_block": 1, "in_channels": in_channels}
    reference, ours = unet_pair(config)
    sample, text = inputs(config)
    assert max_diff(ours(sample, 500, text), reference(sample, 500, text).sample) <= ATOL


@torch.no_grad()
def test_unet_odd_sample_size_forwards_upsample_sizes() -> None:
    reference, ours = unet_pair(SD2_TINY)
    sample, text = inputs(SD2_TINY, size=(13, 10))
    out = ours(sample, 10, text)
    assert out.shape == sample.shape
    assert max_diff(out, reference(sample, 10, text).sample) <= ATOL


@torch.no_grad()
def test_unet_timestep_forms() -> None:
    reference, ours = unet_pair({**SD1_TINY, "layers_per_block": 1})
    sample, text = inputs(SD1_TINY, batch=2)
    per_item = torch.tensor([3, 870])
    assert max_diff(ours(sample, per_item, text), reference(sample, per_item, text).sample) <= ATOL
    fractional = 412.75  # a Python float goes through the float64 path
    assert max_diff(ours(sample, fractional, text), reference(sample, fractional, text).sample) <= ATOL

    scalar = ours(sample, 250, text)
    for same in (torch.tensor(250), torch.tensor([250]), torch.tensor([250, 250]), torch.tensor(250.0)):
        assert torch.equal(ours(sample, same, text), scalar)
    # Each batch item sees only its own timestep (up to batch-size-dependent kernel rounding).
    assert max_diff(ours(sample, per_item, text)[1:], ours(sample[1:], 870, text[1:])) <= ATOL


@torch.no_grad()
def test_unet_controlnet_residuals() -> None:
    reference, ours = unet_pair(SD1_TINY)
    sample, text = inputs(SD1_TINY)
    g = torch.Generator().manual_seed(5)
    down = [torch.randn(2, *shape, generator=g) for shape in residual_shapes(SD1_TINY, 16, 16)[0]]
    mid = torch.randn(2, 64, 8, 8, generator=g)
    expected = reference(
        sample, 321, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    out = ours(sample, 321, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert max_diff(out, expected) <= ATOL
    assert max_diff(out, ours(sample, 321, text)) > 1e-2  # the residuals do reach the output

    with pytest.raises(ValueError, match="skip connections"):
        ours(sample, 321, text, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)
    # Residuals built for another batch layout fail loudly instead of broadcasting.
    with pytest.raises(ValueError, match=r"mid_block_additional_residual has shape \(1, 64, 8, 8\)"):
        ours(sample, 321, text, mid_block_additional_residual=mid[:1])
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[2\] has shape"):
        ours(sample, 321, text, down_block_additional_residuals=[*down[:2], down[2][:1], *down[3:]])


@pytest.mark.parametrize("config", [SD1_TINY, RESNET_FIRST_TINY], ids=["sd1", "resnet-first"])
@torch.no_grad()
def test_unet_t2i_adapter_residuals(config: dict[str, Any]) -> None:
    reference, ours = unet_pair(config)
    sample, text = inputs(config)
    g = torch.Generator().manual_seed(6)
    if config is SD1_TINY:
        shapes = [(2, 32, 16, 16), (2, 64, 8, 8)]
    else:  # the leading DownBlock2D takes its residual after downsampling; the third one goes to the mid block
        shapes = [(2, 32, 8, 8), (2, 64, 8, 8), (2, 64, 8, 8)]
    features = tuple(torch.randn(s, generator=g) for s in shapes)

    # diffusers pops from the list it is given, so it gets a copy.
    expected = reference(sample, 42, text, down_intrablock_additional_residuals=list(features)).sample
    out = ours(sample, 42, text, down_intrablock_additional_residuals=features)
    assert max_diff(out, expected) <= ATOL
    assert max_diff(out, ours(sample, 42, text)) > 1e-2

    with pytest.raises(ValueError, match="down_intrablock_additional_residuals"):
        extra = features + (torch.zeros(2, 3, 5, 5),)
        ours(sample, 42, text, down_intrablock_additional_residuals=extra)
    with pytest.raises(ValueError, match="down-block additional residual has shape"):
        ours(sample, 42, text, down_intrablock_additional_residuals=(features[0][:1], *features[1:]))


@torch.no_grad()
def test_unet_attention_layers_are_named_and_routed() -> None:
    _, ours = unet_pair(SD2_TINY)
    names = ours.attention_layers()
    # 2 cross-attention down blocks x 1 layer + mid + 2 cross-attention up blocks x 2 layers = 7 transformers,
    # each with 2 transformer blocks of (attn1, attn2).
    assert len(names) == 7 * 2 * 2
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert names[1] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    stages = [n.split(".")[0] for n in names]  # forward order: down, mid, up
    assert stages == sorted(stages, key=["down_blocks", "mid_block", "up_blocks"].index)
    modules = dict(ours.named_modules())
    assert all(modules[n].name == n for n in names)

    seen: list[str] = []

    def spy(attn, hidden_states, encoder_hidden_states, context):
        seen.append(attn.name)
        q, k, v = attn.project_qkv(hidden_states, encoder_hidden_states, context)
        return attn.project_out(attn.attend(q, k, v), context)

    sample, text = inputs(SD2_TINY)
    plain = ours(sample, 7, text)
    routed = ours(sample, 7, text, context=ForwardContext(processors={n: spy for n in names}))
    assert sorted(seen) == sorted(names)
    assert torch.equal(routed, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_unet_runs_in_half_precision(dtype: torch.dtype) -> None:
    _, ours = unet_pair(SD2_TINY)  # upcast_attention=True
    sample, text = inputs(SD2_TINY)
    full = ours(sample, 500, text)
    half = ours.to(dtype)
    assert half.dtype == dtype
    out = half(sample.to(dtype), 500, text.to(dtype))
    assert out.dtype == dtype
    # Half precision keeps ~3 significant digits; the tiny random UNet's outputs are O(1).
    assert (out.float() - full).abs().max().item() < 0.1 * full.abs().max().item()


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
@torch.no_grad()
def test_unet_keeps_a_channels_last_layout_through_its_transformers(config: dict[str, Any]) -> None:
    # A user who moves the UNet to channels_last (often faster for bf16 convs) must not get maps that the
    # transformers hand back in NCHW, which would flip every later conv between layouts.
    _, ours = unet_pair(config)
    sample, text = inputs(config)
    expected = ours(sample, 500, text)
    seen: list[bool] = []
    record = lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last))  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in ours.modules() if type(m).__name__ == "SpatialTransformer"]
    ours.to(memory_format=torch.channels_last)
    out = ours(sample.contiguous(memory_format=torch.channels_last), 500, text)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    assert max_diff(out, expected) <= ATOL


def test_unet_config_round_trips_through_diffusers() -> None:
    config = UNetConfig.model_validate(SD2_TINY)
    data = config.to_diffusers_dict()
    assert data["_class_name"] == "UNet2DConditionModel"
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(data)
        ours = UNet2DConditionModel.from_config(data)
    assert reference.state_dict().keys() == ours.state_dict().keys()
    assert UNetConfig.model_validate(data) == config


# -- full-size key sets ---------------------------------------------------------------------------------


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config", [SD15_UNET, SD21_UNET, {**SD15_UNET, "in_channels": 9}], ids=["sd15", "sd21", "sd15-inpaint"]
)
def test_full_size_unet_state_dict_keys(config: dict[str, Any]) -> None:
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
        ours = UNet2DConditionModel.from_config(config)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert shapes_of(ours) == shapes_of(reference)
    assert ours.device.type == "meta"
    assert len(ours.attention_layers()) == 32  # SD 1.x/2.x: 16 transformers x (attn1, attn2)


def test_full_size_vae_state_dict_keys() -> None:
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL.from_config(SD_VAE)
        ours = AutoencoderKL.from_config(SD_VAE)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert shapes_of(ours) == shapes_of(reference)
    assert ours.attention_layers() == ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
    assert ours.config.scaling_factor == 0.18215 and ours.config.shift_factor is None


# -- config errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim=256"),
        ({"only_cross_attention": [False, True]}, "only_cross_attention"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}, r"down_block_types\[0\]='AttnDownBlock2D'"),
        ({"up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D")}, r"up_block_types\[1\]"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
        ({"attention_head_dim": [4, 4, 4]}, "attention_head_dim has 3 entries"),
        ({"attention_head_dim": 5}, "not divisible by its 5 attention heads"),
    ],
)
def test_unet_config_rejects_unsupported_values(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet2DConditionModel.from_config({**SD1_TINY, **override})


def test_unet_config_ignores_unknown_keys_and_accepts_supported_defaults() -> None:
    config = UNetConfig.model_validate(
        {
            **SD15_UNET,
            "some_future_field": 3,
            "class_embed_type": None,
            "only_cross_attention": [False] * 4,
            "mid_block_only_cross_attention": None,
            "act_fn": "swish",
        }
    )
    assert not hasattr(config, "some_future_field")
    assert config.heads() == (8, 8, 8, 8)
    assert UNetConfig.model_validate(SD21_UNET).heads() == (5, 10, 20, 20)
    assert UNetConfig.model_validate({**SD15_UNET, "num_attention_heads": 4}).heads() == (4, 4, 4, 4)


def test_vae_config_rejects_unsupported_block() -> None:
    with pytest.raises(ValueError, match=r"down_block_types\[1\]='AttnDownEncoderBlock2D'"):
        AutoencoderKLConfig.model_validate(
            {**TINY_VAE, "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}
        )


# -- VAE parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers_per_block", [1, 2])
@torch.no_grad()
def test_vae_encode_decode_match_diffusers(layers_per_block: int) -> None:
    config = {**TINY_VAE, "layers_per_block": layers_per_block}
    reference, ours = vae_pair(config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1

    expected = reference.encode(images).latent_dist
    posterior = ours.encode(images)
    assert max_diff(posterior.mean, expected.mean) <= ATOL
    assert max_diff(posterior.logvar, expected.logvar) <= ATOL
    assert max_diff(posterior.std, expected.std) <= ATOL
    assert torch.equal(posterior.mode(), posterior.mean)

    drawn = posterior.sample(torch.Generator().manual_seed(11))
    assert max_diff(drawn, expected.sample(torch.Generator().manual_seed(11))) <= ATOL
    per_item = [torch.Generator().manual_seed(s) for s in (3, 4)]
    per_item_ref = [torch.Generator().manual_seed(s) for s in (3, 4)]
    assert max_diff(posterior.sample(per_item), expected.sample(per_item_ref)) <= ATOL

    decoded = ours.decode(drawn)
    assert decoded.shape == images.shape
    assert max_diff(decoded, reference.decode(drawn).sample) <= ATOL


@torch.no_grad()
def test_vae_without_mid_attention_or_quant_convs() -> None:
    config = {**TINY_VAE, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}
    reference, ours = vae_pair(config)
    assert ours.attention_layers() == [] and ours.quant_conv is None
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert max_diff(ours(images), reference(images).sample) <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_vae_runs_in_half_precision(dtype: torch.dtype) -> None:
    _, ours = vae_pair(TINY_VAE)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    full = ours(images)
    half = ours.to(dtype)(images.to(dtype))
    assert half.dtype == dtype
    assert (half.float() - full).abs().max().item() < 0.1 * full.abs().max().item()


# -- randn_tensor ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_randn_tensor_matches_diffusers(dtype: torch.dtype) -> None:
    shape = (3, 4, 5, 5)
    single = randn_tensor(shape, torch.Generator().manual_seed(0), "cpu", dtype)
    assert torch.equal(single, diffusers_randn_tensor(shape, torch.Generator().manual_seed(0), "cpu", dtype))

    seeds = (7, 8, 9)
    per_item = randn_tensor(shape, [torch.Generator().manual_seed(s) for s in seeds], torch.device("cpu"), dtype)
    expected = diffusers_randn_tensor(shape, [torch.Generator().manual_seed(s) for s in seeds], "cpu", dtype)
    assert torch.equal(per_item, expected)
    # Item i depends only on generator i: that is what makes a seed list reproducible per image.
    assert torch.equal(per_item[1:2], randn_tensor((1, 4, 5, 5), torch.Generator().manual_seed(8), "cpu", dtype))

    one_list = randn_tensor(shape, [torch.Generator().manual_seed(0)], "cpu", dtype)
    assert torch.equal(one_list, single)

    torch.manual_seed(123)
    global_draw = randn_tensor(shape, None, "cpu", dtype)
    torch.manual_seed(123)
    assert torch.equal(global_draw, diffusers_randn_tensor(shape, None, "cpu", dtype))

    with pytest.raises(ValueError, match="one per batch item"):
        randn_tensor(shape, [torch.Generator(), torch.Generator()], "cpu", dtype)


def test_models_do_not_import_diffusers() -> None:
    import pathlib

    import diffsteer.models as models

    for path in pathlib.Path(models.__file__).parent.glob("*.py"):
        assert "diffusers" not in [
            line.split()[1].split(".")[0]
            for line in path.read_text().splitlines()
            if line.startswith(("import ", "from ")) and len(line.split()) > 1
        ], path.name
    # The config objects are plain data: copying one doesn't share state with the model.
    assert copy.deepcopy(UNetConfig()) == UNetConfig()
