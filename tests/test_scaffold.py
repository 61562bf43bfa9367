"""`diffsteer new-plugin` makes a package that installs and runs through plugins=[...] and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffsteer.cli import main


def test_scaffolded_plugin_installs_and_runs(tmp_path, tiny_sd1):
    assert main(["new-plugin", "boost-guidance", "--directory", str(tmp_path)]) == 0
    pkg = tmp_path / "boost-guidance"
    site = tmp_path / "site"
    # Installed into its own folder, so the test leaves the environment as it found it.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    code = (
        "from diffsteer.pipeline import Pipeline; import sys; "
        f"p = Pipeline.from_pretrained({str(tiny_sd1)!r}); "
        "a = p('a circle', num_inference_steps=2, seed=0, output_type='latent').images; "
        "b = p('a circle', num_inference_steps=2, seed=0, output_type='latent', "
        "plugins=[('boost-guidance', {'strength': 2.0})]).images; "
        "print(float((a - b).abs().max()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) > 1e-3
    png = tmp_path / "x.png"
    subprocess.run([sys.executable, "-m", "diffsteer.cli", "generate", "a circle", "--model", str(tiny_sd1),
                    "--steps", "2", "--seed", "0", "--plugin", "boost-guidance", "--set", "boost-guidance.strength=1.5",
                    "-o", str(png), "-q"], env=env, check=True)
    assert png.exists()
    # the scaffold's own tests pass against the installed package
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_bad_names_and_existing_folders_are_refused(tmp_path):
    from diffsteer import PluginError
    from diffsteer.scaffold import new_plugin

    with pytest.raises(PluginError, match="'Bad Name'.*lower-case words"):
        new_plugin("Bad Name", tmp_path)
    new_plugin("ok", tmp_path)
    with pytest.raises(PluginError, match="'ok'.*already exists"):
        new_plugin("ok", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # nothing half-written beside it
