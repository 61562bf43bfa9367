"""docs/sega.md runs: its python blocks execute in order (on the shipped shapes model when this install has it,
else on a tiny random stand-in) and its commands parse."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from diffsteer.testing import build_tiny_sd

PAGE = Path(__file__).resolve().parents[3] / "docs" / "sega.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(lang):
    text = PAGE.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


@pytest.fixture()
def shipped(tmp_path, monkeypatch) -> bool:
    """Whether the shapes model is shipped; if not, a tiny random model stands in for it."""
    from diffsteer.loading import pipeline_loader

    if (pipeline_loader.shipped_model_dir() / "model_index.json").is_file():
        return True
    tiny = build_tiny_sd(tmp_path / "model")
    monkeypatch.setattr(pipeline_loader, "shipped_model_dir", lambda name=pipeline_loader.SHAPES: tiny)
    return False


def test_page_python_runs(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs.sega"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for line, code in blocks("python"):
            exec(compile("\n" * (line - 1) + code, str(PAGE), "exec"), namespace)
    printed = out.getvalue()
    print(printed)
    red = {label: int(pct) for label, pct in re.findall(r"^(no SEGA|\+red|-red): (\d+)% red-dominant$", printed, re.M)}
    assert set(red) == {"no SEGA", "+red", "-red"}
    assert {p.name for p in tmp_path.glob("sega-*.png")} == {"sega-plain.png", "sega-more-red.png", "sega-less-red.png"}
    replay = float(printed.strip().splitlines()[-1])
    assert replay <= 1e-4
    if shipped:  # the page quotes these figures for the shipped model
        assert red == {"no SEGA": 42, "+red": 100, "-red": 0}


def test_page_commands_parse():
    from diffsteer.cli import build_parser

    parser = build_parser()
    commands = [c.strip() for _, code in blocks("bash") for c in code.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c.startswith("diffsteer ")]
    assert commands
    for cmd in commands:
        parser.parse_args(shlex.split(cmd, comments=True)[1:])
