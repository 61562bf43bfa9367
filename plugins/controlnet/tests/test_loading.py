"""Loading ControlNets: diffusers folders (no key map), original single files (checked against diffusers' own
converter), shipped short names, fp16 storage, and the errors for bad files and mismatched models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffsteer.loading.errors import ModelLoadError, WeightsError
from diffsteer.loading.weights import load_state_dict, save_state_dict
from diffsteer.models import UNetConfig
from diffsteer_controlnet import SHIPPED, ControlNetModel, load_controlnet, save_controlnet
from diffsteer_controlnet.loading import diffusers_to_original


def unet_config(sd_folder) -> UNetConfig:
    return UNetConfig.model_validate(json.loads((Path(sd_folder) / "unet" / "config.json").read_text()))


def test_diffusers_folder_loads_key_for_key(controlnet_for):
    folder = controlnet_for()
    ours = load_controlnet(folder).state_dict()
    theirs = load_state_dict(folder / "diffusion_pytorch_model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# Four control-encoder widths: diffusers' single-file converter assumes the original 8-conv hint block.
FOUR = (8, 8, 8, 8)


@pytest.mark.parametrize("variant", ["prefixed.safetensors", "unprefixed.safetensors", "prefixed.pth"])
def test_original_single_file_matches_diffusers_converter(controlnet_for, tiny_sd1, tmp_path, variant):
    """We write the original layout with our table; diffusers' independent converter must read back the
    same tensors, and so must our loader (from .safetensors, unprefixed keys and a weights-only .pth)."""
    from diffusers import ControlNetModel as DiffusersControlNet

    folder = controlnet_for(FOUR, seed=3)
    net = load_controlnet(folder)
    original = diffusers_to_original(net)
    assert all(k.startswith("control_model.") for k in original)
    assert any(k.startswith("control_model.input_hint_block.14.") for k in original)
    if variant.startswith("unprefixed"):
        original = {k.removeprefix("control_model."): v for k, v in original.items()}
    path = tmp_path / f"control.{variant.split('.')[-1]}"
    if path.suffix == ".pth":
        torch.save({"state_dict": original}, path)
    else:
        save_state_dict(original, path)
    expected = net.state_dict()

    if variant == "prefixed.safetensors":  # the oracle reads the canonical layout
        ref = DiffusersControlNet.from_single_file(str(path), config=str(folder), local_files_only=True).state_dict()
        assert set(ref) == set(expected)
        assert all(torch.equal(ref[k], expected[k].reshape(ref[k].shape)) for k in ref)

    loaded = load_controlnet(path, unet_config=unet_config(tiny_sd1)).state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_fp16_storage_loads_to_the_fp16_values_exactly(controlnet_for, tmp_path):
    net = load_controlnet(controlnet_for())
    save_controlnet(net, tmp_path / "half", dtype=torch.float16)
    stored = load_state_dict(tmp_path / "half" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values())
    back = load_controlnet(tmp_path / "half")
    assert back.dtype == torch.float32
    assert all(torch.equal(back.state_dict()[k], v.half().float()) for k, v in net.state_dict().items())


def test_shipped_controlnet_loads_by_short_name():
    net = load_controlnet(SHIPPED[0])
    assert isinstance(net, ControlNetModel)
    assert net.config.conditioning_embedding_out_channels == (16, 32, 96)
    # Trained: the zero convolutions have moved away from zero.
    assert float(net.controlnet_mid_block.weight.detach().abs().max()) > 0


# -- errors ---------------------------------------------------------------------------------------------------


def test_missing_and_unknown_references(tmp_path):
    with pytest.raises(ModelLoadError, match="no shipped ControlNet named 'shapes-nope'.*shapes-outline"):
        load_controlnet("shapes-nope")
    with pytest.raises(ModelLoadError, match="no such ControlNet file or folder"):
        load_controlnet(tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_controlnet(tmp_path / "empty")


def test_corrupt_and_truncated_files(controlnet_for, tiny_sd1, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = controlnet_for()
    (bad / "config.json").write_text((good / "config.json").read_text())
    data = (good / "diffusion_pytorch_model.safetensors").read_bytes()
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors.*corrupt or truncated"):
        load_controlnet(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        load_controlnet(bad)
    single = tmp_path / "garbage.safetensors"
    single.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_controlnet(single, unet_config=unet_config(tiny_sd1))


def test_wrong_shapes_name_the_file_and_the_key(controlnet_for, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    good = controlnet_for()
    config = json.loads((good / "config.json").read_text())
    config["conditioning_embedding_out_channels"] = [8, 24]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes((good / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"shape mismatch.*controlnet_cond_embedding"):
        load_controlnet(folder)


def test_single_file_needs_a_unet_and_known_keys(controlnet_for, tiny_sd1, tmp_path):
    net = load_controlnet(controlnet_for(FOUR, seed=3))
    original = diffusers_to_original(net)
    path = tmp_path / "c.safetensors"
    save_state_dict(original, path)
    with pytest.raises(ModelLoadError, match="has no config"):
        load_controlnet(path)
    save_state_dict({**original, "control_model.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="unknown keys.*extra.weight"):
        load_controlnet(path, unet_config=unet_config(tiny_sd1))
    save_state_dict({k: v for k, v in original.items() if "zero_convs.2." not in k}, path)
    with pytest.raises(WeightsError, match="missing keys.*zero_convs.2"):
        load_controlnet(path, unet_config=unet_config(tiny_sd1))


def test_a_pickle_that_runs_code_is_refused(tmp_path, tiny_sd1):
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "y": Path("/")}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_controlnet(path, unet_config=unet_config(tiny_sd1))
