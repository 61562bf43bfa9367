"""Pipeline behaviour: determinism, concurrency, output types, loading paths and bad input."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from diffsteer.loading.errors import ModelLoadError, WeightsError
from diffsteer.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_sd1) -> Pipeline:
    return Pipeline.from_pretrained(tiny_sd1, scheduler="euler_a")


def test_same_seed_same_output_and_seed_equals_generator(pipe):
    a = pipe("a red circle", num_inference_steps=3, seed=7, output_type="pt").images
    b = pipe("a red circle", num_inference_steps=3, seed=7, output_type="pt").images
    c = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="pt").images
    d = pipe("a red circle", num_inference_steps=3, seed=8, output_type="pt").images
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_concurrent_calls_match_serial_calls(pipe):
    """One pipeline serves several threads; the scheduler's per-call state must not leak between them."""
    jobs = [
        dict(prompt="a red circle", seed=1, num_inference_steps=4),
        dict(prompt="a blue square", seed=2, num_inference_steps=6, guidance_scale=3.0),
        dict(prompt="a green triangle", seed=3, num_inference_steps=5, guidance_scale=1.0),
        dict(prompt="a yellow circle", seed=4, num_inference_steps=3),
    ]
    serial = [pipe(output_type="latent", **job).images for job in jobs]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(jobs))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = pipe(output_type="latent", **jobs[i]).images

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        assert torch.equal(results[i], expected), f"job {i} differs when run concurrently"


def test_output_types(pipe):
    kw = dict(prompt="a circle", num_inference_steps=2, seed=0)
    pil = pipe(output_type="pil", **kw).images
    arr = pipe(output_type="np", **kw).images
    pt = pipe(output_type="pt", **kw).images
    lat = pipe(output_type="latent", **kw).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert arr.shape == (1, 32, 32, 3) and arr.dtype == np.float32
    assert pt.shape == (1, 3, 32, 32) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    assert lat.shape == (1, 4, 16, 16)
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))


def test_img2img_strength_zero_point_keeps_structure(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    low = pipe("a circle", image=image, strength=0.3, num_inference_steps=10, seed=0, output_type="np").images
    high = pipe("a circle", image=image, strength=1.0, num_inference_steps=10, seed=0, output_type="np").images
    src = np.asarray(image, dtype=np.float32) / 255
    assert np.abs(low[0] - src).mean() < np.abs(high[0] - src).mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=31), "height must be a multiple of 2"),
        (dict(num_inference_steps=0), "num_inference_steps must be at least 1"),
        (dict(strength=1.5, image=np.zeros((32, 32, 3))), r"strength must be in \[0, 1\]"),
        (dict(output_type="jpeg"), "output_type must be"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompts"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents have shape \(1, 4, 8, 8\)"),
        (dict(seed=1, generator=torch.Generator()), "either generator or seed"),
        (dict(clip_skip=9), "clip_skip is 9, out of range for a text encoder with 3 layers"),
    ],
)
def test_bad_arguments_get_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a circle", **{"num_inference_steps": 1, **kwargs})


def test_clip_skip_changes_the_embeddings(pipe):
    base = pipe("a red circle", num_inference_steps=2, seed=0, output_type="latent").images
    skip = pipe("a red circle", num_inference_steps=2, seed=0, clip_skip=1, output_type="latent").images
    assert not torch.allclose(base, skip)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_runs_end_to_end_close_to_fp32(tiny_sd1, dtype):
    fp32 = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    half = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", torch_dtype=dtype)
    assert half.unet.dtype == dtype and half.text_encoder.dtype == dtype
    # float16 would overflow in the VAE decoder; bfloat16 has float32's range (docs/loading.md)
    assert half.vae.dtype == (torch.float32 if dtype == torch.float16 else torch.bfloat16)
    kept = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", torch_dtype=dtype, vae_dtype=torch.float32)
    assert kept.vae.dtype == torch.float32 and kept.unet.dtype == dtype
    kw = dict(prompt="a red circle", num_inference_steps=4, seed=0, output_type="np")
    a, b = fp32(**kw).images, half(**kw).images
    mse = float(((a - b) ** 2).mean())
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    print(f"tiny random model {dtype} vs fp32 PSNR: {psnr:.1f} dB")
    assert psnr > 30


# -- loading ---------------------------------------------------------------------------------------------


def test_hub_id_resolves_from_the_offline_cache(tiny_sd1, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-sd" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_sd1, snap)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    pipe = Pipeline.from_pretrained("someone/tiny-sd")
    assert pipe.unet.config.block_out_channels == [32, 64] or tuple(pipe.unet.config.block_out_channels) == (32, 64)
    with pytest.raises(ModelLoadError, match="someone/absent.*not in the local hub cache"):
        Pipeline.from_pretrained("someone/absent")


def test_missing_and_corrupt_files_are_named(tiny_sd1, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model.safetensors.*corrupt or truncated"):
        Pipeline.from_pretrained(broken)
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"unet: no weights file"):
        Pipeline.from_pretrained(broken)
    with pytest.raises(ModelLoadError, match="no such folder"):
        Pipeline.from_pretrained(tmp_path / "nowhere")


def test_wrong_shape_weights_name_the_key(tiny_sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sd1, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    save_file(sd, f)
    with pytest.raises(WeightsError, match=r"conv_in.weight: expected \(32, 4, 3, 3\), found \(32, 5, 3, 3\)"):
        Pipeline.from_pretrained(bad)


def test_unsupported_config_value_names_file_and_field(tiny_sd1, tmp_path):
    bad = tmp_path / "badcfg"
    shutil.copytree(tiny_sd1, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["class_embed_type"] = "timestep"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unet/config.json.*class_embed_type"):
        Pipeline.from_pretrained(bad)


def test_scheduler_choice_and_with_scheduler(pipe):
    other = pipe.with_scheduler("dpmpp_2m_karras")
    assert other.unet is pipe.unet and other.scheduler.name.startswith("dpmpp_2m")
    with pytest.raises(ValueError, match="nonesuch"):
        pipe.with_scheduler("nonesuch")
