"""The service under real gunicorn: lazy and warm workers, bad input, API keys, shared rate limits."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import (
    ROOT,
    LiveServer,
    b64,
    free_port,
    image_b64,
    image_bytes,
    live_server,
    model_sees,
    redis_server,
    server_env,
    vision_body,
)

DEMO_ID = "glm-4.6v-flash-demo"
VISION = "/v1/chat/vision"
# What each HTTP status maps to in the error body's `type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
MODEL_LOADED = re.compile(r"model loaded: .* pid=(?P<pid>\d+)")
HTTP_TIMEOUT = 60.0
PINNING_PATH = "/openapi.json"  # public and no probe (logged at INFO): tells which worker answered


@dataclass(frozen=True)
class Access:
    """One gunicorn access-log line."""

    method: str
    path: str
    status: int
    pid: int


def access_lines(server: LiveServer) -> list[Access]:
    """Every request line (the JSON request log) the server has written so far; probes are logged
    at debug level only, so they are not among them."""
    lines = (json.loads(line) for line in server.log().splitlines() if line.startswith('{"time"'))
    return [
        Access(line["method"], line["route"], int(line["status"]), int(line["pid"]))
        for line in lines
        if line.get("message") == "request"
    ]


def loaded_pids(server: LiveServer) -> Counter[int]:
    """Count the "model loaded ... pid=N" lines per pid."""
    return Counter(int(m["pid"]) for m in MODEL_LOADED.finditer(server.log()))


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def await_lines(server: LiveServer, count: int) -> list[Access]:
    """Wait until the access log has `count` lines (it lags the responses); return them all."""
    assert wait_for(lambda: len(access_lines(server)) >= count), (
        f"expected {count} access lines:\n{server.log()}"
    )
    return access_lines(server)


def post_vision(server: LiveServer, **kwargs: Any) -> requests.Response:
    """POST /v1/chat/vision over a fresh connection."""
    kwargs.setdefault("json", vision_body())
    return requests.post(server.url + VISION, timeout=HTTP_TIMEOUT, **kwargs)


def check_vision_ok(response: requests.Response, width: int = 64, height: int = 48) -> dict[str, Any]:
    """Assert a 200 vision response has the full documented shape; return its body."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["result"], str)
    assert body["model"] == DEMO_ID
    assert body["success"] is True
    assert isinstance(body["id"], str) and body["id"].startswith("vision-")
    assert isinstance(body["created"], int)
    assert body["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert all(isinstance(value, int) for key, value in usage.items() if key != "prompt_tokens_details")
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens", "image_tokens"}
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 4  # vision_body asks for max_new_tokens=4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # What the demo model's processor makes of the upload (conftest builds the same demo model).
    assert body["image"]["width"] == width and body["image"]["height"] == height
    assert body["image"]["resized_to"] == model_sees(width, height)
    assert "reasoning" not in body
    return body


def check_error(
    response: requests.Response, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    """Assert `response` is the JSON error shape with this status, code and param."""
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    if response.request.path_url.startswith(("/v1/chat/completions", "/v1/models")):
        assert set(body) == {"error"}  # OpenAI's envelope
    else:
        assert body["success"] is False
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param", "errors"}
    assert error["errors"][0] == {"code": code, "param": param, "message": error["message"]}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["type"] == ERROR_TYPES[status], error
    return body


# --- 1. Two lazily loading workers ---------------------------------------------------------------


def test_two_lazy_workers_each_load_the_model_once(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """With warm-up off nothing loads until asked; then each serving worker loads exactly once (workers
    holding models of their own: GLMVISION_ENGINE=thread)."""
    env = server_env(demo_model_dir, runtime_dir, WORKERS="2", WARMUP="0", ENGINE="thread")
    with live_server(tmp_path, env) as server:
        assert wait_for(lambda: len(server.worker_pids()) == 2), server.log()
        workers = server.worker_pids()
        for _ in range(4):
            ready = requests.get(server.url + "/readyz", timeout=HTTP_TIMEOUT)
            assert ready.status_code == 503 and ready.json()["status"] == "not_loaded"
        assert "model loaded" not in server.log()

        responses: list[requests.Response] = []
        served: set[int] = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(6):
                responses += pool.map(lambda _: post_vision(server), range(8))
                sent = len(responses)
                assert wait_for(
                    lambda sent=sent: sum(a.path == VISION for a in access_lines(server)) >= sent
                ), server.log()
                served = {a.pid for a in access_lines(server) if a.path == VISION and a.status == 200}
                if len(served) == 2:
                    break

        ids = [check_vision_ok(response)["id"] for response in responses]
        assert len(set(ids)) == len(ids)
        assert served == workers, f"vision 200s came from {served}, workers are {workers}"
        loads = loaded_pids(server)
        assert loads == Counter(dict.fromkeys(served, 1)), server.log()
        assert server.process.pid not in loads
        assert server.worker_pids() == workers


def test_models_card_names_the_same_model_before_and_after_loading(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """/v1/models gives the id that answers will carry, whether or not the model is loaded yet."""
    with live_server(tmp_path, server_env(demo_model_dir, runtime_dir, WARMUP="0")) as server:
        before = requests.get(server.url + "/v1/models", timeout=HTTP_TIMEOUT).json()["data"][0]
        assert before["ready"] is False
        answer = check_vision_ok(post_vision(server))
        after = requests.get(server.url + "/v1/models", timeout=HTTP_TIMEOUT).json()["data"][0]
        assert after["ready"] is True
        assert after["id"] == answer["model"] == DEMO_ID
        assert (before["id"], before["demo"]) == (after["id"], after["demo"])


# --- 2. Warm-up ----------------------------------------------------------------------------------


def test_warm_up_makes_the_worker_ready_without_a_request(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """With warm-up on (the default) /readyz turns 200 by itself; /healthz answers all along."""
    with live_server(tmp_path, server_env(demo_model_dir, runtime_dir, WORKERS="1")) as server:
        ready: requests.Response | None = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            health = requests.get(server.url + "/healthz", timeout=HTTP_TIMEOUT)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            ready = requests.get(server.url + "/readyz", timeout=HTTP_TIMEOUT)
            if ready.status_code == 200:
                break
            assert ready.status_code == 503
            waiting = ready.json()
            assert waiting["ready"] is False and waiting["status"] in {"loading", "not_loaded"}
            assert ready.headers["Retry-After"] == "5"
            time.sleep(0.25)
        assert ready is not None and ready.status_code == 200, server.log()
        body = ready.json()
        engine = body.pop("engine")
        (engine_process,) = body.pop("engines")  # the default, GLMVISION_ENGINE=process: one, on the CPU
        assert engine_process["state"] == "ready" and engine_process["pid"] in server.engine_pids()
        assert body == {
            "ready": True,
            "status": "ready",
            "model": {"id": DEMO_ID, "demo": True, "device": "cpu", "dtype": "float32"},
        }
        # Warm-up loads the model but serves nothing: the engine's counters are still at zero.
        assert engine["queued"] == 0 and engine["batches"] == 0 and engine["completed"] == 0
        assert requests.get(server.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
        assert not [a for a in access_lines(server) if a.method == "POST"]
        # Quiet by default: the probes above wrote no line (in either format), and a request writes one.
        assert "/healthz" not in server.log() and "/readyz" not in server.log()
        assert post_vision(server).status_code == 200
        assert wait_for(lambda: VISION in server.log())
        assert sum(VISION in line for line in server.log().splitlines()) == 1, server.log()[-2000:]
        assert loaded_pids(server) == Counter(dict.fromkeys(server.engine_pids(), 1))


# --- 3. Bad input over real HTTP -----------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-CRC PNG whose header claims `width` x `height` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    """A real PNG cut off in the middle of its pixel data."""
    raw = image_bytes(64, 48)
    return raw[: len(raw) * 6 // 10]


def without(name: str) -> dict[str, Any]:
    """A valid vision body minus one field."""
    body = vision_body()
    del body[name]
    return body


@dataclass(frozen=True)
class Call:
    """One HTTP request to make: method, path and keyword arguments for `requests.request`."""

    method: str
    path: str
    kwargs: dict[str, Any]


def bad(
    case_id: str,
    status: int,
    code: str,
    param: str | None = None,
    *,
    body: Any = None,
    data: bytes | str | None = None,
    content_type: str = "application/json",
    method: str = "POST",
    path: str = VISION,
) -> Any:
    """One row of the table: a request (JSON `body`, or raw `data`) and the error it must get."""
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs["json"] = body
    elif data is not None:
        kwargs.update(data=data, headers={"Content-Type": content_type})
    return pytest.param(Call(method, path, kwargs), status, code, param, id=case_id)


def fields(**changes: Any) -> dict[str, Any]:
    """A valid vision body with some fields changed."""
    return vision_body(**changes)


BAD_INPUTS = [
    bad("no-image", 400, "missing_field", "image", body=without("image")),
    bad("no-prompt", 400, "missing_field", "prompt", body=without("prompt")),
    bad("prompt-int", 400, "invalid_type", "prompt", body=fields(prompt=123)),
    bad("prompt-null", 400, "invalid_type", "prompt", body=fields(prompt=None)),
    bad("image-int", 400, "invalid_type", "image", body=fields(image=123)),
    bad("image-list", 400, "invalid_type", "image", body=fields(image=[image_b64()])),
    bad("image-empty", 400, "invalid_value", "image", body=fields(image="")),
    bad("junk-base64", 400, "invalid_base64", "image", body=fields(image="!!not*base64??")),
    bad("data-url-raw", 400, "invalid_base64", "image", body=fields(image="data:image/png," + image_b64())),
    bad(
        "data-url-text",
        400,
        "unsupported_image_format",
        "image",
        body=fields(image="data:text/plain;base64," + b64(b"hello")),
    ),
    bad("truncated-png", 400, "invalid_image", "image", body=fields(image=b64(truncated_png()))),
    bad(
        "text-file",
        400,
        "unsupported_image_format",
        "image",
        body=fields(image=b64(b"just some text, not a picture\n" * 4)),
    ),
    bad("1x5000", 400, "unsupported_aspect_ratio", "image", body=fields(image=image_b64(1, 5000))),
    bad(
        "bomb-20000x20000",
        413,
        "image_too_large",
        "image",
        body=fields(image=b64(png_claiming(20000, 20000))),
    ),
    bad("bomb-8000x8000", 413, "image_too_large", "image", body=fields(image=b64(png_claiming(8000, 8000)))),
    bad("body-2MiB-over-1MiB", 413, "request_too_large", body=fields(image="A" * (2 * 1024 * 1024))),
    bad("prompt-empty", 400, "invalid_value", "prompt", body=fields(prompt="")),
    bad("prompt-whitespace", 400, "invalid_value", "prompt", body=fields(prompt=" \t\n  ")),
    bad("max_new_tokens-huge", 400, "invalid_value", "max_new_tokens", body=fields(max_new_tokens=10**9)),
    bad("max_new_tokens-0", 400, "invalid_value", "max_new_tokens", body=fields(max_new_tokens=0)),
    bad("max_new_tokens--1", 400, "invalid_value", "max_new_tokens", body=fields(max_new_tokens=-1)),
    bad("max_new_tokens-str", 400, "invalid_type", "max_new_tokens", body=fields(max_new_tokens="5")),
    bad("max_new_tokens-float", 400, "invalid_type", "max_new_tokens", body=fields(max_new_tokens=1.5)),
    bad("max_new_tokens-bool", 400, "invalid_type", "max_new_tokens", body=fields(max_new_tokens=True)),
    bad("temperature--1", 400, "invalid_value", "temperature", body=fields(temperature=-1)),
    bad("temperature-str", 400, "invalid_type", "temperature", body=fields(temperature="hot")),
    bad("top_p-0", 400, "invalid_value", "top_p", body=fields(top_p=0)),
    bad("seed--1", 400, "invalid_value", "seed", body=fields(seed=-1)),
    bad("enable_thinking-str", 400, "invalid_type", "enable_thinking", body=fields(enable_thinking="yes")),
    bad(
        "text-plain", 415, "unsupported_media_type", data=json.dumps(vision_body()), content_type="text/plain"
    ),
    bad(
        "form-encoded",
        415,
        "unsupported_media_type",
        data="prompt=hi&image=abc",
        content_type="application/x-www-form-urlencoded",
    ),
    bad("malformed-json", 400, "invalid_json", data='{"image": "abc", "prompt": '),
    bad("invalid-utf8", 400, "invalid_json", data=b'{"image": "\xff\xfe", "prompt": "x"}'),
    bad("deeply-nested-json", 400, "json_too_deep", data="[" * 50_000 + "]" * 50_000),
    bad("json-array", 400, "invalid_body", data="[]"),
    bad("json-string", 400, "invalid_body", data='"text"'),
    bad("GET-endpoint", 405, "method_not_allowed", method="GET"),
    bad("unknown-path", 404, "not_found", method="GET", path="/v1/no-such-thing"),
]


@dataclass
class BadInputServer:
    """A shared server for the bad-input table and the worker pids it started with."""

    server: LiveServer
    workers: set[int]


@pytest.fixture(scope="class")
def bad_input_server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[BadInputServer]:
    """One 1-worker server with a 1 MiB body limit for the whole table."""
    env = server_env(demo_model_dir, runtime_dir, WORKERS="1", MAX_BODY_MB="1")
    with live_server(tmp_path_factory.mktemp("bad-input"), env) as server:
        assert wait_for(lambda: len(server.worker_pids()) == 1), server.log()
        yield BadInputServer(server, server.worker_pids())


class TestBadInput:
    """Every malformed request gets a precise JSON error and no worker dies of it."""

    @pytest.mark.parametrize(("call", "status", "code", "param"), BAD_INPUTS)
    def test_bad_input_is_a_json_error(
        self, bad_input_server: BadInputServer, call: Call, status: int, code: str, param: str | None
    ) -> None:
        """The status, error code and faulty field are exact; nothing internal leaks."""
        url = bad_input_server.server.url + call.path
        response = requests.request(call.method, url, timeout=HTTP_TIMEOUT, **call.kwargs)
        check_error(response, status, code, param)
        if status == 405:
            assert "POST" in response.headers["Allow"]

    def test_server_still_serves_after_the_table(self, bad_input_server: BadInputServer) -> None:
        """A valid request still succeeds and no worker was replaced."""
        server = bad_input_server.server
        check_vision_ok(post_vision(server))
        assert server.worker_pids() == bad_input_server.workers
        log = server.log()
        assert "Traceback" not in log and "unhandled error" not in log
        assert not [a for a in access_lines(server) if a.status >= 500]
        assert "WORKER TIMEOUT" not in log and "was sent SIG" not in log


# --- 4. API keys ---------------------------------------------------------------------------------


def test_api_keys_guard_the_api_but_not_the_probes(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """401 without or with a wrong key, 200 with either key in either header; keys never logged."""
    key1, key2, wrong = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(16)
    env = server_env(demo_model_dir, runtime_dir, WORKERS="1", API_KEYS=f"{key1},{key2}", LOG_LEVEL="DEBUG")
    with live_server(tmp_path, env) as server:
        responses: list[requests.Response] = []

        def call(method: str, path: str, headers: dict[str, str] | None = None) -> requests.Response:
            kwargs: dict[str, Any] = {"json": vision_body()} if method == "POST" else {}
            response = requests.request(
                method, server.url + path, headers=headers or {}, timeout=HTTP_TIMEOUT, **kwargs
            )
            responses.append(response)
            return response

        for path, method in ((VISION, "POST"), ("/v1/models", "GET")):
            missing = call(method, path)
            check_error(missing, 401, "missing_api_key")
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            check_error(call(method, path, {"Authorization": f"Bearer {wrong}"}), 401, "invalid_api_key")
            check_error(call(method, path, {"X-API-Key": wrong}), 401, "invalid_api_key")
            check_error(call(method, path, {"Authorization": f"Basic {key1}"}), 401, "missing_api_key")

        check_vision_ok(call("POST", VISION, {"Authorization": f"Bearer {key2}"}))
        check_vision_ok(call("POST", VISION, {"X-API-Key": key1}))
        check_vision_ok(call("POST", VISION, {"Authorization": f"bearer {key1}"}))
        assert call("GET", "/v1/models", {"X-API-Key": key2}).status_code == 200

        assert call("GET", "/healthz").status_code == 200
        assert call("GET", "/readyz").status_code == 200  # the one worker loaded its model above
        assert call("GET", "/healthz", {"Authorization": f"Bearer {wrong}"}).status_code == 200

        log = server.log()
        for key in (key1, key2, wrong):
            assert key not in log
            assert all(key not in response.text for response in responses)


# --- 5. Rate limits shared through Redis ---------------------------------------------------------


def sessions_per_worker(
    server: LiveServer, workers: set[int], seconds: float = 60
) -> tuple[dict[int, requests.Session], int]:
    """Keep-alive sessions, one pinned to each worker (told apart by GET /openapi.json in the request log).

    Also returns how many access lines the server has written by then.
    """
    logged = len(access_lines(server))
    pinned: dict[int, requests.Session] = {}
    # A worker accepts only once its processor has loaded: try again until `seconds` have passed.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = [requests.Session() for _ in range(8)]
        # Open the connections at the same time so that both workers accept some.
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            opened = list(pool.map(lambda s: s.get(server.url + PINNING_PATH, timeout=HTTP_TIMEOUT), batch))
        assert all(response.status_code == 200 for response in opened)
        logged += len(batch)
        await_lines(server, logged)
        # One at a time, so the next access line belongs to this session's connection.
        for session in batch:
            assert session.get(server.url + PINNING_PATH, timeout=HTTP_TIMEOUT).status_code == 200
            logged += 1
            pid = await_lines(server, logged)[logged - 1].pid
            if pid in pinned:
                session.close()
            else:
                pinned[pid] = session
        if set(pinned) == workers:
            return pinned, logged
        time.sleep(0.5)
    for session in pinned.values():
        session.close()
    raise AssertionError(f"could not reach every worker: {set(pinned)} of {workers}")


def test_rate_limit_is_shared_by_workers_through_redis(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """5/minute per key holds across two workers; other keys and /healthz are unaffected."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    import redis

    key_a, key_b = secrets.token_hex(16), secrets.token_hex(16)
    with redis_server(tmp_path) as port:
        env = server_env(
            demo_model_dir,
            runtime_dir,
            WORKERS="2",
            WARMUP="0",
            RATE_LIMIT="5/minute",
            RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}",
            API_KEYS=f"{key_a},{key_b}",
        )
        with live_server(tmp_path, env) as server:
            assert wait_for(lambda: len(server.worker_pids()) == 2), server.log()
            workers = server.worker_pids()
            pinned, logged = sessions_per_worker(server, workers)
            # Alternate the two workers, noting which one answered each request.
            results: list[tuple[int, requests.Response]] = []
            for session in [pinned[pid] for pid in sorted(pinned)] * 4:
                response = session.get(
                    server.url + "/v1/models", headers={"X-API-Key": key_a}, timeout=HTTP_TIMEOUT
                )
                logged += 1
                line = await_lines(server, logged)[logged - 1]
                assert line.path == "/v1/models"
                results.append((line.pid, response))
            for session in pinned.values():
                session.close()

            statuses = [response.status_code for _, response in results]
            assert statuses == [200] * 5 + [429] * 3, statuses
            assert {pid for pid, _ in results[:5]} == workers, "both workers should have counted"
            for _, response in results[5:]:
                check_error(response, 429, "rate_limit_exceeded")
                retry_after = response.headers["Retry-After"]
                assert retry_after.isdigit() and int(retry_after) > 0, retry_after

            other = requests.get(
                server.url + "/v1/models", headers={"X-API-Key": key_b}, timeout=HTTP_TIMEOUT
            )
            assert other.status_code == 200, other.text
            wrong = requests.get(
                server.url + "/v1/models", headers={"X-API-Key": "not-a-key"}, timeout=HTTP_TIMEOUT
            )
            check_error(wrong, 401, "invalid_api_key")
            for headers in ({"X-API-Key": key_a}, {}):
                for _ in range(8):
                    health = requests.get(server.url + "/healthz", headers=headers, timeout=HTTP_TIMEOUT)
                    assert health.status_code == 200

            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
            try:
                stored = [name.decode("utf-8", "replace") for name in client.keys("*")]
            finally:
                client.close()
            assert stored, "the rate limiter wrote nothing to redis"
            assert any("glmvision" in name for name in stored), stored
            for name in stored:
                assert key_a not in name and key_b not in name
            for key in (key_a, key_b):
                assert key not in server.log()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "GLMVISION_WORKERS",
            "abc",
            "glmvision: GLMVISION_WORKERS (environment): Input should be a valid integer",
        ),
        (
            "GLMVISION_MODEL",
            "/models/no-such-dir",
            "glmvision: GLMVISION_MODEL=/models/no-such-dir: directory not found",
        ),
        ("GLMVISION_THREADS", "16", "glmvision: GLMVISION_THREADS=16 is too few"),
        (
            "GLMVISION_RATE_LIMIT",
            "60",
            "glmvision: GLMVISION_RATE_LIMIT (environment): not N/unit (second, minute, hour or day; "
            "several joined by ;), got '60'; e.g. GLMVISION_RATE_LIMIT=60/minute",
        ),
    ],
)
def test_a_setting_that_cannot_work_stops_gunicorn_with_one_line(
    variable: str, value: str, message: str
) -> None:
    """No traceback, no half-started server: one line naming the variable, and a failing exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env[variable] = value
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().startswith(message), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_setting_only_the_app_checks_stops_gunicorn_with_its_line_and_no_traceback(
    demo_model_dir: Path,
) -> None:
    """An allowlist entry is parsed in the worker: its one line, then gunicorn's "App failed to load"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(
        GLMVISION_MODEL=str(demo_model_dir), GLMVISION_DEVICE="cpu", GLMVISION_ALLOWED_IPS="10.0.0.0/8,bogus"
    )
    env["GLMVISION_BIND"] = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    line = "glmvision: GLMVISION_ALLOWED_IPS: 'bogus' is not an address or CIDR; e.g. GLMVISION_ALLOWED_IPS="
    ours = [text for text in result.stderr.splitlines() if text.startswith("glmvision:")]
    assert len(ours) == 1 and ours[0].startswith(line), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "App failed to load" in result.stderr


def test_a_misspelt_variable_is_warned_about_once_with_the_nearest_name(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """The master warns; the worker's create_app (which once warned again) does not."""
    env = server_env(demo_model_dir, runtime_dir, WARMUP="0") | {"GLMVISION_WORKR": "2"}
    with live_server(tmp_path, env) as server:  # ready: the worker has built its app
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        log = server.log()
    assert log.count("GLMVISION_WORKR is not a glmvision setting") == 1, log
    assert (
        "GLMVISION_WORKR is not a glmvision setting and is ignored (did you mean GLMVISION_WORKERS?)" in log
    )
