"""Classifier-free guidance in a limited interval of timesteps (``guidance_interval``): which steps are guided,
where the default comes from (the model folder), its record in images, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffsteer import hookimpl
from diffsteer.cli import main, read_parameters
from diffsteer.errors import RequestError
from diffsteer.loading.errors import ModelLoadError
from diffsteer.pipeline import Pipeline
from diffsteer.plugins import Plugin


class Recorder(Plugin):
    """Keeps each main-loop step's branch predictions and the prediction the scheduler was given."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.preds: list[dict[str, torch.Tensor]] = []
        self.guided: list[torch.Tensor] = []
        self.timesteps: list[int] = []

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        self.preds.append({k: v.clone() for k, v in predictions.items()})
        self.timesteps.append(int(step.timestep))

    @hookimpl
    def diffsteer_post_step(self, call, step):
        self.guided.append(step.prediction.clone())


@pytest.fixture(scope="module")
def pipe(tiny_sd1) -> Pipeline:
    return Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", timestep_spacing="trailing")


def run(pipe: Pipeline, **kwargs) -> Recorder:
    rec = Recorder()
    pipe("a red circle", num_inference_steps=10, seed=0, output_type="latent", plugins=[rec], **kwargs)
    return rec


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_steps_outside_the_interval_take_the_conditional_prediction(pipe, rescale):
    rec = run(pipe, guidance_scale=6.0, guidance_interval=(0.2, 0.6), guidance_rescale=rescale)
    inside = [0.2 <= t / 1000 <= 0.6 for t in rec.timesteps]
    assert 0 < sum(inside) < len(inside), rec.timesteps  # both kinds of step are tested
    for preds, guided, guide in zip(rec.preds, rec.guided, inside):
        u, c = preds["uncond"], preds["cond"]
        if guide:
            expected = u + 6.0 * (c - u)
            if rescale:
                dims = [1, 2, 3]
                expected = rescale * expected * (c.std(dim=dims, keepdim=True) / expected.std(dim=dims, keepdim=True)) \
                    + (1 - rescale) * expected
            torch.testing.assert_close(guided, expected, rtol=0, atol=1e-6)
        else:
            # bit-equal: no guidance and no rescale, the conditional branch as it came out of the UNet
            assert torch.equal(guided, c)


def test_the_full_interval_is_plain_guidance_bit_for_bit(pipe):
    plain = pipe("a red circle", num_inference_steps=4, seed=1, output_type="latent").images
    full = pipe("a red circle", num_inference_steps=4, seed=1, output_type="latent", guidance_interval=(0, 1)).images
    assert pipe.guidance_interval == (0.0, 1.0)
    assert torch.equal(plain, full)


def test_an_interval_changes_the_result_and_is_recorded(pipe):
    out = pipe("a red circle", num_inference_steps=4, seed=1, output_type="latent", guidance_interval=(0.0, 0.5))
    plain = pipe("a red circle", num_inference_steps=4, seed=1, output_type="latent")
    assert not torch.equal(out.images, plain.images)
    assert out.parameters["guidance_interval"] == [0.0, 0.5]
    assert plain.parameters["guidance_interval"] == [0.0, 1.0]


