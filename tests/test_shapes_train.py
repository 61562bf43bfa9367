"""`diffsteer train shapes` end to end on a tiny recipe: every stage runs, the result loads, a re-run resumes."""

from __future__ import annotations

import json
import shutil

import torch

from diffsteer.cli import main
from diffsteer.loading.weights import load_state_dict
from diffsteer.pipeline import Pipeline
from diffsteer.loading.pipeline_loader import shipped_model_dir
from diffsteer.shapes.recipe import ShapesRecipe, preset
from diffsteer.shapes.train import time_stage4, train_shapes

TINY = dict(
    n_images=96, vae_block_out_channels=(32, 32, 32), vae_steps=2, vae_batch_size=4,
    text_hidden_size=32, text_layers=1, text_heads=2, unet_block_out_channels=(32, 32, 32),
    unet_attention_heads=2, unet_steps=3, unet_batch_size=4, unet_warmup_steps=0, checkpoint_every=2,
    refine_n_images=64, refine_steps=3, refine_warmup_steps=0,
    bind_n_images=64, bind_steps=3, bind_warmup_steps=0, bind_object_weight=2.0,
)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_stage_runs_and_a_rerun_resumes_to_the_same_model(tmp_path):
    log: list[str] = []
    model = train_shapes(tmp_path / "run", ShapesRecipe(**TINY), log=log.append)
    work = tmp_path / "run" / "work"
    for name in ("data.safetensors", "vae.safetensors", "latents.safetensors", "base-unet.safetensors",
                 "refine-data.safetensors", "refine-data-captions.json", "refine-latents.safetensors",
                 "stage5-model/model_index.json", "bind-data.safetensors", "bind-latents.safetensors"):
        assert (work / name).is_file(), name
    # Stages 5 and 6 draw their own scenes, with more positions and pairs than stage 1.
    refine_captions = json.loads((work / "refine-data-captions.json").read_text())
    bind_captions = json.loads((work / "bind-data-captions.json").read_text())
    assert refine_captions != json.loads((work / "captions.json").read_text())[: len(refine_captions)]
    assert bind_captions != refine_captions[: len(bind_captions)]
    # Stage 6 ships the packaged stage-5 VAE and tokenizer unchanged, and changes the UNet.
    stage5 = _files(work / "stage5-model")
    final = _files(model)
    assert {k: v for k, v in final.items() if k.startswith(("vae/", "tokenizer/"))} == {
        k: v for k, v in stage5.items() if k.startswith(("vae/", "tokenizer/"))}
    assert final["unet/diffusion_pytorch_model.safetensors"] != stage5["unet/diffusion_pytorch_model.safetensors"]

    shipped = load_state_dict(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in shipped.values()} == {torch.float16}
    base = load_state_dict(work / "base-unet.safetensors")
    assert any(not torch.equal(shipped[k], base[k].half()) for k in base), "stages 5-6 changed nothing"

    pipe = Pipeline.from_pretrained(model)
    assert pipe.unet.dtype == torch.float32
    image = pipe("a red circle on the left", num_inference_steps=2, seed=0).images[0]
    assert image.size == (64, 64)

    before = _files(model)
    log.clear()
    train_shapes(tmp_path / "run", ShapesRecipe(**TINY), log=log.append)
    # Every stage was found done: nothing re-rendered, re-trained or re-encoded.
    assert not [line for line in log if "rendered" in line or "vae step" in line or "scaling_factor" in line], log
    assert _files(model) == before


def test_without_stage_6_stage_5_is_the_model(tmp_path):
    model = train_shapes(tmp_path, ShapesRecipe(**{**TINY, "bind_steps": 0}), log=lambda _: None)
    assert (model / "model_index.json").is_file() and not (tmp_path / "work" / "stage5-model").exists()
    assert not (tmp_path / "work" / "bind-data.safetensors").exists()


def test_a_run_folder_refuses_another_recipe(tmp_path, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "recipe.json").write_text(json.dumps(ShapesRecipe(seed=1).model_dump(mode="json")))
    assert main(["train", "shapes", "--out", str(tmp_path), "--refine-steps", "0"]) != 0
    err = capsys.readouterr().err
    assert "recipe.json" in err and "another recipe" in err


def test_the_recipe_refuses_an_unknown_probe_attribute():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="(?s)bind_probe_attributes.*must be some of"):
        ShapesRecipe(bind_probe_attributes=("colour3",))


