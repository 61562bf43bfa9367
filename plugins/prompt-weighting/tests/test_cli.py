"""The plugin by entry-point name, from Python and from the ``diffsteer`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsteer_prompt_weighting import PromptWeighting


def test_loads_by_entry_point_name(tiny_pipe):
    kw = dict(num_inference_steps=2, seed=0, output_type="latent")
    prompt = "a red++ circle and a (blue square)0.8"
    by_name = tiny_pipe(prompt, plugins=["prompt-weighting"], **kw)
    by_instance = tiny_pipe(prompt, plugins=[PromptWeighting()], **kw)
    assert torch.equal(by_name.images, by_instance.images)
    assert by_name.parameters["plugins"] == [
        {"name": "prompt-weighting",
         "settings": {"syntax": "compel", "truncate_long_prompts": False, "min_chunks": 1, "normalize_emphasis": True}}
    ]
    pair = tiny_pipe("a (red:1.5) circle", plugins=[("prompt-weighting", {"syntax": "a1111"})], **kw)
    instance = tiny_pipe("a (red:1.5) circle", plugins=[PromptWeighting(syntax="a1111")], **kw)
    assert torch.equal(pair.images, instance.images)


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("diffsteer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffsteer.cli"]


def test_cli_generate_with_a1111_syntax(tiny_sd1, tiny_pipe, tmp_path):
    out = tmp_path / "red.png"
    cmd = [*_cli(), "generate", "a (red:1.5) circle", "--plugin", "prompt-weighting",
           "--set", "prompt-weighting.syntax=a1111", "--model", str(tiny_sd1), "--scheduler", "ddim",
           "--steps", "2", "--seed", "3", "-o", str(out), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    params = json.loads(Image.open(out).info["diffsteer"])
    assert params["prompt"] == "a (red:1.5) circle"
    assert params["plugins"] == [
        {"name": "prompt-weighting",
         "settings": {"syntax": "a1111", "truncate_long_prompts": False, "min_chunks": 1, "normalize_emphasis": True}}
    ]
    # the same pixels as the Python API, and different ones from the unweighted prompt
    api = tiny_pipe("a (red:1.5) circle", num_inference_steps=2, seed=3, output_type="np",
                    plugins=[PromptWeighting(syntax="a1111")]).images[0]
    plain = tiny_pipe("a red circle", num_inference_steps=2, seed=3, output_type="np").images[0]
    png = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255
    assert np.abs(png - api).max() <= 1 / 255 + 1e-6
    assert np.abs(api - plain).max() > 0


def test_cli_reports_a_bad_prompt_without_a_traceback(tiny_sd1, tmp_path):
    out = tmp_path / "bad.png"
    cmd = [*_cli(), "generate", "a (red circle", "--plugin", "prompt-weighting", "--model", str(tiny_sd1),
           "--steps", "2", "-o", str(out), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "error: plugin 'prompt-weighting': cannot parse the prompt: unbalanced '('" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    cmd = [*_cli(), "generate", "a red circle", "--plugin", "prompt-weighting", "--set",
           "prompt-weighting.syntax=rst", "--model", str(tiny_sd1), "--steps", "2", "-o", str(out), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "prompt-weighting.syntax:" in res.stderr and not out.exists()


def test_listed_by_diffsteer_plugins():
    res = subprocess.run([*_cli(), "plugins", "--json"], capture_output=True, text=True, timeout=300, check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["prompt-weighting"]["distribution"] == "diffsteer-prompt-weighting"
    assert rows["prompt-weighting"]["hooks"] == ["encode_prompt", "setup"]