def test_the_model_folder_recommends_the_default_and_save_keeps_it(pipe, tiny_sd1, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_diffsteer_guidance_interval"] = [0.0, 0.5]
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = Pipeline.from_pretrained(folder, scheduler="ddim", timestep_spacing="trailing")
    assert loaded.guidance_interval == (0.0, 0.5)
    assert loaded.with_scheduler("euler").guidance_interval == (0.0, 0.5)
    kwargs = dict(num_inference_steps=4, seed=1, output_type="latent")
    assert torch.equal(loaded("a red circle", **kwargs).images,
                       pipe("a red circle", guidance_interval=(0.0, 0.5), **kwargs).images)
    # the call's own interval wins over the model's
    assert torch.equal(loaded("a red circle", guidance_interval=(0, 1), **kwargs).images,
                       pipe("a red circle", **kwargs).images)
    loaded.save_pretrained(tmp_path / "saved")
    assert Pipeline.from_pretrained(tmp_path / "saved").guidance_interval == (0.0, 0.5)
    pipe.save_pretrained(tmp_path / "plain")
    assert "_diffsteer_guidance_interval" not in json.loads((tmp_path / "plain" / "model_index.json").read_text())


@pytest.mark.parametrize("value", [[0.5], [0.2, "x"], [0.0, 1.5]])
def test_a_bad_interval_in_the_model_folder_names_the_file(tiny_sd1, tmp_path, value):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_diffsteer_guidance_interval"] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model_index\.json: _diffsteer_guidance_interval"):
        Pipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "value, message",
    [
        ((0.7, 0.2), r"guidance_interval lo must not exceed hi, got \(0.7, 0.2\)"),
        ("0,0.6", "guidance_interval must be two numbers"),
        ((0.0,), "guidance_interval must be two numbers"),
        ((0.0, 2.0), r"guidance_interval hi must be in \[0, 1\], got 2.0"),
        ((float("nan"), 0.5), "guidance_interval lo must be a finite number"),
    ],
)
def test_bad_intervals_get_clear_errors(pipe, value, message):
    with pytest.raises(RequestError, match=message):
        pipe("a circle", num_inference_steps=1, guidance_interval=value)


def test_cli_takes_records_and_reruns_the_interval(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["--model", str(tiny_sd1), "--steps", "3", "--seed", "2", "--scheduler", "ddim", "-q"]
    assert main(["generate", "a red circle", *args, "--guidance-interval", "0,0.5", "-o", str(out)]) == 0
    assert read_parameters(out)["guidance_interval"] == [0.0, 0.5]
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(out), "-o", str(again), "-q"]) == 0
    assert read_parameters(again)["guidance_interval"] == [0.0, 0.5]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    code = main(["generate", "x", *args, "--guidance-interval", "0.6,0.1", "-o", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert code != 0 and "guidance_interval lo must not exceed hi" in err and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_eval_reports_and_takes_the_interval(capsys):
    small = ["eval", "shapes", "--single", "1", "--double", "0", "--position", "0", "-q"]
    assert main(small) == 0
    assert "CFG 7.5 where t/T is in [0, 0.6] (the model's own)" in capsys.readouterr().err
    assert main([*small, "--guidance-interval", "0,1"]) == 0
    assert "CFG 7.5 where t/T is in [0, 1]\n" in capsys.readouterr().err
    assert main([*small, "--guidance-interval", "0.9,0.1"]) != 0
    err = capsys.readouterr().err
    assert "--guidance-interval lo must not exceed hi" in err and "Traceback" not in err


def test_from_an_image_recorded_before_the_interval_guides_every_step(tmp_path):
    """Images made before calls recorded ``guidance_interval`` were guided at every step; ``--from`` redraws them so,
    although the shipped model now recommends an interval (a model named, not a folder, is not hashed)."""
    from diffsteer.image_files import save_image

    old = tmp_path / "old.png"
    args = ["--model", "shapes", "--steps", "2", "--seed", "4", "-q"]
    assert main(["generate", "a red circle", *args, "--guidance-interval", "0,1", "-o", str(old)]) == 0
    params = read_parameters(old)
    del params["guidance_interval"]
    save_image(Image.open(old), old, params)  # as an older diffsteer wrote it
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(old), "-o", str(again), "-q"]) == 0
    assert read_parameters(again)["guidance_interval"] == [0.0, 1.0]
    assert np.array_equal(np.asarray(Image.open(old)), np.asarray(Image.open(again)))
    # the model's own interval would have drawn another image: the test can tell
    other = tmp_path / "other.png"
    assert main(["generate", "a red circle", *args, "-o", str(other)]) == 0
    assert not np.array_equal(np.asarray(Image.open(old)), np.asarray(Image.open(other)))
