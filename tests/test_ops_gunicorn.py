"""Operations under real gunicorn with two workers and a real redis-server: metrics summed across
workers (and a dead worker's gauges dropped), the cache and limits shared through Redis, Redis
killed mid-run, the watchdog replacing a stalled worker, and the audit log read back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from drills import model_pids, replaced_and_ready
from helpers import NO_REDIS, ROOT, LiveServer, live_server, redis_server, server_env, vision_body, wait_for

VISION = "/v1/chat/vision"
TIMEOUT = 60

# CI installs redis-server: there a missing one fails the tests (helpers.require_redis) rather than skip.
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("CI"), reason=NO_REDIS
)


def request_lines(server: LiveServer) -> list[dict[str, Any]]:
    """The JSON request log lines the server has written so far."""
    lines = []
    for line in server.log().splitlines():
        if line.startswith('{"time"'):
            lines.append(json.loads(line))
    return lines


def logged_pid(server: LiveServer, request_id: str) -> int:
    """The pid of the worker whose request log line has this request id (waiting for the line)."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [line for line in request_lines(server) if line["request_id"] == request_id]
        return bool(found)

    assert wait_for(logged, timeout=20), server.log()[-3000:]
    return found[0]["pid"]


def post(
    server: LiveServer, body: dict[str, Any], session: requests.Session | None = None
) -> tuple[requests.Response, int]:
    """POST (on `session`'s connection, else a fresh one); the response and the pid that answered."""
    request_id = uuid.uuid4().hex
    response = (session or requests).post(
        server.url + VISION, json=body, headers={"X-Request-ID": request_id}, timeout=TIMEOUT
    )
    return response, logged_pid(server, request_id)


def pinned_sessions(server: LiveServer, seconds: float = 60) -> dict[int, requests.Session]:
    """Keep-alive sessions, one on each worker: opened at once, so that every worker accepts some
    (a worker still importing accepts none yet: try again until `seconds` have passed)."""
    workers = server.worker_pids()
    pinned: dict[int, requests.Session] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = {uuid.uuid4().hex: requests.Session() for _ in range(8)}

        def probe(item: tuple[str, requests.Session]) -> int:
            request_id, session = item
            headers = {"X-Request-ID": request_id}
            # Not a probe: probes' request lines are logged at DEBUG only.
            return session.get(server.url + "/v1/models", headers=headers, timeout=TIMEOUT).status_code

        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            assert set(pool.map(probe, batch.items())) == {200}
        for request_id, session in batch.items():
            pid = logged_pid(server, request_id)
            if pid in pinned:
                session.close()
            else:
                pinned[pid] = session
        if set(pinned) >= workers:
            return pinned
        time.sleep(0.5)
    raise AssertionError(f"could not reach every worker: {set(pinned)} of {workers}")


def on_each_worker(server: LiveServer, body: dict[str, Any]) -> dict[int, requests.Response]:
    """Send `body` once to every worker."""
    answers: dict[int, requests.Response] = {}
    for pid, session in pinned_sessions(server).items():
        response, answered_by = post(server, body, session)
        assert answered_by == pid
        answers[pid] = response
        session.close()
    return answers


def scrape(server: LiveServer) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    text = requests.get(server.url + "/metrics", timeout=TIMEOUT).text
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def total(series: dict[str, float], prefix: str) -> float:
    return sum(value for name, value in series.items() if name.startswith(prefix))


def test_metrics_add_up_across_workers_and_forget_a_dead_worker(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    env = server_env(demo_model_dir, runtime_dir, WORKERS="2", CACHE="0")
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        assert wait_for(lambda: len(server.worker_pids()) == 2), server.log()
        answers = on_each_worker(server, vision_body())
        sent = len([line for line in request_lines(server) if line["route"] == VISION])
        assert all(response.status_code == 200 for response in answers.values())
        for _ in range(4):  # whichever worker answers the scrape, the sums are the same
            series = scrape(server)
            ok = 'glmvision_requests_total{code="none",method="POST",route="/v1/chat/vision",status="200"}'
            assert series[ok] == sent
        assert wait_for(lambda: total(scrape(server), "glmvision_model_loaded{") == 2, timeout=20)
        loaded = {name for name in scrape(server) if name.startswith("glmvision_model_loaded{")}
        assert len(loaded) == 2  # one series per live worker (its pid label)

        victim = min(server.worker_pids())
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2)

        def victim_gone() -> bool:
            names = {name for name in scrape(server) if name.startswith("glmvision_model_loaded{")}
            return not any(f'pid="{victim}"' in name for name in names)

        assert wait_for(victim_gone, timeout=20)
        assert scrape(server)[ok] == sent  # its counters still count


