"""VRAM hygiene: the cache-emptying rule, and the engine's model thread that applies it between batches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask
from helpers import vision_body, wait_for

import glmvision.backends.local.engine
from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import QueueEngine
from glmvision.backends.local.vram import maybe_empty_cache
from glmvision.core.config import load_settings
from glmvision.web.state import app_state


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


def _engine(device: str, fraction: float) -> QueueEngine:
    """An engine over a stand-in model that only says which device it is on."""
    settings = load_settings({"GLMVISION_EMPTY_CACHE_FRACTION": fraction})
    return ContinuousEngine(SimpleNamespace(device=device), settings)


def _install(monkeypatch: pytest.MonkeyPatch, cuda: FakeCuda) -> list[str]:
    """Route the engine's `torch.cuda` to `cuda`; return the names of the threads that looked it up."""
    lookups: list[str] = []

    def fake_module() -> FakeCuda:
        lookups.append(threading.current_thread().name)
        return cuda

    monkeypatch.setattr(glmvision.backends.local.engine, "cuda_module", fake_module)
    return lookups


@pytest.mark.parametrize(("reserved", "emptied"), [(0, 0), (400, 0), (500, 0), (501, 1), (1000, 1)])
def test_tidy_memory_empties_above_the_fraction(
    monkeypatch: pytest.MonkeyPatch, reserved: int, emptied: int
) -> None:
    """Between batches the engine empties the cache of its own GPU when over the fraction."""
    cuda = FakeCuda(reserved, 1000)
    _install(monkeypatch, cuda)
    engine = _engine("cuda:1", 0.5)
    engine._tidy_memory()
    assert cuda.emptied == emptied
    assert engine.stats.cache_empties == emptied
    assert cuda.devices and set(cuda.devices) == {"cuda:1"}


def test_tidy_memory_never_touches_cuda_off_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(1000, 1000)
    lookups = _install(monkeypatch, cuda)
    _engine("cpu", 0.5)._tidy_memory()
    assert lookups == [] and cuda.emptied == 0


def test_a_failing_check_is_logged_and_the_engine_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _install(monkeypatch, FakeCuda(1000, 1000, fail=True))
    engine = _engine("cuda:0", 0.5)
    with caplog.at_level(logging.ERROR, logger="glmvision"):
        engine._tidy_memory()
    assert "VRAM check failed" in caplog.text
    assert engine.stats.cache_empties == 0


def test_the_check_runs_on_the_model_thread_after_each_batch_never_per_request(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Health probes and requests never call CUDA; the model thread checks once per batch."""
    app = make_app()
    client = app.test_client()
    app_state(app).service.backend.holder.get(timeout=60)  # loaded (and its first answer given)
    checks: list[str] = []
    real = QueueEngine._tidy_memory

    def recording(self: QueueEngine) -> None:
        checks.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(QueueEngine, "_tidy_memory", recording)
    lookups = _install(monkeypatch, FakeCuda(1000, 1000))
    for _ in range(5):
        assert client.get("/healthz").get_json() == {"status": "ok"}
    assert checks == []
    for _ in range(2):
        assert client.post("/v1/chat/vision", json=vision_body()).get_json()["success"] is True
    engine = app_state(app).service.backend.engine
    assert engine is not None
    # The check follows each batch on the model thread, which may still be at it when the answer is out.
    assert wait_for(lambda: len(checks) == 2)
    assert engine.stats.batches == 2
    assert set(checks) == {"glmvision-engine"}
    assert lookups == []  # the demo model runs on the CPU: CUDA is never asked
