"""The per-GPU load lock, with real worker processes on CPU-only code paths."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import tempfile
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from glmvision.backends.local.gpulock import gpu_load_lock, lock_directory, lock_name

# fork: the children only run the lock's pure-Python code, and start without re-importing anything.
CONTEXT = multiprocessing.get_context("fork")
# Long enough never to expire on a slow machine when the lock works; a broken lock waits it out.
PATIENCE = 30
UUID = "8a1f0c2e-1b2c-4d5e-8f90-0123456789ab"


@pytest.mark.parametrize(
    ("index", "uuid", "name"),
    [
        (0, None, "glmvision-cuda0.lock"),
        (3, None, "glmvision-cuda3.lock"),
        (0, f"GPU-{UUID}", f"glmvision-gpu-GPU-{UUID}.lock"),
        (1, UUID, f"glmvision-gpu-{UUID}.lock"),
        (0, "../../etc/x", "glmvision-gpu-etcx.lock"),
    ],
)
def test_lock_name(index: int, uuid: str | None, name: str) -> None:
    """Named by the GPU's UUID when known (the same GPU whatever its index), else by index; no paths."""
    assert lock_name(index, uuid) == name


def test_lock_directory() -> None:
    assert lock_directory({"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000"
    assert lock_directory({"XDG_RUNTIME_DIR": ""}) == tempfile.gettempdir()
    assert lock_directory({}) == tempfile.gettempdir()


def test_the_cpu_takes_no_lock(tmp_path: Path) -> None:
    with gpu_load_lock(None, directory=str(tmp_path)) as held:
        assert held is False
    assert list(tmp_path.iterdir()) == []


def _record(path: str, line: str) -> None:
    """Append one line to the shared log (O_APPEND: lines from both processes never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _first_worker(directory: str, log: str, index: int, holding: Event, release: Event) -> None:
    with gpu_load_lock(index, directory=directory) as held:
        _record(log, f"first read {held}")
        holding.set()
        release.wait(PATIENCE)
        _record(log, "first loaded")


def _second_worker(directory: str, log: str, index: int, holding: Event, release: Event) -> None:
    holding.wait(PATIENCE)
    with gpu_load_lock(index, directory=directory, poll=0.01, on_wait=release.set) as held:
        _record(log, f"second read {held}")
    release.set()


def _run_workers(tmp_path: Path, first_index: int, second_index: int) -> list[str]:
    """Run two worker processes against one lock directory; return the shared log's lines."""
    log = str(tmp_path / "order.log")
    holding, release = CONTEXT.Event(), CONTEXT.Event()
    args = (str(tmp_path), log)
    first = CONTEXT.Process(target=_first_worker, args=(*args, first_index, holding, release))
    second = CONTEXT.Process(target=_second_worker, args=(*args, second_index, holding, release))
    first.start()
    second.start()
    for process in (first, second):
        process.join(2 * PATIENCE)
        assert process.exitcode == 0
    return Path(log).read_text(encoding="utf-8").splitlines()


def test_a_second_worker_on_the_same_gpu_reads_after_the_first_has_loaded(tmp_path: Path) -> None:
    """The first keeps the lock until the second is seen waiting: the second still reads after it loaded."""
    lines = _run_workers(tmp_path, 5, 5)
    assert lines == ["first read True", "first loaded", "second read True"]


def test_workers_on_different_gpus_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """The first holds cuda:0's lock until the second has read cuda:1's: no waiting on either."""
    lines = _run_workers(tmp_path, 0, 1)
    assert lines == ["first read True", "second read True", "first loaded"]


def _hold_forever(directory: str, holding: Event) -> None:
    with gpu_load_lock(2, directory=directory):
        holding.set()
        CONTEXT.Event().wait()


def test_a_dead_worker_leaves_the_lock_free(tmp_path: Path) -> None:
    """A worker killed while loading (out of memory, SIGKILL) does not block the GPU's next load."""
    holding = CONTEXT.Event()
    holder = CONTEXT.Process(target=_hold_forever, args=(str(tmp_path), holding))
    holder.start()
    assert holding.wait(PATIENCE)
    holder.kill()
    holder.join(PATIENCE)
    waited: list[bool] = []
    with gpu_load_lock(2, directory=str(tmp_path), on_wait=lambda: waited.append(True)) as held:
        assert held is True
    assert waited == []


def test_the_wait_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lock held past the bound is given up on, with a warning, and loading goes on without it."""
    waited: list[bool] = []

    def wait() -> None:
        waited.append(True)

    with gpu_load_lock(4, directory=str(tmp_path)) as first:
        with caplog.at_level(logging.INFO, logger="glmvision"):
            with gpu_load_lock(4, directory=str(tmp_path), timeout=0.05, poll=0.01, on_wait=wait) as second:
                assert (first, second) == (True, False)
    assert waited == [True]
    assert f"pid {os.getpid()}" in caplog.text
    assert "loading without it" in caplog.text
    with gpu_load_lock(4, directory=str(tmp_path), on_wait=wait) as again:
        assert again is True
    assert waited == [True]


def test_an_unusable_lock_directory_does_not_stop_loading(tmp_path: Path) -> None:
    with gpu_load_lock(0, directory=str(tmp_path / "missing")) as held:
        assert held is False


def _lock_is_held(path: Path) -> bool:
    """True if another open file holds an exclusive flock on `path`."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_load_model_reads_and_loads_under_the_gpus_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_model_dir: Path
) -> None:
    """On cuda:1, the free-memory reading and from_pretrained run inside cuda:1's lock, released after."""
    import torch
    import transformers

    from glmvision.backends.local import hardware
    from glmvision.backends.local.loading import load_model
    from glmvision.core.config import load_settings

    # No GPU here: torch is told there are two, and the weights, asked onto cuda:1, load on the CPU.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(hardware, "cuda_uuid", lambda index: None)
    lock = tmp_path / lock_name(1)
    seen: list[tuple[str, bool]] = []

    def facts(device: str) -> hardware.CudaFacts:
        seen.append((f"read {device}", _lock_is_held(lock)))
        return hardware.CudaFacts(bf16_native=False, free_bytes=None)

    real = transformers.AutoModelForImageTextToText.from_pretrained

    def from_pretrained(source: str, **kwargs: object) -> object:
        seen.append((f"load {kwargs.pop('device_map')}", _lock_is_held(lock)))
        return real(source, **kwargs)

    monkeypatch.setattr(hardware, "cuda_facts", facts)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    loaded = load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cuda:1"}))
    assert (loaded.device, loaded.dtype) == ("cuda:1", "float16")
    assert seen == [("read cuda:1", True), ("load {'': 'cuda:1'}", True)]
    assert not _lock_is_held(lock)
    assert not (tmp_path / lock_name(0)).exists()
