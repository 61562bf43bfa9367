"""The command line: generate, reproducible PNG metadata, --from, plugin settings errors, plugins list."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffsteer.cli import main, read_parameters


def test_generate_writes_png_with_parameters_and_from_reproduces(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "a.png"
    code = main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "3", "--seed", "5",
                 "--scheduler", "euler_a", "-o", str(out), "-q"])
    assert code == 0 and out.exists()
    params = read_parameters(out)
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["steps"] == 3
    assert params["scheduler"] == "euler_a" and params["model"] == str(tiny_sd1)
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_random_seed_is_recorded(tiny_sd1, tmp_path):
    out = tmp_path / "r.png"
    assert main(["generate", "x", "--model", str(tiny_sd1), "--steps", "1", "-o", str(out), "-q"]) == 0
    assert isinstance(read_parameters(out)["seed"], int)


def test_unknown_plugin_and_bad_setting_print_clear_errors(tiny_sd1, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tiny_sd1), "--steps", "1", "--plugin", "nonesuch",
                 "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "plugin 'nonesuch' is not installed" in err and "Traceback" not in err
    assert main(["generate", "x", "--model", str(tiny_sd1), "--set", "other.scale=1", "-q"]) == 2
    assert "names plugin 'other'" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_sd1), "--plugin", "p", "--set", "p=1", "-q"]) == 2
    assert "NAME.FIELD=VALUE" in capsys.readouterr().err


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "nowhere"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no such folder" in err and "Traceback" not in err


def test_plugins_command_lists_entry_points(tmp_path):
    pkg = tmp_path / "diffsteer_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from diffsteer import Plugin, hookimpl\n"
        "class Demo(Plugin):\n    name = 'demo'\n"
        "    @hookimpl\n    def diffsteer_post_step(self, call, step):\n        pass\n"
    )
    info = tmp_path / "diffsteer_demo-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffsteer-demo\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[diffsteer]\ndemo = diffsteer_demo:Demo\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "diffsteer.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["demo"]["version"] == "0.3.0" and rows["demo"]["hooks"] == ["post_step"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from diffsteer.atomic import atomic_file

    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def _install(tmp_path, monkeypatch, module: str, source: str, entry: str) -> None:
    """A real distribution on sys.path whose entry point (group 'diffsteer') is ``entry``."""
    (tmp_path / module).mkdir(parents=True)
    (tmp_path / module / "__init__.py").write_text(source)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[diffsteer]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


TRAINER_PLUGIN = '''
from pathlib import Path
from diffsteer import Plugin, hookimpl
from diffsteer.commands import TrainCommand

def _args(parser):
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1)

def _run(args):
    Path(args.out).write_text(f"trained {args.steps} steps")
    return 0

class Toy(Plugin):
    name = "toy"

    @staticmethod
    @hookimpl
    def diffsteer_train_commands(register):
        register(TrainCommand("toy", "trains nothing much", _args, _run))
        register(TrainCommand("toy-extra", "another recipe", _args, _run))
'''


def test_train_runs_the_named_plugins_command(tmp_path, monkeypatch, capsys):
    _install(tmp_path, monkeypatch, "diffsteer_toy", TRAINER_PLUGIN, "toy = diffsteer_toy:Toy")
    out = tmp_path / "result.txt"
    assert main(["train", "toy", "--out", str(out), "--steps", "7"]) == 0
    assert out.read_text() == "trained 7 steps"
    with pytest.raises(SystemExit):  # the command's own parser: a missing option is argparse's error
        main(["train", "toy"])
    assert "--out" in capsys.readouterr().err


def test_train_errors_name_the_plugin(tmp_path, monkeypatch, capsys):
    _install(tmp_path, monkeypatch, "diffsteer_toy", TRAINER_PLUGIN, "toy = diffsteer_toy:Toy")
    assert main(["train", "nonesuch", "--out", "x"]) == 2
    assert "'nonesuch' is not installed" in capsys.readouterr().err
    _install(tmp_path / "other", monkeypatch, "diffsteer_flat", "from diffsteer import Plugin\n"
             "class Flat(Plugin):\n    name = 'flat'\n", "flat = diffsteer_flat:Flat")
    assert main(["train", "flat"]) == 2
    assert "plugin 'flat': is installed but offers no train command 'flat'" in capsys.readouterr().err


def test_generate_reports_a_missing_plugin_before_loading_the_model(tmp_path, capsys):
    # The model path does not exist: reaching the loader would report that instead.
    code = main(["generate", "a circle", "--model", str(tmp_path / "no-model"), "--plugin", "nonesuch", "-q",
                 "-o", str(tmp_path / "x.png")])
    assert code == 2
    assert "'nonesuch' is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
