"""GLMVISION_BACKEND=openai against real OpenAI-compatible upstreams on loopback: a glmvision on the
local backend (and `transformers serve`, when its packages are there)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from helpers import (
    LiveServer,
    apart_from_reuse,
    free_port,
    image_b64,
    live_server,
    server_env,
    stop,
    vision_body,
    wait_for,
)

from glmvision.web.state import app_state

HTTP_TIMEOUT = 60
MODEL_ID = "upstream-demo"
KEY = secrets.token_hex(16)
# The upstream's own limit, below the front's default (2048): a longer request is the upstream's to refuse.
UPSTREAM_MAX_NEW_TOKENS = 1600


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    """The module's upstream: glmvision on the demo model, keyed, under its own model id."""
    env = server_env(
        demo_model_dir,
        runtime_dir,
        API_KEYS=KEY,
        MODEL_ID=MODEL_ID,
        MAX_NEW_TOKENS=str(UPSTREAM_MAX_NEW_TOKENS),
        CACHE="0",
    )
    with live_server(tmp_path_factory.mktemp("upstream"), env, ready_path="/readyz") as server:
        yield server


@pytest.fixture
def front(make_app: Callable[..., Flask], upstream: LiveServer) -> Iterator[FlaskClient]:
    """glmvision forwarding to the module's upstream."""
    app = make_app(backend="openai", upstream_url=upstream.url + "/v1", upstream_key=KEY, cache="0")
    with app.test_client() as client:
        yield client


