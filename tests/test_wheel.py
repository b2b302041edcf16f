"""The wheel serves on its own: built offline, installed into a fresh venv, `glmvision serve` runs from
an empty directory with the packaged gunicorn config; deploy/gunicorn.conf.py gives gunicorn the same
settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import requests
from helpers import ROOT, free_port, server_env, stop, vision_body

# What gunicorn reads from both configs: every setting and hook it knows, by value.
COMPARE_CONFIGS = """
import json, sys
from gunicorn.app.base import Application
from gunicorn.config import Config

def applied(names):
    config = Config()
    for name, value in names.items():
        if name in config.settings:
            config.set(name, value)
    return {name: repr(setting.get()) for name, setting in config.settings.items()}, sorted(
        name for name in names if name in config.settings
    )

packaged, packaged_names = applied(Application.get_config_from_module_name(None, sys.argv[1]))
deployed, deployed_names = applied(Application.get_config_from_filename(None, sys.argv[2]))
print(json.dumps({"same": packaged == deployed, "packaged": packaged_names, "deployed": deployed_names}))
"""
HOOKS = {"on_starting", "pre_fork", "post_fork", "post_worker_init", "child_exit", "on_exit"}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without GLMVISION_* or PYTHONPATH (nothing may reach the checkout), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def build_wheel(work: Path) -> Path:
    """Build the wheel offline from a copy of the sources (the checkout gets no build/ or egg-info)."""
    source = work / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "glmvision", source / "glmvision", ignore=shutil.ignore_patterns("__pycache__"))
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("glmvision-*.whl")
    return wheel


def venv_with_wheel(work: Path, wheel: Path) -> Path:
    """A fresh venv holding only the wheel; the project's dependencies come from this venv via a .pth."""
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # Directories named in a .pth are added as they are: this venv's own .pth files (the checkout's
    # editable install among them) are not read, so the wheel is the only glmvision there.
    (Path(purelib) / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def test_the_wheel_holds_the_page_and_the_server_config_and_serves_from_anywhere(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for packaged in (
        "glmvision/server/gunicorn_conf.py",
        "glmvision/server/wsgi.py",
        "glmvision/server/workers.py",
        "glmvision/web/templates/index.html",
        "glmvision/web/static/page.js",
        "glmvision/web/static/page.css",
    ):
        assert packaged in names, f"{packaged} is not in {wheel.name}"
    venv = venv_with_wheel(tmp_path, wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env(**server_env(demo_model_dir, runtime_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import glmvision; print(glmvision.__file__)"],
        cwd=empty, env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout

    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [str(venv / "bin" / "glmvision"), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=empty, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        answer = requests.post(f"{url}/v1/chat/vision", json=vision_body(), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["success"] is True and isinstance(answer.json()["result"], str)
        page = requests.get(f"{url}/", timeout=10)  # the template, read from the installed package
        assert page.status_code == 200 and "page.js" in page.text
        assert requests.get(f"{url}/static/page.js", timeout=10).status_code == 200
    finally:
        stop(process, grace=30)
    assert list(empty.iterdir()) == []  # nothing needed from, or written to, the working directory


def test_the_deploy_config_gives_gunicorn_every_packaged_setting_and_hook(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    env = clean_env(
        **server_env(demo_model_dir, runtime_dir),
        PYTHONPATH=str(ROOT),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    result = subprocess.run(
        [sys.executable, "-c", COMPARE_CONFIGS, "glmvision.server.gunicorn_conf", "deploy/gunicorn.conf.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deployed"] == report["packaged"]
    assert report["same"]
    assert HOOKS <= set(report["packaged"])
    settings = {"bind", "workers", "threads", "worker_class", "logger_class", "timeout"}
    assert settings <= set(report["packaged"])
