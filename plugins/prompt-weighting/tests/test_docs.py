"""docs/prompt-weighting.md runs: its python blocks execute in order (on the shipped shapes model when this install
has it, else on a tiny random stand-in), its commands parse, and its A1111 example prints what it says."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from diffsteer.testing import build_tiny_sd

PAGE = Path(__file__).resolve().parents[3] / "docs" / "prompt-weighting.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(lang):
    text = PAGE.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


@pytest.fixture()
def shapes_or_stand_in(tmp_path, monkeypatch):
    from diffsteer.loading import pipeline_loader

    if not (pipeline_loader.shipped_model_dir() / "model_index.json").is_file():
        tiny = build_tiny_sd(tmp_path / "model")
        monkeypatch.setattr(pipeline_loader, "shipped_model_dir", lambda name=pipeline_loader.SHAPES: tiny)


def test_page_python_runs(shapes_or_stand_in, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs.prompt_weighting"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for line, code in blocks("python"):
            exec(compile("\n" * (line - 1) + code, str(PAGE), "exec"), namespace)
    printed = out.getvalue()
    print(printed)
    assert "unbalanced '('" in printed and "\n    a (red circle on a white background\n      ^\n" in printed
    assert "[('a ', 1.0), ('red', 1.4300000000000002), (' ', 1.0), ('circle', 0.9090909090909091)]" in printed
    assert "torch.Size([2, 154," in printed


def test_page_commands_parse():
    from diffsteer.cli import build_parser

    parser = build_parser()
    commands = [c.strip() for _, code in blocks("bash") for c in code.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c.startswith("diffsteer ")]
    assert commands
    for cmd in commands:
        parser.parse_args(shlex.split(cmd, comments=True)[1:])
