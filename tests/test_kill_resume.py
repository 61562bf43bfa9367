"""``kill -9`` of a real training process mid-checkpoint and mid-export, then the same command again: the run
folder ends bit-identical to an uninterrupted run's (embedding, final/, checkpoints with their AdamW and RNG
states, log), with no temporary left and one log record per step.

The process is stopped at a named point of an atomic writer (the ``DIFFSTEER_TEST_STOP_AT`` seam of
:mod:`diffsteer.atomic`) and killed there by its PID, so each kill hits its point every time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffsteer.atomic import STOP_ENV, TEMPORARY_NAME, atomic_directory, atomic_file, remove_stale_temporaries
from diffsteer.shapes.world import Scene, ShapeObject, render

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")

STEPS, EVERY = 6, 2
CLI = "import sys; from diffsteer.cli import main; sys.exit(main(sys.argv[1:]))"


def train_command(images: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "train", "textual-inversion", "--token", "<k>", "--init-token", "square",
            "--images", str(images), "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--lr", "2e-2",
            "--checkpoint-every", str(EVERY), "--log-every", "1", "--seed", "5", "--threads", "1"]


def run(images: Path, out: Path, log: Path, stop_at: str | None = None) -> None:
    """Train into ``out``; with ``stop_at``, wait until the process stops there, then SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(STOP_ENV, None)
    if stop_at:
        env[STOP_ENV] = stop_at
    with open(log, "a") as sink:
        proc = subprocess.Popen(train_command(images, out), env=env, stdout=sink, stderr=subprocess.STDOUT)
    if stop_at is None:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        return
    deadline = time.monotonic() + 300
    while True:
        # WUNTRACED reports the stop without reaping; the process sits exactly at its stop point.
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            break
        assert not pid, f"exited before reaching {stop_at}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never reached {stop_at}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMPORARY_NAME.match(p.name))


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_killed_runs_resume_to_the_uninterrupted_result_without_litter(tmp_path):
    pytest.importorskip("diffsteer_textual_inversion")
    images = tmp_path / "images"
    images.mkdir()
    for k, (colour, x) in enumerate([("red", 0.4), ("blue", 0.6)]):
        render(Scene([ShapeObject("square", colour, x, 0.5, 0.25)], "white")).save(images / f"{k}.png")
    log = tmp_path / "output.txt"
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(images, ref, log)

    # Mid-checkpoint: step 4's checkpoint is complete in its temporary, not yet renamed; steps 1-4 are logged.
    run(images, out, log, stop_at="step-00000004:ready")
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert temporaries(out) and logged_steps(out) == [1, 2, 3, 4]
    # Resumed from step 2, it cut its log back to step 2 and logged 3-6 again; killed while copying the
    # embedding out of the complete final/ (the path names the copy, not final/'s own file).
    run(images, out, log, stop_at="out/learned_embeds.safetensors:ready")
    assert temporaries(out) and (out / "final").is_dir() and not (out / "learned_embeds.safetensors").exists()
    # Mid-export, re-exporting over that final/: the old one moved aside, the new one complete but not in place.
    run(images, out, log, stop_at="final:swapped")
    litter = temporaries(out)
    assert any(".final.diffsteer-old-" in t for t in litter) and any(".final.diffsteer-tmp-" in t for t in litter)
    assert not (out / "final").exists()
    run(images, out, log)

    assert temporaries(out) == [] and temporaries(ref) == []
    assert logged_steps(out) == list(range(1, STEPS + 1))
    expected, got = tree(ref), tree(out)
    assert sorted(got) == sorted(expected)
    assert {"checkpoints/step-00000006/rng.pt", "final/learned_embeds.safetensors"} <= set(got)
    assert [name for name in expected if got[name] != expected[name]] == []


def test_one_cleaner_knows_every_temporary_of_the_atomic_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no process has this PID now (barring instant reuse)
    nested = tmp_path / "work" / "unet" / "checkpoints"
    nested.mkdir(parents=True)
    stale_dirs = [
        tmp_path / f".final.diffsteer-tmp-{dead_pid}-k2x_9abc",
        tmp_path / f".final.diffsteer-old-{dead_pid}-0a1b2c3d",
        nested / f".step-00000004.diffsteer-tmp-{dead_pid}-aaaa1111",
    ]
    stale_files = [
        tmp_path / f".learned_embeds.safetensors.diffsteer-tmp-{os.getpid()}-zz1y2x3w",  # ours, not open: reused PID
    ]
    live = tmp_path / f".final.diffsteer-tmp-{os.getppid()}-abcdefgh"  # a running process's writer: kept
    kept_dirs = [tmp_path / "final.diffsteer-tmp-1-abcdefgh", nested / "step-00000002"]
    kept_files = [live, tmp_path / ".hidden", tmp_path / ".bashrc.old-1", nested / ".x.diffsteer-tmp-12-a.txt"]
    for path in stale_dirs + kept_dirs:
        path.mkdir()
    for path in stale_files + kept_files:
        path.write_bytes(b"x")
    (stale_dirs[0] / "unet").mkdir()
    (stale_dirs[0] / "unet" / "w.safetensors").write_bytes(b"half")
    stale, kept = stale_dirs + stale_files, kept_dirs + kept_files

    with atomic_file(tmp_path / "a.txt") as tmp, atomic_directory(tmp_path / "d") as tmp_dir:
        # the writers' own names follow the scheme, and the cleaner leaves this process's open ones alone
        assert TEMPORARY_NAME.match(tmp.name) and TEMPORARY_NAME.match(tmp_dir.name)
        tmp.write_text("a")
        assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "d").is_dir()
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_scratch_folder_is_named_for_the_cleaner_and_removed(tmp_path):
    from diffsteer.atomic import is_stale_temporary, scratch_directory

    with scratch_directory(tmp_path, "timing") as scratch:
        (scratch / "x").write_text("1")
        assert TEMPORARY_NAME.match(scratch.name) and not is_stale_temporary(scratch)
    assert list(tmp_path.iterdir()) == []
