"""bench/average_models.py: the weighted average of two model folders' UNet and text-encoder weights."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsteer.loading.pipeline_loader import shipped_model_dir

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "average_models.py"
_spec = importlib.util.spec_from_file_location("average_models", SCRIPT)
average_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(average_models)
WEIGHTS = average_models.WEIGHTS


def _run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["average_models.py", *map(str, args)])
    average_models.main()


@pytest.fixture
def two_models(tmp_path):
    """The shipped model, and a copy whose weights are shifted by a seeded random tensor each."""
    second = tmp_path / "second"
    shutil.copytree(shipped_model_dir(), second)
    g = torch.Generator().manual_seed(0)
    for rel in WEIGHTS:
        w = load_file(second / rel)
        save_file({k: (v.float() + torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
                   for k, v in w.items()}, second / rel)
    return shipped_model_dir(), second


def test_average_is_the_weighted_mean(monkeypatch, tmp_path, two_models, capsys):
    first, second = two_models
    _run(monkeypatch, "shapes", second, "--weight", "0.25", "--out", tmp_path / "soup")
    assert "0.75 x shapes + 0.25 x" in capsys.readouterr().out
    for rel in WEIGHTS:
        a, b, mixed = load_file(first / rel), load_file(second / rel), load_file(tmp_path / "soup" / rel)
        assert mixed.keys() == b.keys()
        for k in b:
            assert mixed[k].dtype == b[k].dtype
            want = (0.75 * a[k].float() + 0.25 * b[k].float()).to(b[k].dtype)
            assert torch.equal(mixed[k], want), k
        assert any(not torch.equal(mixed[k], a[k]) for k in a)
    # the other parts are the second folder's
    assert (tmp_path / "soup" / "vae" / "config.json").read_bytes() == (second / "vae" / "config.json").read_bytes()
    assert not list(tmp_path.glob("tmp*"))  # the staging folder is gone


@pytest.mark.parametrize(
    "args, message",
    [
        (("shapes", "{missing}", "--out", "{out}"), "no such folder"),
        (("shapes", "shapes", "--weight", "1.5", "--out", "{out}"), "--weight must be between 0 and 1"),
        (("shapes", "shapes", "--out", "{existing}"), "exists; averaging writes a new folder"),
        (("shapes", "{broken}", "--out", "{out}"), "has no unet/diffusion_pytorch_model.safetensors"),
    ],
)
def test_bad_input_is_a_clear_error(monkeypatch, tmp_path, args, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    names = dict(missing=tmp_path / "missing", out=tmp_path / "out", existing=tmp_path, broken=broken)
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, *(a.format(**names) for a in args))
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_mismatched_architectures_are_refused(monkeypatch, tmp_path, two_models):
    _, second = two_models
    rel = WEIGHTS[1]
    w = load_file(second / rel)
    w.pop(next(iter(w)))
    save_file(w, second / rel)
    with pytest.raises(SystemExit, match="differs in its tensors' names or shapes"):
        _run(monkeypatch, "shapes", second, "--out", tmp_path / "soup")
    assert not (tmp_path / "soup").exists() and not list(tmp_path.glob("tmp*"))