@needs_redis
def test_a_cache_hit_is_served_by_another_worker_through_redis(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    with redis_server(tmp_path) as port:
        env = server_env(demo_model_dir, runtime_dir, WORKERS="2", CACHE_URI=f"redis://127.0.0.1:{port}/0")
        with live_server(tmp_path, env, ready_path="/readyz") as server:
            assert wait_for(lambda: len(server.worker_pids()) == 2), server.log()
            body = vision_body(temperature=0, max_new_tokens=5, prompt="Shared?")
            (one, first_session), (other, second_session) = sorted(pinned_sessions(server).items())
            for session in (first_session, second_session):
                # Each worker loads its model first: one still loading knows no revision to key by.
                warm, _ = post(server, vision_body(temperature=0.7, max_new_tokens=1), session)
                assert warm.status_code == 200
            first, pid = post(server, body, first_session)
            assert first.headers["X-Cache"] == "miss" and pid == one
            again, pid = post(server, body, second_session)
            assert pid == other  # the other worker, which never saw this request
            assert again.headers["X-Cache"] == "hit"
            assert again.json()["result"] == first.json()["result"]


@needs_redis
@pytest.mark.parametrize("fail", ["open", "closed"])
def test_redis_killed_mid_run_behaves_as_configured(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path, fail: str
) -> None:
    with redis_server(tmp_path) as port:
        uri = f"redis://127.0.0.1:{port}"
        env = server_env(
            demo_model_dir,
            runtime_dir,
            RATE_LIMIT="1000/minute",
            RATELIMIT_STORAGE_URI=uri,
            RATELIMIT_FAIL=fail,
            CACHE_URI=uri + "/1",
            BREAKER_STORAGE_URI=uri + "/2",
        )
        with live_server(tmp_path, env, ready_path="/readyz") as server:
            body = vision_body(temperature=0, max_new_tokens=3)
            before, _ = post(server, body)
            assert before.status_code == 200 and before.headers["X-Cache"] == "miss"
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True
            )
            assert wait_for(lambda: _redis_down(port), timeout=20)
            after, _ = post(server, body)
            if fail == "open":
                assert after.status_code == 200, after.text
                assert after.headers["X-Cache"] == "miss"  # the cache degrades to a miss
            else:
                assert after.status_code == 503, after.text
                assert after.json()["error"]["code"] == "ratelimit_unavailable"
                assert int(after.headers["Retry-After"]) >= 1
            assert requests.get(server.url + "/healthz", timeout=TIMEOUT).status_code == 200
            assert "Traceback" not in server.log()


def _redis_down(port: int) -> bool:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping()
    except redis.RedisError:
        return True
    return False


STALL_HOOK = """
import os, time
_marker = os.environ.get("DRILL_STALL_FILE")
if _marker:
    import glmvision.backends.local.continuous as _continuous

    _real = _continuous.ContinuousEngine._step

    def _step(self, *args):
        if os.path.exists(_marker):
            os.unlink(_marker)
            time.sleep(3600)  # a hung CUDA call, as far as anyone can tell
        return _real(self, *args)

    _continuous.ContinuousEngine._step = _step
"""


def test_the_watchdog_replaces_a_stalled_engine(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(STALL_HOOK)
    marker = tmp_path / "stall-now"
    env = {
        **server_env(demo_model_dir, runtime_dir, STALL_SECONDS="2", CACHE="0"),
        "PYTHONPATH": os.pathsep.join((str(tmp_path), str(ROOT))),  # the hook, then this checkout
        "DRILL_STALL_FILE": str(marker),
    }
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        (old,) = model_pids(server)  # the engine process (a worker with GLMVISION_ENGINE=thread)
        marker.touch()
        response = requests.post(server.url + VISION, json=vision_body(max_new_tokens=8), timeout=TIMEOUT)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_failed"
        assert "watchdog: no model progress" in server.log()

        assert wait_for(lambda: replaced_and_ready(server, old), timeout=90), server.log()[-3000:]
        assert requests.post(server.url + VISION, json=vision_body(), timeout=TIMEOUT).status_code == 200


def test_the_audit_log_keeps_content_encrypted_and_the_key_holder_reads_it(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    from glmvision.ops.audit import new_key

    key, audit = new_key(), tmp_path / "audit.log"
    prompt = "Quarterly numbers for the board, please."
    env = server_env(demo_model_dir, runtime_dir, WORKERS="2", AUDIT_LOG=str(audit), AUDIT_KEY=key)
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        answers = [post(server, vision_body(prompt=prompt, temperature=0.5))[0] for _ in range(4)]
        log = server.log()
    assert all(answer.status_code == 200 for answer in answers)
    assert prompt not in log  # the request log never holds content
    assert prompt.encode() not in audit.read_bytes()
    read = subprocess.run(
        [sys.executable, "-m", "glmvision.cli.main", "audit-read", str(audit)],
        env={**os.environ, "GLMVISION_AUDIT_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0, read.stderr
    records = [json.loads(line) for line in read.stdout.splitlines()]
    assert len(records) == 4
    assert {record["answer"] for record in records} == {answer.json()["result"] for answer in answers}
    assert all(prompt in json.dumps(record["messages"]) for record in records)
