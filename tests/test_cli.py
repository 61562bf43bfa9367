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
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DIFFSTEER_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "diffsteer.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["demo"]["version"] == "0.3.0" and rows["demo"]["hooks"] == ["post_step"]
    assert rows["demo"]["contract"] == "1.0"  # declares none
    text = subprocess.run([sys.executable, "-m", "diffsteer.cli", "plugins"], capture_output=True, text=True,
                          env=env, check=True).stdout
    assert any(line.startswith("demo ") and "contract 1.0" in line for line in text.splitlines()), text


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


def _outline(path):
    from diffsteer.shapes import Scene, ShapeObject, render_outline

    render_outline(Scene([ShapeObject("circle", "red", 0.3, 0.5, 0.2)], "white")).save(path)


def test_from_finds_a_control_image_from_another_folder_refuses_a_changed_one_and_restores_a_lost_one(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffsteer_controlnet")
    first, second = tmp_path / "made-here", tmp_path / "rerun-here"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    _outline(first / "outline.png")
    assert main(["generate", "a red circle", "--steps", "1", "--seed", "2", "--plugin", "controlnet",
                 "--set", "controlnet.model=shapes-outline", "--set", "controlnet.image=outline.png",
                 "-o", "a.png", "-q"]) == 0
    params = read_parameters(first / "a.png")
    image = str((first / "outline.png").resolve())
    assert params["plugins"][0]["settings"]["image"] == image  # recorded absolute, with its hash
    assert params["files"][image].startswith("sha256:") and len(params["files"][image]) == 71
    monkeypatch.chdir(second)
    assert main(["generate", "--from", str(first / "a.png"), "-o", "b.png", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(first / "a.png")), np.asarray(Image.open(second / "b.png")))

    recorded = params["files"][image]
    Image.open(first / "outline.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first / "outline.png")
    capsys.readouterr()
    assert main(["generate", "--from", str(first / "a.png"), "-o", "c.png", "-q"]) == 2
    err = capsys.readouterr().err
    now = "sha256:" + __import__("hashlib").sha256((first / "outline.png").read_bytes()).hexdigest()
    assert f"error: {image}: changed since" in err and recorded in err and now in err
    assert not (second / "c.png").exists()

    # Gone altogether (say, the PNG was sent elsewhere): the copy embedded in a.png stands in for it.
    monkeypatch.setenv("DIFFSTEER_CACHE_DIR", str(tmp_path / "cache"))
    (first / "outline.png").unlink()
    assert main(["generate", "--from", str(first / "a.png"), "-o", "d.png", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(first / "a.png")), np.asarray(Image.open(second / "d.png")))
    restored = read_parameters(second / "d.png")["plugins"][0]["settings"]["image"]
    assert restored.startswith(str(tmp_path / "cache" / "inputs")) and params["files"][image] in \
        read_parameters(second / "d.png")["files"].values()


def test_from_applies_overrides_and_records_them(tiny_sd1, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "2", "--seed", "1", "-o", str(a),
                 "-q"]) == 0
    assert main(["generate", "--from", str(a), "--seed", "9", "--steps", "1", "-o", str(b), "-q"]) == 0
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "1", "--seed", "9", "-o", str(c),
                 "-q"]) == 0
    params = read_parameters(b)
    assert params["seed"] == 9 and params["steps"] == 1 and params["prompt"] == "a red circle"
    assert params["from"] == {"image": str(a.resolve()), "overrides": ["seed", "steps"]}
    assert np.array_equal(np.asarray(Image.open(b)), np.asarray(Image.open(c)))  # the override took effect


def test_from_refuses_a_changed_model_folder(tiny_sd1, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(model), "--steps", "1", "--seed", "1", "-o", str(out),
                 "-q"]) == 0
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{"steps_offset": 0, ', 1))
    capsys.readouterr()
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "b.png"), "-q"]) == 2
    assert f"{model}: changed since" in capsys.readouterr().err
    shutil.rmtree(model)  # a model is never embedded: gone is an error naming it
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "b.png"), "-q"]) == 2
    assert f"{model}: recorded in {out} but missing" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_other_formats_are_written_as_named_and_carry_the_parameters(tiny_sd1, tmp_path, suffix):
    out = tmp_path / f"a{suffix}"
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "1", "--seed", "4", "-o", str(out),
                 "-q"]) == 0
    with Image.open(out) as im:
        assert im.format == {".jpg": "JPEG", ".webp": "WEBP"}[suffix]
    assert read_parameters(out)["seed"] == 4
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "b.png"), "-q"]) == 0
    assert read_parameters(tmp_path / "b.png")["seed"] == 4