# v2 at toy size: its own text encoder and UNet, the packaged VAE.
TINY_V2 = dict(
    n_images=96, text_hidden_size=32, text_layers=1, text_heads=2, unet_block_out_channels=(32, 32, 32),
    unet_attention_heads=2, unet_layers_per_block=2, unet_steps=3, unet_batch_size=4, unet_warmup_steps=0,
    checkpoint_every=2, mixed_precision="no",
)


def test_v2_times_stage_4_then_trains_on_the_packaged_vae(tmp_path):
    recipe = preset("v2", **TINY_V2)
    assert recipe.unet_probe_weight > 0 and recipe.unet_object_weight > 0 and recipe.refine_steps == 0
    log: list[str] = []
    seconds = time_stage4(tmp_path, recipe, log.append, steps=3)
    work = tmp_path / "work"
    assert seconds > 0 and any("s per step" in line for line in log)
    # Timing leaves stages 1-3 cached and neither a recipe nor its scratch folder behind.
    assert not (work / "recipe.json").exists() and not (work / "vae.safetensors").exists()
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["tokenizer"]

    log.clear()
    model = train_shapes(tmp_path, recipe, log=log.append)
    assert not [line for line in log if "rendered" in line or "scaling_factor" in line], log
    # The VAE is the packaged one, byte for byte; the UNet has the recipe's shape.
    packaged = _files(shipped_model_dir())
    assert {k: v for k, v in _files(model).items() if k.startswith("vae/")} == {
        k: v for k, v in packaged.items() if k.startswith("vae/")}
    config = json.loads((model / "unet" / "config.json").read_text())
    assert config["layers_per_block"] == 2 and config["block_out_channels"] == [32, 32, 32]
    # Stage 4 trained the caption probe with the models (its head is checkpointed, not shipped).
    ckpt = sorted((work / "unet" / "checkpoints").glob("step-*"))[-1]
    assert any("caption_probe" in name for name in load_state_dict(ckpt / "trainable.safetensors"))
    image = Pipeline.from_pretrained(model)("a red circle and a blue square", num_inference_steps=2, seed=0).images[0]
    assert image.size == (64, 64)


def test_train_shapes_refuses_bad_recipe_options(tmp_path, capsys):
    for argv, wanted in (
        (["--preset", "v9"], "unknown shapes recipe 'v9'"),
        (["--set", "unet_colour=3"], "expected FIELD=JSON with FIELD a recipe field"),
        (["--set", "unet_lr=fast"], "the value is not valid JSON"),
        (["--set", "unet_lr=-1"], "unet_lr"),
        (["--set", "timestep_uniform_share=0.5"], "it needs timestep_sampling='logit_normal'"),
    ):
        assert main(["train", "shapes", "--out", str(tmp_path / "x"), *argv]) != 0, argv
        err = capsys.readouterr().err
        assert wanted in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "x").exists()


def test_from_a_model_runs_stage_6_alone_and_refuses_another_start(tmp_path, capsys):
    """``--from shapes``: the CPU continuation run of docs/shapes-model.md, at toy size. The UNet and text
    encoder change, the VAE and tokenizer are the start's, byte for byte."""
    from diffsteer.loading.pipeline_loader import resolve_model

    out = tmp_path / "run"
    argv = ["train", "shapes", "--out", str(out), "--from", "shapes", "--bind-steps", "2", "--threads", "1",
            "--set", "bind_n_images=64", "--set", "unet_batch_size=4", "--set", "bind_warmup_steps=0",
            "--set", 'timestep_sampling="logit_normal"', "--set", "timestep_logit_mean=0.5"]
    assert main(argv) == 0
    capsys.readouterr()
    # the recipe's timestep sampling reaches the trainer of every stage that ran
    states = [json.loads(p.read_text())["config"] for p in out.glob("work/*/checkpoints/*/trainer_state.json")]
    assert states and all(
        (c["timestep_sampling"], c["timestep_logit_mean"]) == ("logit_normal", 0.5) for c in states
    )
    start, model = resolve_model("shapes"), out / "model"
    for part in ("vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"):
        assert (model / part).read_bytes() == (start / part).read_bytes(), part
    assert (model / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (start / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert not (out / "work" / "stage5-model").exists()  # stages 1-5 never ran
    other = tmp_path / "other-start"
    shutil.copytree(start, other)
    assert main([*argv[:5], str(other), *argv[6:]]) != 0
    err = capsys.readouterr().err
    assert "continues another model; use a new --out" in err and "Traceback" not in err
    assert main(["train", "shapes", "--out", str(tmp_path / "y"), "--from", "shapes", "--bind-steps", "0"]) != 0
    assert "set --bind-steps" in capsys.readouterr().err
