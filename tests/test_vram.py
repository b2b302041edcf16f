"""VRAM hygiene: the cache-emptying rule and the after-request hook that applies it."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask

import glmvision.vram
from glmvision import create_app
from glmvision.vram import maybe_empty_cache


class FakeCuda:
    """A stand-in for `torch.cuda` that records what the hook asked for."""

    def __init__(self, reserved: int, total: int, fail: bool = False) -> None:
        self.reserved = reserved
        self.total = total
        self.fail = fail
        self.emptied = 0
        self.devices: list[Any] = []

    def memory_reserved(self, device: Any = None) -> int:
        self.devices.append(device)
        if self.fail:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.reserved

    def get_device_properties(self, device: Any) -> Any:
        self.devices.append(device)
        return SimpleNamespace(total_memory=self.total)

    def empty_cache(self) -> None:
        self.emptied += 1


@pytest.mark.parametrize(
    ("reserved", "total", "fraction", "emptied"),
    [
        (0, 1024, 0.5, False),
        (511, 1024, 0.5, False),
        (512, 1024, 0.5, False),
        (513, 1024, 0.5, True),
        (1024, 1024, 0.5, True),
        (768, 1024, 0.75, False),
        (769, 1024, 0.75, True),
        (1024, 1024, 1.0, False),
        (1, 1024, 0.0001, True),
    ],
)
def test_maybe_empty_cache_threshold(reserved: int, total: int, fraction: float, emptied: bool) -> None:
    """The cache is emptied only when reserved memory is strictly above the fraction."""
    cuda = FakeCuda(reserved, total)
    assert maybe_empty_cache(cuda, "cuda:0", fraction) is emptied
    assert cuda.emptied == int(emptied)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cuda"])
def test_maybe_empty_cache_asks_about_the_given_device(device: str) -> None:
    """Memory is read for the model's own device."""
    cuda = FakeCuda(1000, 1000)
    assert maybe_empty_cache(cuda, device, 0.5)
    assert cuda.devices and all(seen == device for seen in cuda.devices)


@pytest.mark.parametrize("device", ["cpu", "mps", ""])
def test_maybe_empty_cache_never_touches_cuda_off_gpu(device: str) -> None:
    """Off CUDA nothing is read or emptied, however full the numbers look."""
    cuda = FakeCuda(1000, 1000)
    assert maybe_empty_cache(cuda, device, 0.5) is False
    assert cuda.emptied == 0
    assert cuda.devices == []


def _app(tmp_path: Path, fraction: float) -> Flask:
    """A real app (the model is never loaded: the hook only looks at the holder)."""
    app = create_app(
        {
            "GLMVISION_MODEL": str(tmp_path / "model"),
            "GLMVISION_DEVICE": "cpu",
            "GLMVISION_WARMUP": False,
            "GLMVISION_EMPTY_CACHE_FRACTION": fraction,
        }
    )
    app.config["TESTING"] = True
    return app


def _pretend_loaded(app: Flask, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Make the app's model holder look loaded on `device`."""
    monkeypatch.setattr(app.extensions["glmvision.model"], "_loaded", SimpleNamespace(device=device))


def _install(monkeypatch: pytest.MonkeyPatch, cuda: FakeCuda) -> list[int]:
    """Route the hook's `torch.cuda` to `cuda`; return a list that counts the lookups."""
    lookups: list[int] = []

    def fake_module() -> FakeCuda:
        lookups.append(1)
        return cuda

    monkeypatch.setattr(glmvision.vram, "cuda_module", fake_module)
    return lookups


@pytest.mark.parametrize(
    ("reserved", "emptied"),
    [(0, 0), (400, 0), (500, 0), (501, 1), (1000, 1)],
)
@pytest.mark.parametrize("path", ["/healthz", "/no-such-endpoint"])
def test_after_request_hook_empties_above_the_fraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserved: int, emptied: int, path: str
) -> None:
    """After any request, a model on cuda:0 with reserved > 0.5 x total gets its cache emptied."""
    app = _app(tmp_path, 0.5)
    _pretend_loaded(app, monkeypatch, "cuda:0")
    cuda = FakeCuda(reserved, 1000)
    lookups = _install(monkeypatch, cuda)
    response = app.test_client().get(path)
    assert response.status_code == (200 if path == "/healthz" else 404)
    assert cuda.emptied == emptied
    assert len(lookups) == 1
    assert "cuda:0" in cuda.devices


def test_after_request_hook_runs_once_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests, three checks."""
    app = _app(tmp_path, 0.5)
    _pretend_loaded(app, monkeypatch, "cuda:0")
    cuda = FakeCuda(900, 1000)
    _install(monkeypatch, cuda)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert cuda.emptied == 3


@pytest.mark.parametrize("device", [None, "cpu"])
def test_after_request_hook_ignores_models_off_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str | None
) -> None:
    """No model, or a CPU model: torch.cuda is never even looked up."""
    app = _app(tmp_path, 0.5)
    if device is not None:
        _pretend_loaded(app, monkeypatch, device)
    cuda = FakeCuda(1000, 1000)
    lookups = _install(monkeypatch, cuda)
    assert app.test_client().get("/healthz").status_code == 200
    assert lookups == []
    assert cuda.emptied == 0


def test_after_request_hook_failure_does_not_fail_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CUDA error in the check is logged and the finished response still goes out."""
    app = _app(tmp_path, 0.5)
    _pretend_loaded(app, monkeypatch, "cuda:0")
    cuda = FakeCuda(1000, 1000, fail=True)
    _install(monkeypatch, cuda)
    with caplog.at_level(logging.ERROR, logger="glmvision"):
        response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert cuda.emptied == 0
    assert "VRAM check failed" in caplog.text


def test_after_request_hook_survives_a_missing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even failing to get torch.cuda at all leaves the response alone."""
    app = _app(tmp_path, 0.5)
    _pretend_loaded(app, monkeypatch, "cuda:0")

    def broken() -> Any:
        raise ImportError("no torch here")

    monkeypatch.setattr(glmvision.vram, "cuda_module", broken)
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