def direct(server: LiveServer, path: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    """POST straight to the upstream, with its key."""
    headers = {"Authorization": f"Bearer {KEY}"}
    return requests.post(server.url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)


def data_url(width: int = 64, height: int = 48) -> str:
    return "data:image/png;base64," + image_b64(width, height)


def user(text: str, *sizes: tuple[int, int]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(w, h)}} for w, h in sizes
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def greedy(tokens: int, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A chat completion body for a greedy answer of exactly `tokens` tokens."""
    return {"messages": messages, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, **fields}


def sse(lines: Iterator[bytes], done: bool = True) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, up to [DONE] (which must come, if `done`)."""
    payloads = []
    for line in lines:
        for text in line.decode("utf-8").splitlines():
            if not text:
                continue
            assert text.startswith("data: "), text
            if text == "data: [DONE]":
                return payloads
            payloads.append(json.loads(text[len("data: ") :]))
    assert not done, "the stream ended without [DONE]"
    return payloads


def content(payloads: list[dict[str, Any]]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p.get("choices"))


def test_vision_answer_equals_the_upstreams(front: FlaskClient, upstream: LiveServer) -> None:
    body = vision_body(temperature=0, max_new_tokens=12, image=image_b64(80, 60))
    ours = front.post("/v1/chat/vision", json=body)
    theirs = direct(upstream, "/v1/chat/vision", body)
    assert ours.status_code == theirs.status_code == 200, ours.get_json()
    assert ours.get_json()["result"] == theirs.json()["result"]
    assert apart_from_reuse(ours.get_json()["usage"]) == apart_from_reuse(theirs.json()["usage"])
    assert ours.get_json()["model"] == MODEL_ID


def test_chat_answer_equals_the_upstreams(front: FlaskClient, upstream: LiveServer) -> None:
    body = {"image_url": data_url(), "prompt": "Describe it.", "max_new_tokens": 10, "temperature": 0}
    ours = front.post("/v1/chat", json=body)
    theirs = direct(upstream, "/v1/chat", body)
    assert ours.status_code == theirs.status_code == 200, ours.get_json()
    assert ours.get_json()["response"] == theirs.json()["response"]


def test_completion_equals_the_upstreams(front: FlaskClient, upstream: LiveServer) -> None:
    body = greedy(9, [user("What is this?", (64, 48))], seed=3)
    ours = front.post("/v1/chat/completions", json=body)
    theirs = direct(upstream, "/v1/chat/completions", body)
    assert ours.status_code == theirs.status_code == 200, ours.get_json()
    mine, upstreams = ours.get_json(), theirs.json()
    assert mine["choices"][0]["message"] == upstreams["choices"][0]["message"]
    assert mine["choices"][0]["finish_reason"] == upstreams["choices"][0]["finish_reason"] == "length"
    assert apart_from_reuse(mine["usage"]) == apart_from_reuse(upstreams["usage"])
    assert mine["usage"]["completion_tokens"] == 9


def test_multi_image_completion_equals_the_upstreams(front: FlaskClient, upstream: LiveServer) -> None:
    messages = [user("Compare them.", (64, 48), (40, 90)), {"role": "assistant", "content": "Two."}]
    messages.append(user("And now?", (50, 50)))
    body = greedy(8, messages)
    ours = front.post("/v1/chat/completions", json=body)
    theirs = direct(upstream, "/v1/chat/completions", body)
    assert ours.status_code == theirs.status_code == 200, ours.get_json()
    assert ours.get_json()["choices"][0]["message"] == theirs.json()["choices"][0]["message"]
    # Three images' worth of prompt: more than one image alone makes.
    single = direct(upstream, "/v1/chat/completions", greedy(8, [user("And now?", (50, 50))])).json()
    assert ours.get_json()["usage"]["prompt_tokens"] == theirs.json()["usage"]["prompt_tokens"]
    assert ours.get_json()["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]


def test_stream_is_passed_through_chunk_by_chunk(front: FlaskClient, upstream: LiveServer) -> None:
    body = greedy(24, [user("Tell me.", (64, 48))], stream=True, stream_options={"include_usage": True})
    response = front.post("/v1/chat/completions", json=body, buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    payloads = sse(response.response)  # type: ignore[arg-type]
    pieces = [p for p in payloads if p.get("choices") and p["choices"][0]["delta"].get("content")]
    assert len(pieces) > 1, "the answer came in one piece"
    whole = direct(upstream, "/v1/chat/completions", {**body, "stream": False}).json()
    assert content(payloads) == whole["choices"][0]["message"]["content"]
    finishes = [p["choices"][0]["finish_reason"] for p in payloads if p.get("choices")]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert payloads[-1]["choices"] == []
    assert apart_from_reuse(payloads[-1]["usage"]) == apart_from_reuse(whole["usage"])
    assert payloads[-1]["usage"]["completion_tokens"] == 24


def test_one_connection_serves_request_after_request(
    make_app: Callable[..., Flask], upstream: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib3.connection

    connects: list[int] = []
    real_connect = urllib3.connection.HTTPConnection.connect

    def counted(connection: urllib3.connection.HTTPConnection) -> None:
        connects.append(connection.port or 0)
        real_connect(connection)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", counted)
    app = make_app(backend="openai", upstream_url=upstream.url + "/v1", upstream_key=KEY, cache="0")
    client = app.test_client()
    body = greedy(3, [user("Again?", (64, 48))])
    for stream in (False, True, False, True):
        response = client.post("/v1/chat/completions", json={**body, "stream": stream}, buffered=False)
        assert response.status_code == 200
        if stream:
            sse(response.response)  # type: ignore[arg-type]
        response.close()
    # Each answer read to the end of its body, so its connection went back to the pool for the next.
    assert len(connects) == 1


def test_stop_strings_end_the_answer_here_as_upstream(front: FlaskClient, upstream: LiveServer) -> None:
    plain = direct(upstream, "/v1/chat/completions", greedy(20, [user("Go.", (64, 48))])).json()
    text = plain["choices"][0]["message"]["content"]
    stop = text[5:8]
    assert stop.strip(), f"no usable stop string in {text!r}"
    body = greedy(20, [user("Go.", (64, 48))], stop=[stop])
    ours = front.post("/v1/chat/completions", json=body).get_json()
    theirs = direct(upstream, "/v1/chat/completions", body).json()
    assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    assert stop not in ours["choices"][0]["message"]["content"]
    assert ours["choices"][0]["finish_reason"] == "stop"


def test_models_and_default_model_come_from_the_upstream(front: FlaskClient) -> None:
    listed = front.get("/v1/models").get_json()["data"]
    assert [card["id"] for card in listed] == [MODEL_ID]
    assert listed[0]["ready"] is True
    named = front.post("/v1/chat/completions", json=greedy(3, [user("Hi.")], model=MODEL_ID))
    assert named.status_code == 200, named.get_json()
    assert named.get_json()["model"] == MODEL_ID
    other = front.post("/v1/chat/completions", json=greedy(3, [user("Hi.")], model="glm-4.6v-flash"))
    assert other.status_code == 404
    assert other.get_json()["error"]["code"] == "model_not_found"


def test_readyz_reflects_a_live_upstream(front: FlaskClient, upstream: LiveServer) -> None:
    response = front.get("/readyz")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "ready"
    assert body["engine"]["upstream"] == upstream.url + "/v1"


def test_a_request_the_upstream_refuses_is_upstream_rejected(front: FlaskClient) -> None:
    # The front allows 2048 new tokens; the upstream only UPSTREAM_MAX_NEW_TOKENS.
    body = {"messages": [user("Hi.")], "max_tokens": UPSTREAM_MAX_NEW_TOKENS + 1}
    response = front.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "upstream_rejected"
    assert "max_tokens" in error["message"]  # the upstream's own words
    native = front.post("/v1/chat/vision", json=vision_body(max_new_tokens=UPSTREAM_MAX_NEW_TOKENS + 1))
    assert native.status_code == 400
    assert native.get_json()["error"]["code"] == "upstream_rejected"
    assert app_state(front.application).service.backend.counters.rejected == 2


def test_a_refused_connection_is_upstream_unavailable(make_app: Callable[..., Flask]) -> None:
    app = make_app(backend="openai", upstream_url=f"http://127.0.0.1:{free_port()}/v1", upstream_model="m")
    client = app.test_client()
    for path, body in (
        ("/v1/chat/vision", vision_body()),
        ("/v1/chat/completions", {"messages": [user("Hi.")], "stream": True}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "upstream_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    assert app_state(app).service.backend.counters.unavailable == 2
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["status"] == "unhealthy"
    assert app_state(app).service.backend.health().occupancy == 0  # every place given back


def test_a_wrong_key_is_upstream_unavailable_not_the_clients_fault(
    make_app: Callable[..., Flask], upstream: LiveServer
) -> None:
    app = make_app(backend="openai", upstream_url=upstream.url + "/v1", upstream_key="wrong")
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    response = client.post("/v1/chat/vision", json=vision_body())
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_unavailable"


def test_an_upstream_killed_mid_stream_ends_the_stream_with_an_error(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path, make_app: Callable[..., Flask]
) -> None:
    with live_server(tmp_path, server_env(demo_model_dir, runtime_dir), ready_path="/readyz") as doomed:
        app = make_app(backend="openai", upstream_url=doomed.url + "/v1", request_timeout="60")
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        body = greedy(1500, [user("Write at length.", (64, 48))], stream=True)
        response = client.post("/v1/chat/completions", json=body, buffered=False)
        assert response.status_code == 200
        chunks = iter(response.response)  # type: ignore[arg-type]
        seen = b""
        while seen.count(b'"content"') < 4:
            seen += next(chunks)
        for pid in (*doomed.worker_pids(), doomed.process.pid):
            os.kill(pid, signal.SIGKILL)
        doomed.process.wait(timeout=10)
        payloads = sse(chunks)  # [DONE] must come: the stream ends rather than hangs
        errors = [p["error"] for p in payloads if "error" in p]
        assert errors, "the stream ended as if the answer were whole"
        assert errors[-1]["code"] == "upstream_unavailable"
        assert not any(p["choices"][0]["finish_reason"] for p in payloads if p.get("choices"))
        backend = app_state(app).service.backend
        assert backend.counters.unavailable == 1
        assert backend.health().occupancy == 0
        # /readyz follows the upstream down (its probe is cached for a couple of seconds).
        assert wait_for(lambda: client.get("/readyz").status_code == 503, timeout=10)


def transformers_cli() -> str | None:
    """This environment's `transformers` command, if it can serve (fastapi and uvicorn installed)."""
    import importlib.util
    import shutil
    import sys

    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        return None
    beside = Path(sys.executable).parent / "transformers"
    return str(beside) if beside.exists() else shutil.which("transformers")


@pytest.fixture
def transformers_serve(tmp_path: Path, demo_model_dir: Path) -> Iterator[str]:
    """`transformers serve` on the demo model (as bench/run.py starts it); its base URL."""
    import subprocess

    cli = transformers_cli()
    if cli is None:
        pytest.skip("transformers serve needs transformers[serving] (pip install -r requirements-bench.txt)")
    port = free_port()
    command = [
        cli,
        "serve",
        str(demo_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log_path = tmp_path / "transformers-serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*command, "--no-continuous-batching"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log_path.read_text(errors="replace")
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        assert wait_for(healthy, timeout=120), log_path.read_text(errors="replace")
        yield url
    finally:
        stop(process, grace=20)


def test_transformers_serve_as_the_upstream(transformers_serve: str, make_app: Callable[..., Flask]) -> None:
    from glmvision.postprocess.output import render

    app = make_app(backend="openai", upstream_url=transformers_serve + "/v1", cache="0")
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    model = requests.get(transformers_serve + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert client.get("/v1/models").get_json()["data"][0]["id"] == model  # its first id by default
    messages = [user("What is this?", (64, 48))]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    ours = client.post("/v1/chat/completions", json=body)
    assert ours.status_code == 200, ours.get_json()
    # What we send it: the same request, whole, thinking off, the image as we re-encode it (PNG).
    sent = {**body, "model": model, "chat_template_kwargs": {"enable_thinking": False}}
    theirs = requests.post(transformers_serve + "/v1/chat/completions", json=sent, timeout=120).json()
    answer = theirs["choices"][0]["message"]["content"]
    assert ours.get_json()["choices"][0]["message"]["content"] == render(answer, False).answer
    assert ours.get_json()["usage"]["completion_tokens"] == 8
    # Streamed, we stream from it too (its stream holds back a half-written UTF-8 character).
    direct_stream = requests.post(
        transformers_serve + "/v1/chat/completions", json={**sent, "stream": True}, stream=True, timeout=120
    )
    theirs_streamed = sse(direct_stream.iter_lines(), done=False)  # no [DONE]: its finish chunk ends it
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, buffered=False)
    payloads = sse(streamed.response)  # type: ignore[arg-type]
    assert content(payloads) == render(content(theirs_streamed), False).answer
    assert [p["choices"][0]["finish_reason"] for p in payloads if p.get("choices")][-1] == "length"


class Scripted:
    """A loopback OpenAI-compatible server answering every chat completion with `events` (or `status`)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.events: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0  # seconds before any answer
        self.bodies: list[dict[str, Any]] = []
        self.gets = 0  # GET /v1/models: the backend's probes and model lookups
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                scripted.gets += 1
                time.sleep(scripted.delay)
                self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted"}]}).encode())

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                scripted.bodies.append(json.loads(self.rfile.read(length)))
                time.sleep(scripted.delay)
                if scripted.status != 200:
                    self._send(
                        scripted.status, json.dumps({"error": {"message": "scripted failure"}}).encode()
                    )
                    return
                if not scripted.bodies[-1].get("stream"):
                    status, whole = scripted.whole()
                    self._send(status, json.dumps(whole).encode())
                    return
                text = (
                    "".join(f"data: {json.dumps(event)}\n\n" for event in scripted.events)
                    + "data: [DONE]\n\n"
                )
                self._send(200, text.encode(), "text/event-stream")

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (the slow test) is expected here, not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def whole(self) -> tuple[int, dict[str, Any]]:
        """The events as one chat completion, as an engine answers `"stream": false` (500 on an error)."""
        message: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": ""}
        finish, usage = None, None
        calls: dict[int, dict[str, Any]] = {}
        for event in self.events:
            if "error" in event:
                return 500, {"error": event["error"]}
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                for field in ("content", "reasoning_content"):
                    message[field] += choice["delta"].get(field) or ""
                for piece in choice["delta"].get("tool_calls") or ():  # OpenAI's pieces, joined
                    call = calls.setdefault(piece["index"], {"id": "", "type": "function", "function": {}})
                    call["id"] = piece.get("id") or call["id"]
                    for key, value in (piece.get("function") or {}).items():
                        call["function"][key] = call["function"].get(key, "") + value
                finish = choice.get("finish_reason") or finish
        if calls:
            message["tool_calls"] = [calls[index] for index in sorted(calls)]
        completion = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        return 200, {**completion, "usage": usage}


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.shutdown()
    server.server.server_close()


def chunk(finish: str | None = None, usage: dict[str, int] | None = None, **delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}


def test_reasoning_content_deltas_are_reasoning(scripted: Scripted, make_app: Callable[..., Flask]) -> None:
    scripted.events = [
        chunk(role="assistant"),
        chunk(reasoning_content="Let me "),
        chunk(reasoning_content="look."),
        chunk(content="A cat"),
        chunk(content=". STOP and more"),
        chunk("stop", {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}),
    ]
    client = make_app(backend="openai", upstream_url=scripted.url).test_client()
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    body = {"messages": [user("What?", (64, 48))], "max_tokens": 50, "stop": [" STOP"], **thinking}
    answer = client.post("/v1/chat/completions", json=body).get_json()
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "A cat.",
        "reasoning_content": "Let me look.",
    }
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    sent = scripted.bodies[-1]
    assert sent["model"] == "scripted" and sent["stop"] == [" STOP"]
    assert sent["stream"] is False and "stream_options" not in sent  # a whole answer is asked whole
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    image = sent["messages"][0]["content"][0]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, buffered=False)
    payloads = sse(streamed.response)  # type: ignore[arg-type]
    assert scripted.bodies[-1]["stream"] is True
    assert scripted.bodies[-1]["stream_options"] == {"include_usage": True}
    reasoning = "".join(p["choices"][0]["delta"].get("reasoning_content") or "" for p in payloads)
    assert reasoning == "Let me look." and content(payloads) == "A cat."
    # Without thinking the reasoning is not the client's.
    plain = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {}}).get_json()
    assert plain["choices"][0]["message"]["content"] == "A cat."
    assert plain["choices"][0]["message"].get("reasoning_content") is None


def test_upstream_failures_map_to_our_errors(scripted: Scripted, make_app: Callable[..., Flask]) -> None:
    app = make_app(backend="openai", upstream_url=scripted.url)
    client = app.test_client()
    body = {"messages": [user("What?")], "max_tokens": 5}
    for status, code, http in ((500, "upstream_unavailable", 503), (422, "upstream_rejected", 400)):
        scripted.status = status
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == http, response.get_json()
        assert response.get_json()["error"]["code"] == code
    assert "scripted failure" in response.get_json()["error"]["message"]
    scripted.status = 200
    scripted.events = [chunk(content="half"), {"error": {"message": "engine died", "code": "engine_failed"}}]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    scripted.events = [chunk(content="cut short")]  # no finish_reason, then [DONE]
    response = client.post("/v1/chat/vision", json=vision_body())
    assert response.status_code == 503
    counters = app_state(app).service.backend.counters
    assert (counters.unavailable, counters.rejected) == (3, 1)
    exported = client.get("/metrics").get_data(as_text=True)
    assert 'glmvision_upstream_failures_total{code="upstream_unavailable"} 3.0' in exported
    assert 'glmvision_upstream_failures_total{code="upstream_rejected"} 1.0' in exported


def test_a_gunicorn_front_serves_the_upstream(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path, upstream: LiveServer
) -> None:
    # No model given: the front must not need one (nor check one) to forward.
    env = server_env(demo_model_dir, runtime_dir, BACKEND="openai", UPSTREAM_URL=upstream.url + "/v1")
    env.update(GLMVISION_MODEL=str(tmp_path / "no-such-model"), GLMVISION_UPSTREAM_KEY=KEY)
    with live_server(tmp_path, env, ready_path="/readyz") as front_server:
        body = greedy(10, [user("Hi.", (64, 48))])
        ours = requests.post(front_server.url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)
        theirs = direct(upstream, "/v1/chat/completions", body)
        assert ours.status_code == 200, ours.text
        assert ours.json()["choices"][0]["message"] == theirs.json()["choices"][0]["message"]
        metrics = requests.get(front_server.url + "/metrics", timeout=HTTP_TIMEOUT)
        assert metrics.status_code == 200


def test_upstream_concurrency_bounds_requests_in_flight(
    make_app: Callable[..., Flask], upstream: LiveServer
) -> None:
    app = make_app(
        backend="openai",
        upstream_url=upstream.url + "/v1",
        upstream_key=KEY,
        upstream_concurrency="1",
        queue_timeout="0.5",
    )
    client = app.test_client()
    long = greedy(1500, [user("Go on.")], stream=True)
    held = client.post("/v1/chat/completions", json=long, buffered=False)
    chunks = iter(held.response)  # type: ignore[arg-type]
    next(chunks)  # under way upstream, holding the only connection
    waiting = client.post("/v1/chat/completions", json=greedy(3, [user("Hi.")]))
    assert waiting.status_code == 503, waiting.get_json()
    assert waiting.get_json()["error"]["code"] == "queue_timeout"
    assert "Retry-After" in waiting.headers
    held.close()  # the client leaves: its connection goes back
    assert app_state(app).service.backend.running == 0
    after = client.post("/v1/chat/completions", json=greedy(3, [user("Hi.")]))
    assert after.status_code == 200, after.get_json()


def test_our_model_id_fronts_the_upstreams(make_app: Callable[..., Flask], upstream: LiveServer) -> None:
    app = make_app(
        backend="openai",
        upstream_url=upstream.url + "/v1",
        upstream_key=KEY,
        model_id="ours",
        model_aliases="a",
    )
    client = app.test_client()
    assert [card["id"] for card in client.get("/v1/models").get_json()["data"]] == ["ours"]
    answer = client.post("/v1/chat/completions", json=greedy(3, [user("Hi.")], model="a"))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["model"] == "a"
    assert client.post("/v1/chat/vision", json=vision_body()).get_json()["model"] == "ours"
    # Upstream it is still the upstream's id: a name it does not know would be refused there.
    assert app_state(app).service.backend.capabilities().revision.endswith(":" + MODEL_ID)


def test_a_slow_upstream_is_unavailable_and_not_ready(
    scripted: Scripted, make_app: Callable[..., Flask]
) -> None:
    app = make_app(
        backend="openai", upstream_url=scripted.url, upstream_model="scripted", request_timeout="1"
    )
    client = app.test_client()
    scripted.delay = 4.0  # longer than the request's deadline and /readyz's probe
    response = client.post("/v1/chat/vision", json=vision_body())
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert "in time" in response.get_json()["error"]["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["engine"]["unavailable"] == 1


def test_the_openai_backend_needs_an_upstream_url_and_keeps_its_key_secret() -> None:
    from glmvision.core.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="GLMVISION_UPSTREAM_URL"):
        load_settings({"GLMVISION_BACKEND": "openai"})
    with pytest.raises(ConfigError, match="http"):
        load_settings({"GLMVISION_BACKEND": "openai", "GLMVISION_UPSTREAM_URL": "10.0.0.5:8000/v1"})
    with pytest.raises(ConfigError, match="GLMVISION_BACKEND"):
        load_settings({"GLMVISION_BACKEND": "vllm", "GLMVISION_UPSTREAM_URL": "http://127.0.0.1:1/v1"})
    settings = load_settings(
        {
            "GLMVISION_BACKEND": "openai",
            "GLMVISION_UPSTREAM_URL": "http://x/v1",
            "GLMVISION_UPSTREAM_KEY": "s3cret",
        }
    )
    assert "s3cret" not in repr(settings)
    assert settings.upstream_key.get_secret_value() == "s3cret"
    assert load_settings().backend == "local"


def test_an_adapter_is_asked_of_the_upstream_by_its_name(
    scripted: Scripted, make_app: Callable[..., Flask]
) -> None:
    """vLLM serves a LoRA module as a model of its own name: `<id>:<name>` and `adapter` send `<name>`."""
    scripted.events = [chunk(content="42 bar"), chunk("stop", {"prompt_tokens": 3, "completion_tokens": 2})]
    client = make_app(backend="openai", upstream_url=scripted.url, cache=False).test_client()
    body = {"model": "scripted:gauges", "messages": [user("What?")], "max_tokens": 5}
    answer = client.post("/v1/chat/completions", json=body).get_json()
    assert answer["model"] == "scripted:gauges" and scripted.bodies[-1]["model"] == "gauges"
    native = client.post("/v1/chat/vision", json=vision_body(adapter="dials")).get_json()
    assert native["model"] == "scripted:dials" and scripted.bodies[-1]["model"] == "dials"
    client.post("/v1/chat/vision", json=vision_body())
    assert scripted.bodies[-1]["model"] == "scripted"  # no adapter: the upstream's own model
    assert client.post("/v1/chat/completions", json={**body, "model": "other:gauges"}).status_code == 404


def test_answering_never_probes_the_upstream(
    scripted: Scripted, make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only /readyz and /v1/models ask the upstream how it is: a request's own path never waits on a probe."""
    from glmvision.backends.upstream import backend as upstream_backend

    monkeypatch.setattr(upstream_backend, "PROBE_EVERY", 0.0)  # any probe that is asked for happens
    scripted.events = [chunk(content="hi"), chunk("stop")]
    client = make_app(backend="openai", upstream_url=scripted.url, degrade="shrink").test_client()
    assert client.post("/v1/chat/vision", json=vision_body()).status_code == 200  # learns the model id
    asked = scripted.gets
    for _ in range(3):
        assert client.post("/v1/chat/vision", json=vision_body()).status_code == 200
    assert scripted.gets == asked
    assert client.get("/readyz").status_code == 200
    assert scripted.gets == asked + 1