def test_img2img_from_the_command_line(tiny_sd1, tmp_path, capsys):
    start = tmp_path / "start.png"
    Image.fromarray(np.full((40, 36, 3), 200, dtype=np.uint8)).save(start)
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "4", "--seed", "0", "--image",
                 str(start), "--strength", "0.5", "-o", str(out), "-q"]) == 0
    params = read_parameters(out)
    assert params["image"] == str(start.resolve()) and params["strength"] == 0.5
    assert Image.open(out).size == (36, 40)  # the start image's size, rounded down to the VAE's multiple
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "b.png"), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "b.png")))
    # a lighter start image gives a lighter result: the image is really the starting point
    Image.fromarray(np.full((40, 36, 3), 30, dtype=np.uint8)).save(tmp_path / "dark.png")
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "4", "--seed", "0", "--image",
                 str(tmp_path / "dark.png"), "--strength", "0.5", "-o", str(tmp_path / "d.png"), "-q"]) == 0
    assert np.asarray(Image.open(out)).mean() > np.asarray(Image.open(tmp_path / "d.png")).mean()


def test_quiet_silences_every_bar_and_loud_shows_them(tiny_sd1, tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "2", "-o", str(tmp_path / "q.png"),
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "denoising" not in err
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "2", "-o", str(tmp_path / "l.png")
                 ]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" in err and "denoising" in err  # -q did not switch the loading bar off for good


