"""GLMVISION_ENGINE=process under real gunicorn: one engine process shared by every worker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import LiveServer, image_b64, live_server, server_env, vision_body

WORKERS = 4  # as deployments from the seed articles run them (gunicorn -w 4): still one engine
HTTP_TIMEOUT = 60.0
MODEL_LOADED = re.compile(r"model loaded: .* pid=(?P<pid>\d+)")
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["label", "count"],
}


@pytest.fixture(scope="module")
def process_server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process", WORKERS=str(WORKERS))
    with live_server(tmp_path_factory.mktemp("process"), env, ready_path="/readyz", timeout=180) as server:
        yield server


@pytest.fixture(scope="module")
def thread_server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, ENGINE="thread")
    with live_server(tmp_path_factory.mktemp("thread"), env, ready_path="/readyz", timeout=180) as server:
        yield server


def readyz(server: LiveServer) -> dict[str, Any]:
    # A new connection each time: gunicorn hands it to whichever worker accepts first.
    return requests.get(server.url + "/readyz", timeout=HTTP_TIMEOUT, headers={"Connection": "close"}).json()


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def engine_of(body: dict[str, Any]) -> dict[str, Any]:
    engines = body.get("engines") or []
    assert len(engines) == 1, body
    return engines[0]


def vision(server: LiveServer, **fields: Any) -> requests.Response:
    body = vision_body(**{"temperature": 0, "max_new_tokens": 12, **fields})
    return requests.post(server.url + "/v1/chat/vision", json=body, timeout=HTTP_TIMEOUT)


def completion(server: LiveServer, **fields: Any) -> requests.Response:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}},
        {"type": "text", "text": "Describe it as JSON."},
    ]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 40, **fields}
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)


def test_every_worker_uses_the_one_engine_and_holds_no_weights(process_server: LiveServer) -> None:
    engines: dict[int, int] = {}

    def all_workers_answered() -> bool:
        body = readyz(process_server)
        if not body["ready"]:
            return False  # a worker still loading its processor: ask again
        assert body["engine"]["mode"] == "process"
        assert body["engine"]["worker_weights"] == 0, body
        engines[int(body["engine"]["worker_pid"])] = int(engine_of(body)["pid"])
        return len(engines) == WORKERS

    wait_for(all_workers_answered, 60, f"{WORKERS} distinct workers to answer /readyz")
    (engine_pid,) = set(engines.values())
    assert engine_pid not in engines
    # The master's children: the workers, the engine (and multiprocessing's resource tracker).
    assert set(engines) <= process_server.worker_pids() and process_server.engine_pids() == {engine_pid}
    # Only the engine process loaded the model's weights: one "model loaded" line, with its pid.
    loaded = {int(m["pid"]) for m in MODEL_LOADED.finditer(process_server.log())}
    assert loaded == {engine_pid}, process_server.log()[-3000:]


def metric(server: LiveServer, name: str) -> float:
    """The value of one series in /metrics (0 when absent)."""
    text = requests.get(server.url + "/metrics", timeout=HTTP_TIMEOUT).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_follow_up_questions_report_their_cached_prompt_tokens(process_server: LiveServer) -> None:
    """Questions about one image: from the second on, the engine reuses the prompt's start, which
    usage reports as cached_tokens on both routes, streamed and not, and /metrics counts."""
    image = image_b64(200, 150)  # no other test sends this size: the first question is a miss
    first = vision(process_server, image=image, prompt="What is the first thing you see?")
    assert first.status_code == 200, first.text
    details = first.json()["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == 0 and details["image_tokens"] > 0
    second = vision(process_server, image=image, prompt="What is the second thing you see?")
    details = second.json()["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] <= details["cached_tokens"] < second.json()["usage"]["prompt_tokens"]

    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
        {"type": "text", "text": "What is the third thing you see?"},
    ]
    messages = [{"role": "user", "content": content}]
    plain = completion(process_server, messages=messages, max_tokens=4)
    assert plain.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, plain.json()["usage"]
    content[1]["text"] = "What is the fourth thing you see?"
    body = {"messages": messages, "temperature": 0, "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    streamed = requests.post(process_server.url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: {")]
    usage = [event for event in map(json.loads, events) if event.get("usage")][-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0, usage

    hits = 'glmvision_model_cache_lookups_total{cache="prefix",result="hit"}'
    assert wait_for(lambda: metric(process_server, hits) >= 3, 30, "the prefix hits in /metrics")
    assert metric(process_server, "glmvision_prefix_cache_reused_tokens_total") > 0
    assert metric(process_server, 'glmvision_model_cache_bytes{cache="prefix"}') > 0
    # Each worker's /readyz shows the engine's last health report to it (one every half second).
    counters = wait_for(
        lambda: (c := engine_of(readyz(process_server))["counters"])["prefix_hits"] >= 3 and c,
        30,
        "the prefix hits in /readyz",
    )
    assert counters["prefix_reused_tokens"] > 0 and counters["prefix_bytes"] > 0, counters


def test_greedy_answers_equal_the_in_process_engine(
    process_server: LiveServer, thread_server: LiveServer
) -> None:
    def answers(server: LiveServer) -> list[Any]:
        one = vision(server, prompt="What is in this picture?")
        assert one.status_code == 200, one.text
        with ThreadPoolExecutor(4) as pool:
            prompts = [f"Question {i}: what colour?" for i in range(4)]
            batch = list(pool.map(lambda p: vision(server, prompt=p, max_new_tokens=8 + len(p) % 5), prompts))
        assert all(r.status_code == 200 for r in batch), [r.text for r in batch]
        schema = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
        constrained = completion(server, response_format=schema)
        assert constrained.status_code == 200, constrained.text
        message = constrained.json()["choices"][0]["message"]["content"]
        return [one.json()["result"], [r.json()["result"] for r in batch], message]

    through_process = answers(process_server)
    assert through_process == answers(thread_server)
    assert through_process[2].startswith("{")  # the grammar reached the engine process


def test_a_client_that_hangs_up_frees_its_row(process_server: LiveServer) -> None:
    body = vision_body(temperature=0, max_new_tokens=2048, stream=True)
    url = process_server.url + "/v1/chat/vision"
    response = requests.post(url, json=body, stream=True, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    lines = response.iter_lines()
    next(lines)  # the first event: generation is under way
    wait_for(lambda: engine_of(readyz(process_server))["running"] >= 1, 30, "the engine to run the row")
    response.close()  # the client hangs up mid-answer
    wait_for(lambda: engine_of(readyz(process_server))["running"] == 0, 30, "the row to be freed")


def test_a_killed_engine_is_restarted_and_its_requests_get_503(process_server: LiveServer) -> None:
    old = int(engine_of(readyz(process_server))["pid"])

    # Prompts of their own: an answer from the response cache would never reach the engine.
    def long_request() -> requests.Response:
        # min_tokens: random weights may emit a stop token early; these rows run all their steps.
        messages = [{"role": "user", "content": f"long {time.monotonic_ns()}"}]
        return completion(process_server, max_tokens=2048, min_tokens=2048, messages=messages)

    def probe() -> requests.Response:
        return vision(process_server, prompt=f"probe {time.monotonic_ns()}")

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(long_request) for _ in range(2)]
        # Both rows, not one: a worker's report may be half a second old, and only these two can make 2.
        wait_for(lambda: engine_of(readyz(process_server))["running"] >= 2, 30, "both rows in the engine")
        os.kill(old, signal.SIGKILL)
        # In a list: a 503 Response is falsy.
        (refused,) = wait_for(
            lambda: [r] if (r := probe()).status_code == 503 else None, 30, "a 503 while it restarts"
        )
        results = [future.result(timeout=HTTP_TIMEOUT) for future in running]
    assert refused.json()["error"]["code"] in {"engine_restarting", "model_loading"}, refused.text
    assert "Retry-After" in refused.headers
    codes = [r.json()["error"]["code"] if r.status_code == 503 else r.status_code for r in results]
    # One was running in the killed engine; the other may have been sent in before or after it died.
    assert "engine_restarting" in codes, codes
    assert set(codes) <= {200, "engine_restarting", "model_loading"}, codes

    def restarted() -> bool:
        body = readyz(process_server)
        return bool(body["ready"]) and int(engine_of(body)["pid"]) != old

    wait_for(restarted, 120, "a new engine process")
    # Each worker learns of the new engine at its next health report (every half second).
    wait_for(lambda: probe().status_code == 200, 30, "an answer from the new engine")


def test_two_engines_share_the_requests_and_report_their_batches(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    """GLMVISION_ENGINES=2 (on a GPU box, one per GPU): each request goes to the less loaded engine."""
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process", ENGINES="2", WORKERS="2")
    with live_server(tmp_path, env, ready_path="/readyz", timeout=180) as server:
        engines = readyz(server)["engines"]
        assert len(engines) == 2 and all(engine["state"] == "ready" for engine in engines), engines
        assert len({engine["pid"] for engine in engines}) == 2
        with ThreadPoolExecutor(8) as pool:
            prompts = [f"Question {i} {time.monotonic_ns()}" for i in range(8)]
            answers = list(pool.map(lambda p: vision(server, prompt=p, max_new_tokens=16), prompts))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]

        def both_served() -> list[int] | None:
            served = [int(engine["counters"]["completed"]) for engine in readyz(server)["engines"]]
            return served if sum(served) >= 8 else None

        served = wait_for(both_served, 30, "both engines' reports to count the answers")
        assert all(count > 0 for count in served), served
        metrics = requests.get(server.url + "/metrics", timeout=HTTP_TIMEOUT).text
        # The engines' model calls reach the workers' batch-size histogram (each counted by one worker).
        batches = re.search(r"^glmvision_batch_size_count (\S+)$", metrics, re.MULTILINE)
        assert batches is not None and float(batches.group(1)) > 0, metrics[-2000:]


def test_workers_refuse_in_front_when_the_engine_is_full(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    """The engine holds one request at most here: a worker that holds none still refuses the next."""
    settings = {"ENGINE": "process", "WORKERS": "3", "MAX_BATCH_SIZE": "1", "MAX_QUEUE": "1"}
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS="30000", **settings)
    with live_server(tmp_path, env, ready_path="/readyz", timeout=180) as server:

        def long_stream() -> requests.Response:
            # Streamed, so that closing it ends the row (its client hangs up) when the test is done.
            content = f"long {time.monotonic_ns()}"
            body = {"messages": [{"role": "user", "content": content}], "stream": True}
            body.update(max_tokens=30000, min_tokens=30000, temperature=0)
            url = server.url + "/v1/chat/completions"
            response = requests.post(url, json=body, stream=True, timeout=HTTP_TIMEOUT)
            assert response.status_code == 200, response.text
            return response

        pool = ThreadPoolExecutor(2)
        # One running, one queued: all the engine holds. (A stream's headers may wait for its row.)
        streams = [pool.submit(long_stream) for _ in range(2)]
        try:
            full_in: set[int] = set()

            def every_worker_knows() -> bool:
                body = readyz(server)
                if body.get("engines") and engine_of(body)["full"]:
                    full_in.add(int(body["engine"]["worker_pid"]))
                return len(full_in) == 3

            wait_for(every_worker_knows, 60, "every worker to hear that the engine is full")
            # Each probe lands on any of the three workers; at least one of them holds no request,
            # so without the engine's word some probes would be queued, not refused.
            probes = [vision(server, prompt=f"probe {i} {time.monotonic_ns()}") for i in range(6)]
        finally:
            for done in as_completed(streams, timeout=HTTP_TIMEOUT):
                done.result().close()
            pool.shutdown()
        assert [r.status_code for r in probes] == [503] * 6, [r.text for r in probes]
        assert {r.json()["error"]["code"] for r in probes} == {"overloaded"}
        assert all("Retry-After" in r.headers for r in probes)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (its parent gone too) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_a_signal_to_the_whole_group_stops_the_engine_once_and_last(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    """`kill -- -PGID` (a terminal's Ctrl-C, a service manager) reaches the master, not the engine,
    which runs in a session of its own: the master stops it after the workers, never restarting it."""
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process")
    with live_server(tmp_path, env, ready_path="/readyz", timeout=180, new_session=True) as server:
        (engine,) = server.engine_pids()
        os.killpg(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        wait_for(lambda: not pid_alive(engine), 30, "the engine process to stop")
        log = server.log()
    assert "died; starting another" not in log, log[-3000:]


def test_an_engine_does_not_outlive_a_killed_master(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process")
    with live_server(tmp_path, env, ready_path="/readyz", timeout=180) as server:
        (engine,) = server.engine_pids()
        server.process.kill()  # SIGKILL: the master cannot stop anything
        server.process.wait(timeout=30)
        wait_for(lambda: not pid_alive(engine), 30, "the orphaned engine process to stop")
        assert "the gunicorn master (pid" in server.log()


def test_the_master_starts_the_engine_without_importing_torch(demo_model_dir: Path) -> None:
    """The gunicorn master forks the workers: it loads its config and the engine's supervisor, never torch."""
    import subprocess
    import sys

    code = (
        "import logging, sys, types; import glmvision.server.gunicorn_conf as conf; "
        "server = types.SimpleNamespace(log=logging.getLogger('test')); "
        "conf.on_starting(server); heavy = sorted({'torch', 'transformers'} & set(sys.modules)); "
        "conf.on_exit(server); print(heavy)"
    )
    env = {**os.environ, "GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_ENGINE": "process"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
