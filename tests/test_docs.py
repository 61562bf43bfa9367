"""The user docs run: every ```python block of each page executes, in order, against a real model.

Conventions the pages follow (see docs/plugin-authors.md for the reason each exists):

* a block whose first line is ``# not run`` (or ``# not run: why``) is skipped (hub ids, real SD
  checkpoints);
* a block whose first line is ``# file: PATH`` is written to ``PATH`` in the page's working
  directory instead of being run (a plugin package, its tests); a ```toml ``# file: pyproject.toml``
  block with ``[project.entry-points.diffsteer]`` is "installed" by writing the dist-info that
  ``pip install -e .`` would write, so ``plugins=["name"]`` resolves through the real entry-point path;
* when a page wrote files under ``tests/``, they are run with pytest in a subprocess, as a plugin
  author would run them;
* a ```text block whose first line is ``# prints`` states what the python block just before it prints:
  each line must match that block's output line for line, where ``{lo..hi}`` is a number that must lie
  in ``[lo, hi]`` (a figure that varies by machine) and a line ending in ``...`` matches any rest.

``"shapes"`` is the shipped model when this install has it; otherwise a tiny random SD folder stands
in for it (images are then 32x32 instead of 64x64, which is why the pages never hard-code sizes).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffsteer.testing import build_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["index.md", "getting-started.md", "concepts.md", "plugin-authors.md", "cli.md", "loading.md",
         "schedulers.md", "shapes-model.md", "sega.md", "prompt-weighting.md", "sag.md",
         "textual-inversion.md", "controlnet.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = "# not run"
FILE = re.compile(r"#\s*file:\s*(\S+)")


PRINTS = "# prints"
RANGE = re.compile(r"\{(-?[\d.]+)\.\.(-?[\d.]+)\}")
NUMBER = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"


def printed_lines_match(expected: str, printed: str) -> list[str]:
    """The mismatches between a ``# prints`` block and what its python block printed (empty: they agree)."""
    want = [line for line in expected.strip("\n").split("\n")[1:]]
    got = printed.rstrip("\n").split("\n") if printed.strip() else []
    problems = [] if len(want) == len(got) else [f"{len(want)} lines stated, {len(got)} printed"]
    for w, g in zip(want, got):
        tail = w.endswith("...")
        body = w[:-3] if tail else w
        pieces = RANGE.split(body)  # text, lo, hi, text, lo, hi, ..., text
        pattern = "".join(re.escape(p) if i % 3 == 0 else (NUMBER if i % 3 == 1 else "")
                          for i, p in enumerate(pieces))
        m = (re.match if tail else re.fullmatch)(pattern, g)
        if m is None:
            problems.append(f"stated {w!r}, printed {g!r}")
            continue
        bounds = [(float(pieces[i]), float(pieces[i + 1])) for i in range(1, len(pieces) - 1, 3)]
        for (lo, hi), value in zip(bounds, m.groups()):
            if not lo <= float(value) <= hi:
                problems.append(f"stated {w!r}: {value} is outside [{lo:g}, {hi:g}] in {g!r}")
    return problems


def blocks(page: str) -> list[tuple[str, int, str]]:
    """(language, first line number of the code, code) of each fenced block of ``page``."""
    text = (DOCS / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start(2)) + 1
        out.append((m.group(1), line, m.group(2)))
    return out


def first_line(code: str) -> str:
    return code.lstrip("\n").split("\n", 1)[0].strip()