def test_two_instances_of_one_plugin_take_their_own_settings(tiny_sd1, tmp_path, capsys):
    pytest.importorskip("diffsteer_sega")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    concept = '[{"prompt": "%s", "warmup_steps": 0}]'
    assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "2", "--seed", "1",
                 "--plugin", "sega#1", "--plugin", "sega#2", "--set", "sega#1.concepts=" + concept % "red",
                 "--set", "sega#2.concepts=" + concept % "blue", "-o", str(a), "-q"]) == 0
    plugins = read_parameters(a)["plugins"]
    assert [(p["name"], p["label"], p["settings"]["concepts"][0]["prompt"]) for p in plugins] == [
        ("sega", "sega#1", "red"), ("sega", "sega#2", "blue")]
    assert main(["generate", "--from", str(a), "-o", str(b), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    # --set under --from changes one recorded instance, found by its label
    c = tmp_path / "c.png"
    assert main(["generate", "--from", str(a), "--set", "sega#2.concepts=" + concept % "green", "-o", str(c),
                 "-q"]) == 0
    assert [p["settings"]["concepts"][0]["prompt"] for p in read_parameters(c)["plugins"]] == ["red", "green"]
    assert main(["generate", "--from", str(a), "--set", "sega.concepts=[]", "-o", str(c), "-q"]) == 2
    assert "is ambiguous" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["render", "outline", "depth", "mask"])
def test_shapes_command_draws_control_images(kind, tmp_path):
    from diffsteer.shapes import Scene, render, render_depth, render_mask, render_outline, scene_from_caption

    out = tmp_path / f"{kind}.png"
    assert main(["shapes", kind, "a red circle on the left", "-o", str(out), "--size", "96", "--seed", "3"]) == 0
    draw = {"render": render, "outline": render_outline, "depth": render_depth, "mask": render_mask}[kind]
    expected = draw(scene_from_caption("a red circle on the left", 3), size=96).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert isinstance(scene_from_caption("a red circle on the left", 3), Scene)


def test_shapes_command_rejects_a_caption_without_objects(tmp_path, capsys):
    assert main(["shapes", "outline", "hello world", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "a caption must describe one or two objects" in err and not list(tmp_path.iterdir())


def test_train_without_a_name_lists_the_recipes(capsys):
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert "  shapes " in out
    from diffsteer.plugins import installed_plugins

    for name in ("textual-inversion", "controlnet"):
        if name in installed_plugins():
            assert f"  {name} " in out


def test_every_option_help_states_its_default(capsys):
    from diffsteer.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings or action.required or action.default in (False, "==SUPPRESS=="):
                continue
            assert "default" in command.formatter_class("x")._get_help_string(action), (name, action.option_strings)
    for name in ("generate", "eval", "shapes", "plugins", "new-plugin"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "(default: " in text or name == "plugins", name


def _demo_plugin(tmp_path, hooks: str) -> dict:
    pkg = tmp_path / "diffsteer_demo"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("from diffsteer import Plugin, hookimpl\nclass Demo(Plugin):\n    name = 'demo'\n"
                                     + hooks)
    info = tmp_path / "diffsteer_demo-0.3.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffsteer-demo\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[diffsteer]\ndemo = diffsteer_demo:Demo\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "DIFFSTEER_CACHE_DIR": str(tmp_path / "cache")}


LIST_AND_SAY_IF_TORCH_LOADED = (
    "import io, json, sys, contextlib\nfrom diffsteer.cli import main\nout = io.StringIO()\n"
    "with contextlib.redirect_stdout(out):\n    main(['plugins', '--json'])\n"
    "rows = {r['name']: r for r in json.loads(out.getvalue())}\n"
    "print(json.dumps({'demo': rows['demo'], 'torch': 'torch' in sys.modules}))\n"
)


def test_plugins_listing_is_cached_until_a_plugin_changes(tmp_path):
    post = "    @hookimpl\n    def diffsteer_post_step(self, call, step):\n        pass\n"
    env = _demo_plugin(tmp_path, post)

    def listing() -> dict:
        res = subprocess.run([sys.executable, "-c", LIST_AND_SAY_IF_TORCH_LOADED], capture_output=True, text=True,
                             env=env, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    first = listing()
    assert first["demo"]["hooks"] == ["post_step"] and first["torch"]  # cold: the plugin was imported
    again = listing()
    assert again["demo"]["hooks"] == ["post_step"] and not again["torch"]  # warm: nothing heavy imported
    pre = "    @hookimpl\n    def diffsteer_pre_step(self, call, step):\n        pass\n"
    _demo_plugin(tmp_path, post + pre + "# changed\n")
    assert listing()["demo"]["hooks"] == ["post_step", "pre_step"]  # an edited plugin is read again
    _demo_plugin(tmp_path, "    raise RuntimeError('broken on import')\n")
    broken = listing()["demo"]
    assert broken["hooks"] == [] and "broken on import" in broken["error"]
    assert "broken on import" in listing()["demo"]["error"]  # errors are not cached


def test_importing_the_cli_does_not_import_torch():
    res = subprocess.run([sys.executable, "-c", "import sys, diffsteer, diffsteer.cli; "
                          "from diffsteer.cli import build_parser; build_parser(); print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_a_short_eval_says_which_words_it_leaves_out(tiny_sd1, capsys):
    from diffsteer.shapes.benchmark import eval_prompts
    from diffsteer.shapes_cli import eval_coverage_notes

    assert main(["eval", "shapes", "--model", str(tiny_sd1), "--single", "4", "--double", "0", "--position", "0",
                 "--steps", "1", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: --single 4 does not cover the vocabulary (no colours: blue, green, yellow; no shapes: triangle)" \
        in err
    # the count it recommends does cover everything, and the default counts need no warning
    enough = int(err.split("--single ")[-1].split()[0])
    colours = {w for p in eval_prompts(enough, 0, 0) for w in ("red", "green", "blue", "yellow") if w in p}
    assert colours == {"red", "green", "blue", "yellow"} and not eval_coverage_notes(enough, 0, 0)
    assert eval_coverage_notes(144, 72, 96) == []


def test_threads_sets_torchs_thread_count(tiny_sd1, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["generate", "a red circle", "--model", str(tiny_sd1), "--steps", "1", "--threads", "2",
                     "-o", str(tmp_path / "t.png"), "-q"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_shapes_command_names_the_words_it_ignores(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["shapes", "render", "a big purple elephant on the left on a white background", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the shapes world does not know 'elephant'" in err and "'big'" not in err
    assert out.is_file()


def test_from_refuses_an_image_made_from_prompt_embeddings(tmp_path, capsys):
    from PIL import Image as PILImage

    from diffsteer.image_files import save_image

    made = tmp_path / "embeds.png"
    save_image(PILImage.new("RGB", (8, 8)), made, {"prompt": None, "prompt_embeds": "<tensor 1x77x32 float32>"})
    assert main(["generate", "--from", str(made), "-o", str(tmp_path / "again.png")]) == 2
    err = capsys.readouterr().err
    assert "generated from prompt embeddings" in err and "Traceback" not in err
    assert not (tmp_path / "again.png").exists()
