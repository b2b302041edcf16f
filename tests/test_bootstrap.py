"""scripts/bootstrap.sh and serve.sh: a first install shows its stages and each download's size, not minutes
of silence; a relative model path is the caller's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

# Stands in for .venv/bin/python: records its arguments and prints what pip prints, so the script's real
# stages and filter run without installing anything.
FAKE_PIP = """#!/usr/bin/env bash
if [ "$1 $2" = "-m gunicorn" ]; then echo "gunicorn with GLMVISION_MODEL=$GLMVISION_MODEL"; exit 0; fi
echo "$*" >> .venv/calls
echo "Collecting torch==2.14.1"
echo "  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (906.4 MB)"
echo "  Using cached https://example.org/p/flask-3.1.3-py3-none-any.whl (103 kB)"
echo "Installing collected packages: torch, flask"
if [ -n "${FAIL_PIP:-}" ]; then echo "ERROR: No matching distribution found for torch"; exit 1; fi
"""


def _checkout(tmp_path: Path) -> Path:
    """A copy of what bootstrap.sh reads, with a fake .venv."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    for path in [*ROOT.glob("requirements*.txt"), ROOT / "setup.cfg", ROOT / "pyproject.toml"]:
        shutil.copy(path, tmp_path / path.name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PIP)
    python.chmod(0o755)
    return tmp_path


def _bootstrap(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = ["bash", "scripts/bootstrap.sh", "requirements-examples.txt"]
    return subprocess.run(
        command, cwd=root, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )


def test_a_first_install_prints_each_stage_and_each_download_with_its_size(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    first = _bootstrap(root)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert "bootstrap: upgrading pip" in lines
    assert any(
        line.startswith("bootstrap: installing requirements-examples.txt (about 6 GB on a first install")
        for line in lines
    ), lines
    assert "  torch-2.14.1 (906.4 MB)" in lines and "  flask-3.1.3 (103 kB)" in lines
    assert "bootstrap: done; pip's full output is in .venv/.pip.log" in lines
    # pip's own chatter goes to the log, not the terminal.
    assert "Collecting torch==2.14.1" not in first.stderr + first.stdout
    assert "Collecting torch==2.14.1" in (root / ".venv" / ".pip.log").read_text()

    calls = (root / ".venv" / "calls").read_text().splitlines()
    assert len(calls) == 3 and "-r requirements-examples.txt" in calls[1]
    again = _bootstrap(root)
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == ["bootstrap: requirements-examples.txt already installed in .venv"]
    assert len((root / ".venv" / "calls").read_text().splitlines()) == 3


def test_a_failed_install_exits_nonzero_with_the_end_of_pips_log(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    failed = _bootstrap(root, FAIL_PIP="1")
    assert failed.returncode == 1
    assert "bootstrap: pip failed; the end of .venv/.pip.log:" in failed.stderr
    assert "ERROR: No matching distribution found for torch" in failed.stderr
    assert not list((root / ".venv").glob(".installed-*"))


def test_serve_reads_a_relative_model_path_from_the_callers_directory(tmp_path: Path) -> None:
    """serve.sh moves to the repository root; `./models/glm` still means the one beside the caller."""
    root = _checkout(tmp_path / "checkout")
    caller = tmp_path / "elsewhere"
    (caller / "models" / "glm").mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin"}
    for model, seen in (("./models/glm", str(caller / "models" / "glm")), ("org/hub-id", "org/hub-id")):
        served = subprocess.run(
            ["bash", str(root / "scripts" / "serve.sh")],
            cwd=caller, env={**env, "GLMVISION_MODEL": model}, capture_output=True, text=True,
        )  # fmt: skip
        assert served.returncode == 0, served.stderr
        assert served.stdout.splitlines()[-1] == f"gunicorn with GLMVISION_MODEL={seen}"
