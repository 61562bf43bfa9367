"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "diffsteer generate" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run README's test command verbatim"


def test_readme_installs_the_local_torch_build():
    for cmd in readme_commands():
        assert "torch==2.13.0" in cmd  # an unpinned torch would pull gigabytes of CUDA wheels


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python blocks run as written, from any directory (nothing they name is a checkout path)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # an empty directory; outputs (out.png, stacked.png) land here
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out.png").is_file() and (tmp_path / "stacked.png").is_file()