def not_run(code: str) -> bool:
    head = first_line(code)
    return head == NOT_RUN or head.startswith(NOT_RUN + ":")  # "# not run: why"


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    stand_in: bool  # a tiny random model standing in for the shipped one: the pages' figures do not apply


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """Make ``"shapes"`` loadable: the shipped model if present, else a tiny random stand-in."""
    from diffsteer.loading import pipeline_loader

    if (pipeline_loader.shipped_model_dir() / "model_index.json").is_file():
        yield ModelFolder(pipeline_loader.shipped_model_dir(), stand_in=False)
        return
    tiny = build_tiny_sd(tmp_path_factory.mktemp("docs-model"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_loader, "shipped_model_dir", lambda name=pipeline_loader.SHAPES: tiny)
        yield ModelFolder(tiny, stand_in=True)


def install_entry_points(pyproject: Path) -> None:
    """Write the ``.dist-info`` that ``pip install -e .`` would, from the page's pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    dist = project["name"].replace("-", "_")
    info = pyproject.parent / f"{dist}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    groups = project.get("entry-points", {})
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, shapes_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # What `pip install -e .` gives: the package importable from src/ (the scaffold's layout), or from the
    # folder itself (a flat layout), and the dist-info next to pyproject.toml.
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    namespace: dict = {"__name__": f"docs.{page}"}
    wrote_tests = False
    ran = checked = 0
    outputs: dict[int, str] = {}
    previous = None
    try:
        for lang, line, code in blocks(page):
            head = first_line(code)
            target = FILE.fullmatch(head)
            if lang in ("python", "toml") and target:
                path = tmp_path / target.group(1)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(code)
                if lang == "python":
                    compile(code, str(path), "exec")  # a written file must at least be valid Python
                    wrote_tests |= path.relative_to(tmp_path).parts[0] == "tests"
                elif path.name == "pyproject.toml":
                    install_entry_points(path)
                importlib.invalidate_caches()
            elif lang == "python" and not not_run(code):
                # Padding keeps the page's line numbers in tracebacks.
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile("\n" * (line - 1) + code, f"docs/{page}", "exec"), namespace)
                sys.stdout.write(printed.getvalue())
                outputs[line] = printed.getvalue()
                ran += 1
            elif lang == "text" and first_line(code) == PRINTS:
                assert previous is not None and previous in outputs, (
                    f"docs/{page}:{line}: a '# prints' block must follow a python block that runs"
                )
                if shapes_model.stand_in:
                    continue  # the page's figures are the shipped model's
                problems = printed_lines_match(code, outputs[previous])
                assert not problems, f"docs/{page}:{line}: the page says it prints other figures: {problems}"
                checked += 1
            previous = line if lang == "python" else None
        if wrote_tests:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(tmp_path),
                                                                os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
            )
            assert res.returncode == 0, f"the page's plugin tests failed:\n{res.stdout}\n{res.stderr}"
            print(res.stdout.strip().splitlines()[-1])
    finally:
        for name, module in list(sys.modules.items()):  # the page's plugin package must not leak
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]
    assert ran, f"docs/{page} has no runnable python block"


def test_pages_skip_few_blocks():
    """``# not run`` is for what cannot run here (downloads, real checkpoints), not for code that broke."""
    for page in PAGES:
        skipped = [line for lang, line, code in blocks(page) if lang == "python" and not_run(code)]
        run = [line for lang, line, code in blocks(page) if lang == "python" and not not_run(code)]
        assert len(skipped) <= max(2, len(run) // 3), f"docs/{page}: too many '# not run' blocks at lines {skipped}"


def test_documented_cli_commands_parse():
    """Every ``diffsteer ...`` command shown in a bash block uses options the parser knows."""
    from diffsteer.cli import build_parser

    parser = build_parser()
    seen = 0
    for page in [*PAGES, "../README.md"]:
        for lang, line, code in blocks(page):
            if lang not in ("bash", "sh", "console"):
                continue
            for cmd in code.replace("\\\n", " ").splitlines():
                cmd = cmd.strip().removeprefix("$ ")
                if not cmd.startswith("diffsteer "):
                    continue
                argv = shlex.split(cmd, comments=True)[1:]
                if argv in (["--help"], ["--version"], ["generate", "--help"]):
                    continue
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"docs/{page}:{line}: `{cmd}` does not parse")
                seen += 1
    assert seen >= 5


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_links_between_pages_resolve():
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    for page in [*PAGES, "hooks.md"]:
        for target, anchor in link.findall((DOCS / page).read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = DOCS / (target or page)
            assert path.exists(), f"docs/{page} links to missing {target}"
            if anchor and path.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}
                assert anchor in anchors, f"docs/{page} links to missing anchor {target}#{anchor}"


def test_prints_blocks_check_each_figure():
    stated = "# prints\nno SEGA: {25..75}% red-dominant\nshape (1, 4, 8, 8) dtype ..."
    assert printed_lines_match(stated, "no SEGA: 50% red-dominant\nshape (1, 4, 8, 8) dtype float32\n") == []
    assert printed_lines_match(stated, "no SEGA: 80% red-dominant\nshape (1, 4, 8, 8) dtype float32\n") == [
        "stated 'no SEGA: {25..75}% red-dominant': 80 is outside [25, 75] in 'no SEGA: 80% red-dominant'"
    ]
    assert printed_lines_match(stated, "no SEGA: 50% red-dominant\nshape (1, 4, 16, 16) dtype float32\n")
    assert printed_lines_match(stated, "no SEGA: 50% red-dominant\n") == ["2 lines stated, 1 printed"]
    assert printed_lines_match("# prints\ntorch.float32", "torch.bfloat16\n")


def test_pages_that_print_figures_state_them():
    """Each page listed here prints figures in its examples and states them in a checked ``# prints`` block."""
    for page in ["getting-started.md", "concepts.md", "cli.md", "sega.md", "controlnet.md", "prompt-weighting.md",
                 "sag.md", "textual-inversion.md", "loading.md", "schedulers.md", "shapes-model.md"]:
        stated = [line for lang, line, code in blocks(page) if lang == "text" and first_line(code) == PRINTS]
        assert stated, f"docs/{page} states no '# prints' block"


def test_pictures_script_draws_every_picture(tmp_path):
    """docs/pictures.py draws each page's before/after picture (here at two seeds), and each page shows its own."""
    sys.path.insert(0, str(DOCS))
    try:
        pictures = importlib.import_module("pictures")
    finally:
        sys.path.remove(str(DOCS))
    with contextlib.redirect_stdout(io.StringIO()):
        pictures.main(["--seeds", "2", "--out", str(tmp_path)])
    # every picture, and nothing else: no temporary left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in pictures.PICTURES)
    for name in pictures.PICTURES:
        assert f"](img/{name}.png)" in (DOCS / f"{name}.md").read_text(), f"docs/{name}.md does not show its picture"
        assert (DOCS / "img" / f"{name}.png").exists(), f"docs/img/{name}.png is missing: run python docs/pictures.py"
