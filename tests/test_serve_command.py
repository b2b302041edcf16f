"""`glmvision serve`: gunicorn with deploy/gunicorn.conf.py, its flags over the GLMVISION_* variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from helpers import ROOT, free_port, server_env


def test_serve_flags_override_the_environment_and_extras_go_to_gunicorn(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    port, other = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(server_env(demo_model_dir, runtime_dir))
    env.update(GLMVISION_BIND=f"127.0.0.1:{other}", GLMVISION_WORKERS="3", GLMVISION_MODEL="/no/such/model")
    command = [
        sys.executable, "-m", "glmvision.cli.main", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        "--model", str(demo_model_dir), "--device", "cpu", "--", "--log-level", "warning",
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        (card,) = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert card["device"] == "cpu" and card["demo"] is True
        children = subprocess.run(
            ["ps", "-ww", "-o", "args=", "--ppid", str(process.pid)], capture_output=True, text=True
        )
        # The master's children: its workers, and spawned interpreters (the engine, a resource tracker).
        workers = [line for line in children.stdout.splitlines() if "from multiprocessing" not in line]
        assert len(workers) == 1, children.stdout  # --workers 1, not the environment's 3
        try:
            requests.get(f"http://127.0.0.1:{other}/healthz", timeout=2)
            raise AssertionError("the environment's GLMVISION_BIND was used")
        except requests.ConnectionError:
            pass
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert "Booting worker" not in log_path.read_text()  # gunicorn's own --log-level warning


def test_serve_refuses_a_bad_flag_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "glmvision.cli.main", "serve", "--workers", "many"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "argument --workers: invalid int value: 'many'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_names_a_bad_model_directory_and_exits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    result = subprocess.run(
        [sys.executable, "-m", "glmvision.cli.main", "serve", "--model", str(tmp_path / "nothing")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"glmvision: GLMVISION_MODEL={tmp_path / 'nothing'}: directory not found" in result.stderr
    assert "Traceback" not in result.stderr
