"""Training a ControlNet on the core loop (tiny models): only the ControlNet trains, the export loads in
diffsteer and in diffusers (same tensors, same residuals), resume ends where an uninterrupted run ends,
and ``diffsteer train controlnet`` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from diffsteer import Pipeline
from diffsteer.cli import main
from diffsteer.schedulers import make_scheduler
from diffsteer.training import DiffusionTrainer, InMemoryData, TrainConfig
from diffsteer_controlnet import ControlNetModel, load_controlnet
from diffsteer_controlnet.train import ControlNetTraining, default_embedding_channels

SIZE = 32  # tiny model: 16x16 latents, VAE factor 2


def make_trainer(tiny_sd1, out, steps, seed=0):
    pipe = Pipeline.from_pretrained(tiny_sd1)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(1)
    data = InMemoryData(torch.randn(8, 4, 16, 16, generator=g), [f"a red circle {i}" for i in range(8)],
                        control=(torch.rand(8, 1, SIZE, SIZE, generator=g) > 0.5).to(torch.uint8) * 255)
    trainer = DiffusionTrainer(
        unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=make_scheduler("ddpm", pipe.scheduler.config), data=data, out_dir=out,
        config=TrainConfig(steps=steps, batch_size=4, lr=1e-3, checkpoint_every=2, progress=False, caption_dropout=0.5),
        plugins=[ControlNetTraining(net)],
    )
    return pipe, net, trainer


def test_only_the_controlnet_trains_and_the_export_loads_everywhere(tiny_sd1, tmp_path):
    from diffusers import ControlNetModel as DiffusersControlNet

    pipe, net, trainer = make_trainer(tiny_sd1, tmp_path / "run", steps=3)
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in net.state_dict().items()}
    result = trainer.train()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    moved = [k for k, v in net.state_dict().items() if not torch.equal(v, cn_before[k])]
    assert any(k.startswith("controlnet_down_blocks.") for k in moved) and "controlnet_mid_block.weight" in moved
    assert all(torch.isfinite(torch.tensor(result.losses)))

    folder = result.export / "controlnet"
    ours = load_controlnet(folder)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in net.state_dict().items())
    theirs = DiffusersControlNet.from_pretrained(folder)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    x, c, h = torch.randn(2, 4, 16, 16), torch.rand(2, 3, SIZE, SIZE), torch.randn(2, 77, 32)
    with torch.no_grad():
        a = theirs(x, 500, h, c, return_dict=False)
        b = ours(x, 500, h, c)
    assert max(float((p - q).abs().max()) for p, q in zip([*a[0], a[1]], [*b[0], b[1]])) <= 1e-5


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_sd1, tmp_path):
    _, whole, trainer = make_trainer(tiny_sd1, tmp_path / "whole", steps=4)
    trainer.train()
    _, _, first = make_trainer(tiny_sd1, tmp_path / "split", steps=2)
    first.train()
    _, resumed, second = make_trainer(tiny_sd1, tmp_path / "split", steps=4)
    second.train(resume=True)
    assert second.losses[:2] == first.losses
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


def test_default_embedding_channels_match_the_vae_factor():
    assert default_embedding_channels(8) == (16, 32, 96, 256)  # SD: diffusers' default
    assert default_embedding_channels(4) == (16, 32, 96)  # the shapes model
    assert default_embedding_channels(2) == (16, 32)


def test_train_command_end_to_end(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "controlnet", "--out", str(out), "--model", str(tiny_sd1), "--images", "8", "--steps", "2",
            "--batch-size", "2", "--checkpoint-every", "1", "--save-dtype", "fp16", "--conditioning", "mask"]
    assert main(args) == 0
    net = load_controlnet(out / "final")  # the export folder; its controlnet/ subfolder is found
    assert net.config.conditioning_embedding_out_channels == (16, 32)
    assert json.loads((out / "final" / "training.json").read_text())["step"] == 2
    assert main(args[:-4] + ["--steps", "3", "--conditioning", "mask"]) == 0  # resumes from step 2
    assert "done: 3 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "controlnet", "--help"])
    assert "--conditioning" in capsys.readouterr().out
