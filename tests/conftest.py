"""Shared fixtures: the tiny demo model (built once), app/client factories, test images."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from flask import Flask
from flask.testing import FlaskClient

from glmvision import create_app
from glmvision.backends.local.demo import build_demo_model


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure apps through overrides only; the developer's GLMVISION_* never leaks in."""
    for name in list(os.environ):
        if name.startswith("GLMVISION_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight GLM-4.6V-Flash model, built once per test session."""
    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture
def make_app(demo_model_dir: Path) -> Callable[..., Flask]:
    """Build an app on the demo model with extra settings given as keyword overrides."""

    def factory(**overrides: Any) -> Flask:
        settings = {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}
        settings.update({f"GLMVISION_{key.upper()}": value for key, value in overrides.items()})
        app = create_app(settings)
        app.config["TESTING"] = True
        return app

    return factory


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    """A short private XDG_RUNTIME_DIR for a module's gunicorn servers."""
    path = Path(tempfile.mkdtemp(prefix="gv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
