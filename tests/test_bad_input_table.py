"""Bad input, one row each: the message it must show and the exit status, through the CLI and the API alike.

Every CLI row checks that stderr holds no traceback and that no file was left behind; every API row that the
same input raises a :class:`~diffsteer.DiffsteerError` with the same message. Warnings (input that runs but is
probably not meant) are rows too: exit 0, a ``warning:`` line on stderr, a :class:`DiffsteerWarning` from the API.
The model is the tiny random one (32x32), with one step and one thread, so nothing here depends on its pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsteer import DiffsteerError
from diffsteer.cli import main, read_parameters
from diffsteer.errors import DiffsteerWarning

TI_WEDGE = "wedge"  # the embedding shipped with the textual-inversion plugin
HUGE = str(2**20)  # a million pixels a side: no machine holds its activations
LONG = "a red circle on the left and " * 12 + "a blue square"
P = "a red circle"

# (id, CLI arguments after `generate`, API keyword arguments or None, message fragment, exit status)
ERRORS = [
    ("negative-width", [P, "--width", "-64"], dict(width=-64), "width must be at least 1, got -64", 2),
    ("negative-height", [P, "--height", "-64"], dict(height=-64), "height must be at least 1, got -64", 2),
    ("zero-width", [P, "--width", "0"], dict(width=0), "width must be at least 1, got 0", 2),
    ("width-not-multiple", [P, "--width", "31"], dict(width=31), "width must be a multiple of", 2),
    ("width-as-text", None, dict(width="64"), "width must be an integer, got '64' (str)", None),
    ("prompt-none", None, dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None", None),
    ("prompt-number", None, dict(prompt=3), "prompt must be a string or a non-empty list of strings, got 3", None),
    ("seed-overflow", [P, "--seed", "1180591620717411303424"], dict(seed=1180591620717411303424),
     "seed must be in [0, 18446744073709551615], got 1180591620717411303424", 2),
    ("seed-negative", [P, "--seed", "-1"], dict(seed=-1), "seed must be in [0, 18446744073709551615], got -1", 2),
    ("guidance-negative", [P, "--guidance-scale", "-3"], dict(guidance_scale=-3),
     "guidance_scale must be at least 0, got -3", 2),
    ("guidance-nan", [P, "--guidance-scale", "nan"], dict(guidance_scale=float("nan")),
     "guidance_scale must be a finite number, got nan", 2),
    ("guidance-inf", [P, "--guidance-scale", "inf"], dict(guidance_scale=float("inf")),
     "guidance_scale must be a finite number, got inf", 2),
    ("rescale-out-of-range", [P, "--guidance-rescale", "2"], dict(guidance_rescale=2.0),
     "guidance_rescale must be in [0, 1], got 2", 2),
    ("steps-zero", [P, "--steps", "0"], dict(num_inference_steps=0), "num_inference_steps must be at least 1", 2),
    ("eta-nan", [P, "--eta", "nan"], dict(eta=float("nan")), "eta must be a finite number", 2),
    ("clip-skip-too-deep", [P, "--clip-skip", "9"], dict(clip_skip=9),
     "clip_skip is 9, out of range for a text encoder with 3 layers: give 0 to 2", 2),
    ("size-beyond-memory", [P, "--height", HUGE, "--width", HUGE], dict(height=2**20, width=2**20),
     f"{HUGE}x{HUGE} needs at least", 2),
    ("ddim-inverse", [P, "--scheduler", "ddim_inverse"], "ddim_inverse",
     "'ddim_inverse' runs DDIM backwards", 2),
    ("unknown-scheduler", [P, "--scheduler", "nonesuch"], None, "unknown scheduler 'nonesuch'", 2),
    ("set-malformed-json", [P, "--plugin", "sega", "--set",
                            'sega.concepts=[{"prompt": "red", warmup_steps: 2}]'], None,
     "the value starts like JSON but does not parse: Expecting property name enclosed in double quotes", 2),
    ("set-without-plugin", [P, "--set", "sega.concepts=[]"], None, "names plugin 'sega', which no --plugin", 2),
    ("set-without-field", [P, "--plugin", "sega", "--set", "sega=1"], None, "--set expects NAME.FIELD=VALUE", 2),
    ("plugin-twice-untagged", [P, "--plugin", "sega", "--plugin", "sega"], None,
     "--plugin 'sega' is given twice; tag each instance", 2),
    ("plugin-not-installed", [P, "--plugin", "nonesuch"], None, "plugin 'nonesuch' is not installed", 2),
    ("textual-inversion-empty", [P, "--plugin", "textual-inversion"], None,
     "textual-inversion.embeddings: is empty", 2),
    ("output-folder", [P, "-o", "{tmp}"], None, "is a folder; name an image file inside it", 2),
    ("output-suffix", [P, "-o", "{tmp}/out.bmp"], None, "cannot write .bmp; use one of .png, .jpg, .jpeg, .webp",
     2),
    ("output-parent-missing", [P, "-o", "{tmp}/no/out.png"], None, "does not exist", 2),
    ("no-prompt", [], None, "give a PROMPT, or --from IMAGE", 2),
    ("image-missing", [P, "--image", "{tmp}/none.png"], None, "--image: no such file", 2),
    ("from-missing", ["--from", "{tmp}/none.png"], None, "cannot read the image", 2),
    ("from-not-an-image", ["--from", "{model}/model_index.json"], None, "cannot read the image", 2),
    ("image-not-an-image", [P, "--image", "{model}/model_index.json"], "{model}/model_index.json",
     "model_index.json: cannot read the image", 2),
    ("image-wrong-type", None, 3, "image must be a PIL image, a path, a numpy array or a tensor, got int", None),
    ("image-uint8-array", None, "uint8", "image as a numpy array must hold values in [0, 1]", None),
]

# --from with a recorded image ({png}): what may and may not go with it
FROM_ERRORS = [
    ("from-with-prompt", [P, "--from", "{png}"], "--from re-runs a recorded generation; give no PROMPT with it"),
    ("from-with-plugin", ["--from", "{png}", "--plugin", "sega"], "--plugin cannot add to them"),
    ("from-set-unrecorded", ["--from", "{png}", "--set", "sega.concepts=[]"],
     "names no plugin recorded in"),
    ("from-bad-override", ["--from", "{png}", "--width", "-64"], "width must be at least 1, got -64"),
]

# argparse's own errors: a usage line and exit 2, before anything runs
USAGE = [
    ("width-not-a-number", [P, "--width", "abc"], "argument --width: invalid int value: 'abc'"),
    ("threads-zero", [P, "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("dtype-unknown", [P, "--dtype", "fp8"], "argument --dtype: must be one of fp32, bf16, fp16"),
]

# (id, prompt, extra CLI arguments, API keyword arguments, warning fragment)
WARNINGS = [
    ("long-prompt", LONG, [], {}, "tokens long and the text encoder reads 77: the end is cut off (the "
     "'prompt-weighting' plugin"),
    ("a1111-weights", "a (red:1.6) circle", [], {}, "weighting syntax '(red:1.6)', which is read as plain text "
     "without the 'prompt-weighting' plugin"),
    ("compel-weights", "a red++ circle", [], {}, "weighting syntax 'd++'"),
    ("unknown-words", "a purple elephant", [], {}, "this model was not trained on 'purple', 'elephant'"),
    ("undefined-token", "a red <wedge>", [], {}, "<wedge>, which no plugin defines"),
    ("size-far-from-native", "a red circle", ["--height", "128", "--width", "128"], dict(height=128, width=128),
     "128x128 is 16x the area of this model's native 32x32"),
]


def _fill(args: list[str], tmp: Path, model: Path, png: Path = Path("none.png")) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{model}", str(model)).replace("{png}", str(png)) for a in args]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


CLI_ERRORS = [c for c in ERRORS if c[1] is not None]  # the others are types the CLI's options cannot express


@pytest.mark.parametrize("case", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_error_rows(case, tiny_sd1, workdir, capsys):
    name, argv, _, fragment, status = case
    steps = [] if "--steps" in argv else ["--steps", "1"]
    code, err = _run(["generate", *_fill(argv, workdir, tiny_sd1), "--model", str(tiny_sd1), *steps, "-q"], capsys)
    assert code == status, err
    assert fragment in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert list(workdir.iterdir()) == [], "a failed run left a file behind"


@pytest.mark.parametrize("case", [c for c in ERRORS if c[2] is not None], ids=[c[0] for c in ERRORS if c[2]])
def test_api_error_rows(case, tiny_pipe, tiny_sd1):
    name, _, kwargs, fragment, _ = case
    pipe = tiny_pipe.with_scheduler(kwargs) if kwargs == "ddim_inverse" else tiny_pipe
    if name.startswith("image-"):  # the row's value is the img2img image
        image = {"uint8": np.full((32, 32, 3), 200, dtype=np.uint8)}.get(kwargs, kwargs)
        kwargs = {"image": _fill([image], tiny_sd1, tiny_sd1)[0] if isinstance(image, str) else image}
    call = {"prompt": P, "num_inference_steps": 1, "seed": 0, **(kwargs if isinstance(kwargs, dict) else {})}
    with pytest.raises(DiffsteerError) as info:
        pipe(**call)
    assert fragment in str(info.value)


@pytest.fixture(scope="module")
def recorded_png(tiny_sd1, tmp_path_factory):
    png = tmp_path_factory.mktemp("recorded") / "a.png"
    assert main(["generate", P, "--model", str(tiny_sd1), "--steps", "1", "--seed", "0", "-o", str(png), "-q"]) == 0
    return png


@pytest.mark.parametrize("case", FROM_ERRORS, ids=[c[0] for c in FROM_ERRORS])
def test_cli_from_error_rows(case, recorded_png, tiny_sd1, workdir, capsys):
    name, argv, fragment = case
    code, err = _run(["generate", *_fill(argv, workdir, tiny_sd1, recorded_png), "-q"], capsys)
    assert code == 2 and fragment in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("case", USAGE, ids=[c[0] for c in USAGE])
def test_cli_usage_rows(case, tiny_sd1, workdir, capsys):
    name, argv, fragment = case
    code, err = _run(["generate", *argv, "--model", str(tiny_sd1), "-q"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("case", WARNINGS, ids=[c[0] for c in WARNINGS])
def test_cli_warning_rows(case, tiny_sd1, workdir, capsys):
    name, prompt, extra, _, fragment = case
    code, err = _run(["generate", prompt, *extra, "--model", str(tiny_sd1), "--steps", "1", "--seed", "0",
                      "-o", "w.png", "-q"], capsys)
    assert code == 0, err
    assert "warning: " in err and fragment in err, err
    assert "Traceback" not in err
    assert read_parameters(workdir / "w.png")["seed"] == 0


@pytest.mark.parametrize("case", WARNINGS, ids=[c[0] for c in WARNINGS])
def test_api_warning_rows(case, tiny_pipe):
    name, prompt, _, kwargs, fragment = case
    with pytest.warns(DiffsteerWarning) as record:
        tiny_pipe(prompt, num_inference_steps=1, seed=0, output_type="latent", **kwargs)
    assert any(fragment in str(w.message) for w in record), [str(w.message) for w in record]


def test_the_right_plugin_silences_its_warning(tiny_pipe):
    """Weighting syntax with prompt weighting, and a token its embedding defines, warn no more."""
    pytest.importorskip("diffsteer_prompt_weighting")
    pytest.importorskip("diffsteer_textual_inversion")
    from diffsteer_prompt_weighting import PromptWeighting

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tiny_pipe("a (red)1.6 circle " + "and a red circle " * 12, num_inference_steps=1, seed=0,
                  output_type="latent", plugins=[PromptWeighting()])
    messages = [str(w.message) for w in record if issubclass(w.category, DiffsteerWarning)]
    assert not any("weighting syntax" in m or "tokens long" in m for m in messages), messages


def test_a_defined_token_is_not_reported(shapes_pipe):
    pytest.importorskip("diffsteer_textual_inversion")
    from diffsteer_textual_inversion import TextualInversion

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        shapes_pipe("a red <wedge>", num_inference_steps=1, seed=0, output_type="latent",
                    plugins=[TextualInversion(embeddings=[TI_WEDGE])])
    assert not any("<wedge>" in str(w.message) for w in record)


def test_ctrl_c_exits_130_and_keeps_the_earlier_file(tiny_sd1, workdir, capsys, monkeypatch):
    from diffsteer.pipeline import Pipeline

    assert main(["generate", P, "--model", str(tiny_sd1), "--steps", "1", "--seed", "0", "-o", "a.png", "-q"]) == 0
    before = (workdir / "a.png").read_bytes()
    capsys.readouterr()

    def interrupted(self, *args, **kwargs):
        kwargs["progress"](1, 4)  # the bar is drawn, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "__call__", interrupted)
    code, err = _run(["generate", P, "--model", str(tiny_sd1), "--steps", "4", "--seed", "1", "-o", "a.png"],
                     capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert (workdir / "a.png").read_bytes() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["a.png"]


def test_an_error_after_the_bar_starts_is_on_its_own_line(tiny_sd1, workdir, capsys, monkeypatch):
    from diffsteer.errors import GenerationError
    from diffsteer.pipeline import Pipeline

    def failing(self, *args, **kwargs):
        kwargs["progress"](1, 4)
        raise GenerationError("latents became NaN or inf at step 1")

    monkeypatch.setattr(Pipeline, "__call__", failing)
    code, err = _run(["generate", P, "--model", str(tiny_sd1), "--steps", "4", "-o", "a.png"], capsys)
    assert code == 2
    line = [ln for ln in err.replace("\r", "\n").splitlines() if "latents became NaN" in ln]
    assert line == ["error: latents became NaN or inf at step 1"], err
    assert not (workdir / "a.png").exists()
