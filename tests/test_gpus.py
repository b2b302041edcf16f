"""One GPU per gunicorn worker: counting GPUs, picking one per worker, and real gunicorn replacing one."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from helpers import LiveServer, live_server, wait_for

from glmvision.backends.local.gpus import engine_devices, pick_gpu, visible_gpu_count, worker_device

USES = re.compile(r"worker pid=(?P<pid>\d+) uses (?P<device>\S+)")


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("0", 1),
        ("0,1", 2),
        ("3,1,0,2", 4),
        (" 0 , 1 ", 2),
        ("", 0),
        ("-1", 0),
        ("NoDevFiles", 0),
        ("0,-1,2", 1),  # the first invalid entry ends the list
        ("0,1,x,3", 2),
        ("0,1,", 2),
        ("1gpu,2", 2),  # read like strtoul: a leading number counts
        ("0,0", 0),  # a repeated device hides them all
        ("GPU-8a1f2c3d-0000-1111-2222-333344445555", 1),
        ("GPU-aaaa,GPU-bbbb,GPU-cccc", 3),
        ("GPU-aaaa,1,GPU-cccc", 1),  # the first entry sets the kind; another kind is invalid
        ("0,GPU-aaaa", 1),
        ("GPU-aaaa,GPU-aaaa", 0),
        ("MIG-aaaa", 1),
        ("MIG-aaaa,MIG-bbbb", 1),  # CUDA enumerates one MIG device per process
    ],
)
def test_visible_gpu_count_reads_cuda_visible_devices(value: str, count: int, tmp_path: Path) -> None:
    for n in range(8):  # CUDA_VISIBLE_DEVICES wins over what the driver lists
        (tmp_path / f"0000:{n:02x}:00.0").mkdir()
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": value}, str(tmp_path)) == count


def test_visible_gpu_count_falls_back_to_the_driver(tmp_path: Path) -> None:
    assert visible_gpu_count({}, str(tmp_path / "absent")) == 0
    assert visible_gpu_count({}, str(tmp_path)) == 0
    for bus in ("0000:07:00.0", "0000:0b:00.0", "0000:48:00.0"):
        (tmp_path / bus).mkdir()
    (tmp_path / "stray-file").write_text("not a GPU")
    assert visible_gpu_count({}, str(tmp_path)) == 3
    assert visible_gpu_count({"OTHER": "1"}, str(tmp_path)) == 3


def test_visible_gpu_count_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert visible_gpu_count(proc_dir=str(tmp_path)) == 3
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu_count(proc_dir=str(tmp_path)) == 0


def spawn(count: int, workers: int) -> list[int]:
    """Assign GPUs the way the master does, one worker after another."""
    assigned: list[int] = []
    for _ in range(workers):
        gpu = pick_gpu(assigned, count)
        assert gpu is not None
        assigned.append(gpu)
    return assigned


def test_pick_gpu_fresh_start_goes_in_order() -> None:
    assert spawn(4, 4) == [0, 1, 2, 3]
    assert spawn(1, 1) == [0]


@pytest.mark.parametrize(
    ("in_use", "count", "gpu"),
    [
        ([0, 1, 3], 4, 2),  # the dead worker's GPU goes to its replacement
        ([1, 2, 3], 4, 0),
        ([0, 1, 2], 4, 3),
        ([3, 2, 0], 4, 1),  # order of the live workers does not matter
        ([], 4, 0),
        ([0, 1, 2, 3], 4, 0),  # more workers than GPUs: the least loaded, lowest first
        ([0, 1, 2, 3, 0], 4, 1),
        ([0, 0, 1, 1, 2, 3], 4, 2),
        ([0, 0, 1, 2, 2], 3, 1),
        ([0, 7, -1], 2, 1),  # indices outside range(count) are ignored
    ],
)
def test_pick_gpu(in_use: list[int], count: int, gpu: int) -> None:
    assert pick_gpu(in_use, count) == gpu
    assert pick_gpu(iter(in_use), count) == gpu


def test_pick_gpu_spreads_extra_workers_evenly() -> None:
    assert spawn(2, 5) == [0, 1, 0, 1, 0]
    assert spawn(3, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_pick_gpu_without_gpus() -> None:
    assert pick_gpu([], 0) is None
    assert pick_gpu([0, 1], 0) is None
    assert pick_gpu([], -1) is None


@pytest.mark.parametrize(
    ("gpu", "configured", "device"),
    [
        (0, "auto", "cuda:0"),
        (3, "auto", "cuda:3"),
        (2, "cuda", "cuda:2"),
        (1, "cpu", None),
        (1, "cuda:0", None),  # an explicit device holds for every worker
        (0, "cuda:5", None),
        (None, "auto", None),
        (None, "cuda", None),
        (None, "cpu", None),
    ],
)
def test_worker_device(gpu: int | None, configured: str, device: str | None) -> None:
    assert worker_device(gpu, configured) == device


@pytest.mark.parametrize(
    ("engines", "gpus", "configured", "expected"),
    [
        (0, 0, "auto", [""]),  # one on CPU
        (0, 2, "auto", ["cuda:0", "cuda:1"]),  # one per GPU
        (0, 2, "cuda", ["cuda:0", "cuda:1"]),
        (3, 2, "auto", ["cuda:0", "cuda:1", "cuda:0"]),  # more than the GPUs share them in turn
        (2, 0, "cpu", ["", ""]),
        (0, 4, "cpu", [""]),  # the operator chose the CPU: one engine, there
        (0, 2, "cuda:1", [""]),  # one named GPU: one engine, on it
    ],
)
def test_engine_devices(engines: int, gpus: int, configured: str, expected: list[str]) -> None:
    assert engine_devices(engines, gpus, configured) == expected


def devices(server: LiveServer) -> dict[int, str]:
    """Map each worker pid that logged its GPU to the device it logged."""
    return {int(m["pid"]): m["device"] for m in USES.finditer(server.log())}


def live_devices(server: LiveServer) -> dict[int, str]:
    """The logged device of every live worker (only once all of them have logged one)."""
    logged, live = devices(server), server.worker_pids()
    return {pid: logged[pid] for pid in live} if live <= set(logged) else {}


def test_gunicorn_gives_each_worker_its_own_gpu_and_a_replacement_the_dead_ones(tmp_path: Path) -> None:
    # No GPU needed: CUDA_VISIBLE_DEVICES is how the master counts GPUs, and with warm-up off and no
    # inference request no worker loads a model, so nothing ever touches CUDA.
    (tmp_path / "never-loaded").mkdir()
    env = {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "GLMVISION_ENGINE": "thread",  # workers holding models of their own: each needs a GPU
        "GLMVISION_WORKERS": "2",
        "GLMVISION_WARMUP": "0",
        "GLMVISION_MODEL": str(tmp_path / "never-loaded"),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    with live_server(tmp_path, env) as server:
        assert wait_for(lambda: len(live_devices(server)) == 2, timeout=60), server.log()
        first = live_devices(server)
        assert sorted(first.values()) == ["cuda:0", "cuda:1"], server.log()
        # The master counted GPUs without loading torch or CUDA.
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "libtorch" not in maps and "libcuda" not in maps

        # Kill the worker on cuda:1: a replacement that just counted forks (round robin) would get cuda:0.
        (victim,) = (pid for pid, device in first.items() if device == "cuda:1")
        os.kill(victim, signal.SIGKILL)
        after: dict[int, str] = {}

        def replaced() -> bool:
            # One read decides and is kept: a second one may catch a moment before every worker logged.
            now = live_devices(server)
            if len(now) == 2 and victim not in now:
                after.update(now)
                return True
            return False

        assert wait_for(replaced, timeout=60), server.log()
        (replacement,) = set(after) - set(first)
        assert after[replacement] == first[victim], server.log()
        assert sorted(after.values()) == ["cuda:0", "cuda:1"], server.log()
        assert len(devices(server)) == 3  # exactly one replacement was forked
