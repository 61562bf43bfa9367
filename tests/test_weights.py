"""Weight files: formats, refusal of unsafe pickles, clear errors, strict application, atomic saves."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffsteer.loading.weights as weights_mod
from diffsteer.loading import WeightsError, apply_state_dict, load_state_dict, save_state_dict


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.register_buffer("ids", torch.arange(4))


def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Tiny().state_dict().items()}


def assert_equal_sd(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- formats -------------------------------------------------------------------------------


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    sd = tiny_sd()
    path = tmp_path / "w.safetensors"
    save_state_dict(sd, path, metadata={"format": "pt", "who": "test"})
    assert_equal_sd(load_state_dict(path), sd)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_handles_shared_and_strided_tensors(tmp_path: Path) -> None:
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = fused.chunk(3)  # views of one storage, as when splitting a fused in_proj
    sd = {"q": q, "k": k, "v": v, "t": fused.t()}
    save_state_dict(sd, tmp_path / "s.safetensors")
    assert_equal_sd(load_state_dict(tmp_path / "s.safetensors"), {n: t.contiguous() for n, t in sd.items()})


@pytest.mark.parametrize("name", ["w.bin", "w.pt", "w.ckpt"])
def test_pickle_round_trip(tmp_path: Path, name: str) -> None:
    sd = tiny_sd()
    torch.save(sd, tmp_path / name)
    assert_equal_sd(load_state_dict(tmp_path / name), sd)


def test_original_checkpoint_state_dict_is_unwrapped(tmp_path: Path) -> None:
    sd = tiny_sd()
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, tmp_path / "model.ckpt")
    assert_equal_sd(load_state_dict(tmp_path / "model.ckpt"), sd)


# --- refusal and clear errors -----------------------------------------------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle-protocol-2", "pickle-default"])
def test_malicious_pickle_is_refused_not_executed(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    payload = {"weight": torch.zeros(2), "boom": Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2 if how == "pickle-protocol-2" else pickle.DEFAULT_PROTOCOL)
    with pytest.raises(WeightsError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and info.value.source == str(path)
    assert "refused" in message and "not plain tensors" in message
    assert info.value.__cause__ is None  # the message stands alone, no trace from torch's unpickler
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match=r"nope\.safetensors: file not found"):
        load_state_dict(path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_state_dict({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.safetensors", b"hello, this is a text file", "not a readable safetensors file"),
        ("config.bin", b'{"a": 1}', "not a PyTorch checkpoint"),
        ("empty.pt", b"", "not a PyTorch checkpoint"),
        ("weights.npz", b"PK\x03\x04", "unsupported weights file type"),
    ],
)
def test_non_weights_files(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=reason) as info:
        load_state_dict(tmp_path / name)
    assert name in str(info.value)


def test_pickle_without_tensors(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt: does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match=r"mixed\.pt: is not a flat dict of tensors: 'step'"):
        load_state_dict(tmp_path / "mixed.pt")


# --- apply_state_dict --------------------------------------------------------------------------


def test_apply_casts_to_model_dtype() -> None:
    model = Tiny()
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_sd().items()}
    apply_state_dict(model, sd, source="w.safetensors")
    assert model.lin.weight.dtype == torch.float32
    assert torch.equal(model.lin.weight, sd["lin.weight"].float())
    assert model.ids.dtype == torch.int64


def test_apply_missing_key() -> None:
    sd = tiny_sd()
    del sd["norm.bias"]
    model = Tiny()
    before = model.lin.weight.clone()
    with pytest.raises(WeightsError, match=r"unet\.safetensors: .*missing keys: 'norm\.bias'"):
        apply_state_dict(model, sd, source="unet.safetensors")
    assert torch.equal(model.lin.weight, before)  # nothing half-applied


def test_apply_unexpected_keys_are_counted() -> None:
    sd = tiny_sd()
    sd.update({f"extra.{i}.weight": torch.zeros(1) for i in range(8)})
    with pytest.raises(WeightsError) as info:
        apply_state_dict(Tiny(), sd, source="vae.bin")
    message = str(info.value)
    assert message.startswith("vae.bin: ")
    assert "unexpected keys: 'extra.0.weight'" in message and "(and 3 more, 8 in all)" in message


def test_apply_shape_mismatch_names_both_shapes() -> None:
    sd = tiny_sd()
    sd["lin.weight"] = torch.zeros(4, 3)
    with pytest.raises(WeightsError, match=r"te\.safetensors: .*lin\.weight: expected \(2, 3\), found \(4, 3\)"):
        apply_state_dict(Tiny(), sd, source="te.safetensors")


# --- atomic save -------------------------------------------------------------------------------


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    save_state_dict({"old": torch.ones(2)}, path)
    original = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"partial")  # half-written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_mod, "save_file", failing_save_file)
    with pytest.raises(WeightsError, match=r"w\.safetensors: could not write weights: .*No space left"):
        save_state_dict({"new": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert path.read_bytes() == original

    with pytest.raises(WeightsError):
        save_state_dict({"new": torch.zeros(2)}, tmp_path / "fresh.safetensors")
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_rejects_non_tensor_values(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="'step'"):
        save_state_dict({"step": 3}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


def test_error_hierarchy() -> None:
    from diffsteer.errors import DiffsteerError
    from diffsteer.loading import ModelLoadError

    assert issubclass(WeightsError, ModelLoadError) and issubclass(ModelLoadError, DiffsteerError)
    assert issubclass(WeightsError, ValueError)
