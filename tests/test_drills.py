"""Bounded drills against real gunicorn on the shipped defaults: overload, a failing model thread, a
soak. scripts/robustness.py runs the same drills longer and writes docs/robustness.md."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from drills import fault, fault_hook_env, goodput, overload, soak, storm
from helpers import LiveServer, live_server, server_env

# Bounded for CI's 2 cores (clients and server share them); scripts and bench/overload.py run 200.
STORM_CLIENTS = 100
GOODPUT_CLIENTS = 100
GOODPUT_SECONDS = 8.0
GOODPUT_SHARE = 0.5


@pytest.fixture
def defaults_server(tmp_path: Path, demo_model_dir: Path, runtime_dir: Path) -> Iterator[LiveServer]:
    """The service with every setting at its default (one worker, demo model on the CPU)."""
    env = {k: v for k, v in server_env(demo_model_dir, runtime_dir).items() if k != "GLMVISION_WORKERS"}
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        yield server


def test_overload_refuses_the_excess_answers_the_rest_and_probes_stay_up(defaults_server: LiveServer) -> None:
    """200 clients on one worker: the excess gets 503 + Retry-After, every admitted request is answered."""
    result = overload(defaults_server, clients=200, seconds=12)
    assert result.answered > 100
    assert result.refused > 100, "the queue limit was never reached: admission does not work"
    assert result.refused_without_retry_after == 0
    assert not result.other, f"outcomes other than 200 and 503 overloaded: {result.other}"
    assert result.engine["refused"] == result.refused  # the server counted what the clients saw
    assert result.engine["capacity"] == 8 + 64  # GLMVISION_MAX_BATCH_SIZE + GLMVISION_MAX_QUEUE
    assert result.health is not None and result.ready is not None
    assert set(result.health.statuses) == {200} and sum(result.health.statuses.values()) > 50
    assert set(result.ready.statuses) == {200}
    assert defaults_server.process.poll() is None


def test_a_fault_in_the_model_thread_answers_everyone_and_the_worker_is_replaced(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    env = {**server_env(demo_model_dir, runtime_dir), **fault_hook_env(tmp_path)}
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        result = fault(server, tmp_path, requests_held=12)
        assert sum(result.outcomes.values()) == 12
        # Held requests get 503 engine_failed; ones that arrive once the failed engine has said so, 503
        # engine_restarting; ones that arrive after the replacement, answers.
        allowed = {"503 engine_failed", "503 engine_restarting", "200 ok"}
        assert set(result.outcomes) <= allowed, result.outcomes
        assert result.outcomes["503 engine_failed"] >= 1
        assert result.new_pid != result.old_pid
        assert result.after == 200
        assert "the model thread failed" in server.log()
        assert requests.get(server.url + "/readyz", timeout=10).json()["status"] == "ready"


def test_a_soak_of_mixed_requests_leaves_memory_threads_and_descriptors_flat(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    # The image and encoder caches grow to their bound by design: a small bound keeps their growth
    # inside the tolerance below, so anything beyond it is a leak.
    env = server_env(demo_model_dir, runtime_dir, ENCODER_CACHE_MB="2")
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        result = soak(server, total=1200, clients=8, rounds=4)
    assert result.requests == 1200
    assert result.server_errors == 0, result.statuses
    assert set(result.statuses) <= {200, 400, 404, 415}, result.statuses
    assert result.after.threads <= result.before.threads + 2, result.samples
    assert result.after.fds <= result.before.fds + 4, result.samples
    assert result.after.rss_mib <= result.before.rss_mib * 1.10 + 20, result.samples
    # The engine process (the default) stays flat too.
    engine_before, engine_after = result.engine_before, result.engine_after
    assert engine_before is not None and engine_after is not None
    assert engine_after.threads <= engine_before.threads + 2
    assert engine_after.fds <= engine_before.fds + 4
    assert engine_after.rss_mib <= engine_before.rss_mib * 1.10 + 20


@pytest.mark.parametrize("clients", [STORM_CLIENTS, pytest.param(200, marks=pytest.mark.slow)])
def test_a_storm_during_loading_gets_answers_about_when_the_model_is_loaded(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path, clients: int
) -> None:
    """Clients that retry 50 ms after each 503 from the moment /healthz answers: the engine, in its
    own process, loads as fast as with nobody asking (with the engine in the worker, the storm's
    refusals starved the load: 41 s instead of 4)."""
    env = {k: v for k, v in server_env(demo_model_dir, runtime_dir).items() if k != "GLMVISION_WORKERS"}
    with live_server(tmp_path, env, ready_path="/healthz") as server:
        first_answer = storm(server.url, clients=clients, bound=180)
        log = server.log()
    loaded = re.search(r"model loaded: .* in (?P<seconds>[\d.]+)s", log)
    assert first_answer is not None, log[-3000:]
    assert loaded is not None, log[-3000:]
    # A liveness bound, not a benchmark (bench/overload.py prints the figures): within the load
    # time, doubled for the clients sharing the cores, plus the engine's start and warm-up.
    assert first_answer < 2 * float(loaded["seconds"]) + 20, (first_answer, loaded["seconds"])


@pytest.mark.parametrize(
    ("clients", "seconds", "share", "retry_pause"),
    [
        (GOODPUT_CLIENTS, GOODPUT_SECONDS, GOODPUT_SHARE, 0.05),
        # The drill: 200 clients, polite or retrying, keep 0.8x the capacity.
        pytest.param(200, 20.0, 0.8, None, marks=pytest.mark.slow, id="200-polite"),
        pytest.param(200, 20.0, 0.8, 0.05, marks=pytest.mark.slow, id="200-retrying"),
    ],
)
def test_goodput_under_overload_stays_near_the_capacity(
    defaults_server: LiveServer, clients: int, seconds: float, share: float, retry_pause: float | None
) -> None:
    """Clients that retry 50 ms after each 503 (the worst manners) still get answers at close to the
    rate 8 clients get: refusals are cheap and the engine's process is not theirs."""
    capacity = goodput(overload(defaults_server, clients=8, seconds=seconds))
    loaded = overload(defaults_server, clients=clients, seconds=seconds, retry_pause=retry_pause)
    assert loaded.refused > 0, "never overloaded: the drill proves nothing"
    assert not loaded.other, loaded.other
    assert goodput(loaded) >= share * capacity, (goodput(loaded), capacity)
