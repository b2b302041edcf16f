"""Unit tests for admission, preparation slots, probes, queue expiry, engine failure and give-up paths."""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from helpers import vision_body, wait_for

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import Job
from glmvision.backends.local.loading import INDEX, check_source, load_model, looks_like_path
from glmvision.backends.local.static import StaticEngine
from glmvision.core.backend import Admission, PreparationSlots
from glmvision.core.config import ConfigError, load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.stream import DEADLINE_GRACE, GenerationStream, IncrementalDecoder
from glmvision.server.workers import AccessLogger, ProbeFirstWorker, is_probe
from glmvision.serving.service import client_gone_check
from glmvision.web.state import app_state

# Admission and tickets.


def _admission(capacity: int = 2, rate: float = 0.0, slots: PreparationSlots | None = None) -> Admission:
    return Admission(capacity, 60.0, lambda: rate, slots=slots)


def test_admission_refuses_exactly_the_one_past_capacity() -> None:
    """Capacity 2 admits two, refuses the third with 503 overloaded, and counts the refusal."""
    admission = _admission(2)
    tickets = [admission.admit(), admission.admit()]
    with pytest.raises(APIError) as caught:
        admission.admit()
    assert (caught.value.code, caught.value.error_code) == (503, "overloaded")
    assert (admission.active, admission.refused) == (2, 1)
    tickets[0].release()
    admission.admit()  # a place given back is a place free again
    assert (admission.active, admission.refused) == (2, 1)


def test_preparing_counts_requests_until_they_are_submitted() -> None:
    """admit adds one preparing; submitted (once) and release take it off exactly once."""
    admission = _admission(4)
    first, second = admission.admit(), admission.admit()
    assert (admission.active, admission.preparing) == (2, 2)
    admission.submitted(first)
    admission.submitted(first)
    assert (admission.active, admission.preparing) == (2, 1)
    first.release()
    first.release()
    assert (admission.active, admission.preparing) == (1, 1)
    second.release()
    admission.submitted(second)  # too late: it was released unsubmitted
    assert (admission.active, admission.preparing) == (0, 0)


def test_only_unsubmitted_releases_count_as_abandoned() -> None:
    """on_abandoned fires for a request released before submission, not for a submitted one."""
    abandoned: list[bool] = []
    admission = Admission(4, 60.0, lambda: 0.0, on_abandoned=lambda: abandoned.append(True))
    submitted, dropped = admission.admit(), admission.admit()
    admission.submitted(submitted)
    submitted.abandon()  # reached the model: the engine releases it, not the request thread
    assert admission.active == 2 and abandoned == []
    submitted.release()
    assert abandoned == []
    dropped.abandon()
    assert admission.active == 0 and abandoned == [True]


def test_a_slot_goes_back_once_on_submission_or_release() -> None:
    """Two slots: a ticket holds one until submitted or released, and gives it back only once."""
    slots = PreparationSlots(2, lambda: 0, batch=1)
    admission = _admission(8, slots=slots)
    one, two = admission.admit(), admission.admit()
    one.take_slot()
    two.take_slot()
    late = admission.admit()
    late.deadline = time.monotonic() - 1
    with pytest.raises(APIError) as caught:
        late.take_slot()  # no slot and no time left
    assert (caught.value.code, caught.value.error_code) == (504, "request_timeout")
    admission.submitted(one)
    assert slots.take(0)  # submitted: its slot serves the next request at once
    slots.give()
    one.release()  # submitted already gave the slot back: this must not give it twice
    two.release()  # released unsubmitted: its slot comes back too
    assert [slots.take(0) for _ in range(3)] == [True, True, False]


def test_retry_after_follows_the_drain_rate() -> None:
    """5 before any rate is known; else (held + 1) / rate seconds, kept within 1..60."""
    assert _admission(rate=0.0).retry_after() == 5
    admission = _admission(8, rate=2.0)
    for _ in range(3):
        admission.admit()
    assert admission.retry_after() == 2  # (3 + 1) / 2
    assert _admission(rate=0.001).retry_after() == 60
    assert _admission(rate=1000.0).retry_after() == 1


def test_a_ticket_past_its_deadline_has_no_time_left() -> None:
    """remaining() is never negative."""
    ticket = _admission().admit()
    ticket.deadline = time.monotonic() - 5
    assert ticket.remaining() == 0.0


def test_preparation_slots_never_drop_below_two() -> None:
    """A batch size of one still prepares two requests at once."""
    slots = PreparationSlots(1, lambda: 0, batch=1)
    assert slots.limit() == 2
    assert [slots.take(0) for _ in range(3)] == [True, True, False]


# Probes and gunicorn pieces.


@pytest.mark.parametrize(
    ("head", "probe"),
    [
        (b"GET /healthz HTTP/1.1\r\n", True),
        (b"HEAD /readyz HTTP/1.1\r\n", True),
        (b"GET /readyz?verbose=1 HTTP/1.1", True),
        (b"GET /healthz?", True),
        (b"POST /healthz HTTP/1.1\r\n", False),
        (b"GET /healthzz HTTP/1.1\r\n", False),
        (b"GET /healthz", False),  # the path may go on past the bytes seen
        (b"GET /v1/chat/vision HTTP/1.1", False),
        (b"", False),
    ],
)
def test_is_probe(head: bytes, probe: bool) -> None:
    """Only a GET or HEAD of exactly /healthz or /readyz, seen to its end, is a probe."""
    assert is_probe(head) is probe


class _Cfg:
    is_ssl = False
    keepalive = 2


class _Pool:
    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, fn: Any, conn: Any) -> Any:
        from concurrent.futures import Future

        self.submitted.append(conn)
        return Future()


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = None


@pytest.fixture
def worker() -> ProbeFirstWorker:
    """A ProbeFirstWorker with just the parts enqueue_req uses (no process, no event loop)."""
    worker = object.__new__(ProbeFirstWorker)
    worker.cfg = _Cfg()
    worker.probe_pool, worker.tpool = _Pool(), _Pool()
    worker.pending_conns = []
    registered: list[Any] = []
    worker.poller = type("Poller", (), {"register": lambda self, *args: registered.append(args)})()
    return worker


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def test_probes_and_other_requests_go_to_their_own_pools(
    worker: ProbeFirstWorker, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A probe goes to the probe pool, anything else to the request pool, nothing sent to the poller."""
    server, client = pair
    client.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
    probe = _Conn(server)
    worker.enqueue_req(probe)
    assert worker.probe_pool.submitted == [probe] and worker.tpool.submitted == []
    assert server.recv(100).startswith(b"GET /healthz")  # peeking consumed nothing
    client.sendall(b"POST /v1/chat HTTP/1.1\r\n\r\n")
    request = _Conn(server)
    worker.enqueue_req(request)
    assert worker.tpool.submitted == [request] and worker.probe_pool.submitted == [probe]


def test_a_silent_connection_waits_in_the_poller(
    worker: ProbeFirstWorker, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Nothing sent yet: no thread is taken; the connection waits for data."""
    server, _ = pair
    conn = _Conn(server)
    assert worker._peek(conn) is None
    worker.enqueue_req(conn)
    assert worker.pending_conns == [conn]
    assert worker.probe_pool.submitted == [] and worker.tpool.submitted == []


def test_peek_sees_buffered_bytes_and_closed_connections(
    worker: ProbeFirstWorker, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Bytes gunicorn already buffered count; a closed connection peeks as b"" (the usual pool)."""
    import io

    server, client = pair
    conn = _Conn(server)
    conn.parser = type(
        "Parser", (), {"unreader": type("U", (), {"buf": io.BytesIO(b"HEAD /readyz HTTP/1.1")})()}
    )()
    assert worker._peek(conn) == b"HEAD /readyz HTTP/1.1"
    client.close()
    assert worker._peek(_Conn(server)) == b""


def test_the_access_log_pid_is_bare() -> None:
    """%(p)s is the worker's pid, without gunicorn's angle brackets."""
    from gunicorn.config import Config

    response = type("Response", (), {"status": "200 OK", "headers": [], "sent": 2})()
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/healthz", "SERVER_PROTOCOL": "HTTP/1.1"}
    atoms = AccessLogger(Config()).atoms(response, [], environ, datetime.timedelta(seconds=1))
    assert atoms["p"] == str(os.getpid())
    assert atoms["s"] == "200"


# Settings and model sources.


def test_a_bad_setting_names_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error says whether the bad value was an override or came from the environment."""
    with pytest.raises(ConfigError, match=r"^GLMVISION_MAX_QUEUE \(overrides\): "):
        load_settings({"GLMVISION_MAX_QUEUE": 0})
    monkeypatch.setenv("GLMVISION_MAX_QUEUE", "0")
    with pytest.raises(ConfigError, match=r"^GLMVISION_MAX_QUEUE \(environment\): .*got '0'"):
        load_settings()


def test_gunicorn_settings_pass_through_the_app_loader() -> None:
    """GLMVISION_THREADS is gunicorn's: the app's loader neither refuses nor keeps it."""
    settings = load_settings({"GLMVISION_THREADS": 99, "GLMVISION_WORKERS": 2})
    assert not hasattr(settings, "threads")
    with pytest.raises(ConfigError, match=r"unknown setting.*GLMVISION_THREAD\b"):
        load_settings({"GLMVISION_THREAD": 99})


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("THUDM/GLM-4.6V-Flash", False),
        ("zai-org/glm", False),
        ("glm", False),
        ("/models/glm", True),
        ("./glm", True),
        ("../glm", True),
        ("~/glm", True),
        ("models/zai/glm", True),
        (f"models{os.sep}{os.sep}glm", True),
    ],
)
def test_looks_like_path(source: str, path: bool) -> None:
    """A hub id is `org/name`; anything rooted, relative-dotted, home-based or deeper is a directory."""
    assert looks_like_path(source) is path


def test_check_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing directory is refused by name; hub ids, empty and existing directories (~ too) pass."""
    with pytest.raises(ConfigError, match=r"^GLMVISION_MODEL=/no/such/dir: directory not found$"):
        check_source("/no/such/dir")
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    for ok in ("", "zai-org/GLM-4.6V-Flash", str(tmp_path / "weights"), "~/weights"):
        check_source(ok)
    with pytest.raises(ConfigError):
        check_source("~/missing")


def test_a_relative_model_directory_that_exists_is_a_path_and_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models/glm` reads like a hub id, but a directory of that name is what transformers loads: check it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "glm").mkdir(parents=True)
    assert looks_like_path("models/glm") and looks_like_path("./models/glm")
    assert not looks_like_path("models/other")  # no such directory: a hub id, checked when it loads
    (tmp_path / "models" / "glm" / INDEX).write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    for source in ("models/glm", "./models/glm"):
        with pytest.raises(ConfigError, match=rf"^GLMVISION_MODEL={source}: missing model-1.safetensors"):
            check_source(source)
    with pytest.raises(ConfigError, match=rf"^GLMVISION_MODEL=models/glm/{INDEX}: not a directory"):
        check_source(f"models/glm/{INDEX}")
    missing = f"GLMVISION_MODEL=./models/glm2: directory not found (looked in {tmp_path}/models/glm2)"
    with pytest.raises(ConfigError) as refused:
        check_source("./models/glm2")
    assert str(refused.value) == missing


# Engine: queue expiry, failure, warm-up and nudges (no model thread unless stated).


class _NoDecoder:
    stop_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def _engine(**overrides: Any) -> ContinuousEngine:
    return ContinuousEngine(None, load_settings({f"GLMVISION_{k.upper()}": v for k, v in overrides.items()}))


def _job(admission: Admission, age: float = 0.0, deadline_in: float = 60.0) -> Job:
    params = GenerationParams(max_new_tokens=4)
    ticket = admission.admit()
    ticket.arrived = time.monotonic() - age
    ticket.deadline = time.monotonic() + deadline_in
    stream = GenerationStream(_NoDecoder(), 10, params, ticket.deadline)
    admission.submitted(ticket)
    return Job({"input_ids": torch.zeros((1, 10), dtype=torch.long)}, params, stream, 10, ticket)


def _error(stream: GenerationStream) -> APIError:
    with pytest.raises(APIError) as caught:
        for _ in stream:
            pass
    return caught.value


def test_expire_waiting_answers_only_the_jobs_that_cannot_run() -> None:
    """Past the queue timeout: 503; past the deadline: 504; cancelled: ended; the rest stay queued."""
    engine = _engine(queue_timeout=5)
    admission = _admission(8)
    fresh, waited, late, gone = (
        _job(admission),
        _job(admission, age=10),
        _job(admission, deadline_in=-1),
        _job(admission),
    )
    gone.stream.close()
    engine._queue.extend([fresh, waited, late, gone])
    engine.expire_waiting()
    assert list(engine._queue) == [fresh]
    assert (engine.stats.queue_timeouts, engine.stats.deadline_stops) == (1, 1)
    assert all(job.finished for job in (waited, late, gone)) and not fresh.finished
    assert admission.active == 1  # the three expired gave their places back
    error = _error(waited.stream)
    assert (error.code, error.error_code) == (503, "queue_timeout") and error.headers["Retry-After"]
    error = _error(late.stream)
    assert (error.code, error.error_code) == (504, "request_timeout")
    engine.expire_waiting()
    assert list(engine._queue) == [fresh] and engine.stats.queue_timeouts == 1


def test_a_failed_engine_answers_everything_it_held_and_takes_nothing_more() -> None:
    """_fail_everything: the running batch and the queue get 503 engine_failed, once; submit refuses."""
    fatal: list[bool] = []
    engine = ContinuousEngine(_NoDecoder(), load_settings({}), on_fatal=lambda: fatal.append(True))
    admission = _admission(8)
    running, queued = _job(admission), _job(admission)
    engine._queue.append(queued)
    engine._fail_everything([running], "RuntimeError")
    assert engine.failed == "RuntimeError" and fatal == [True]
    assert engine.queued() == 0 and admission.active == 0
    for job in (running, queued):
        error = _error(job.stream)
        assert (error.code, error.error_code) == (503, "engine_failed")
    late = _job(admission)
    with pytest.raises(APIError) as caught:
        engine.submit(late.inputs, late.params, late.ticket)
    assert caught.value.error_code == "engine_failed"
    assert engine.queued() == 0 and engine._thread is None


def test_a_failing_exit_hook_does_not_hide_the_answers() -> None:
    """An on_fatal that raises still leaves every held request answered."""

    def broken() -> None:
        raise RuntimeError("no master to tell")

    engine = ContinuousEngine(None, load_settings({}), on_fatal=broken)
    job = _job(_admission())
    engine._fail_everything([job], "RuntimeError")
    assert _error(job.stream).error_code == "engine_failed"


def test_nudge_wakes_the_model_thread() -> None:
    """A thread waiting on the engine's condition (as _next_batch does) wakes when nudged."""
    engine = _engine()
    waiting, woke = threading.Event(), threading.Event()

    def model_thread() -> None:
        with engine._cond:
            waiting.set()
            if engine._cond.wait(60):
                woke.set()

    thread = threading.Thread(target=model_thread, daemon=True)
    thread.start()
    assert waiting.wait(30)
    engine.nudge()  # needs the lock, so the waiter is already inside wait()
    thread.join(30)
    assert woke.is_set()


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> Any:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


@pytest.mark.parametrize("engine_class", [ContinuousEngine, StaticEngine])
def test_warm_up_answers_in_the_caller_and_leaves_no_counts(model: Any, engine_class: type) -> None:
    """warm_up runs a real request without a model thread; the counters start from zero after it."""
    engine = engine_class(model, load_settings({}))
    admission = _admission()
    ticket = admission.admit()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    engine.warm_up(model.prepare(messages, enable_thinking=False), GenerationParams(max_new_tokens=2), ticket)
    assert engine._thread is None and admission.active == 0
    assert (engine.stats.batches, engine.stats.rows, engine.stats.completed) == (0, 0, 0)


# Generation streams: giving up, and clients that leave.


def _ended_when_cancelled(stream: GenerationStream, tokens: list[int]) -> threading.Thread:
    """Stand in for the engine: hand over `tokens`, then end the stream once it is cancelled."""

    def engine() -> None:
        stream.put(tokens)
        while not stream.cancelled:
            time.sleep(0.01)
        stream.end()

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stop", [(), ("never",)])
def test_whole_stops_generating_when_the_client_leaves(
    stop: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Both ways of waiting (patient, and token by token for stop strings) check the client."""
    stream = GenerationStream(
        _NoDecoder(), 3, GenerationParams(max_new_tokens=100, stop=stop), time.monotonic() + 1
    )
    engine = _ended_when_cancelled(stream, [1, 2])
    with caplog.at_level("ERROR", logger="glmvision"):
        result = stream.whole(client_gone=lambda: True)
    engine.join(30)
    assert stream.cancelled and result.completion_tokens == 2 and result.finish_reason == "length"
    assert "giving up" not in caplog.text  # cancelled for the client, not by the deadline's grace


def test_a_silent_engine_past_the_deadline_gives_what_was_generated() -> None:
    """Past the deadline's grace with tokens: they are the answer (length), and the row is cancelled."""
    stream = GenerationStream(
        _NoDecoder(), 3, GenerationParams(max_new_tokens=100), time.monotonic() - DEADLINE_GRACE - 1
    )
    stream.put([1, 2, 3])
    result = stream.whole()
    assert (result.completion_tokens, result.finish_reason, result.text) == (3, "length", "BCD")
    assert stream.cancelled


def test_a_silent_engine_past_the_deadline_without_output_is_504() -> None:
    """Past the deadline's grace with nothing generated: 504, and the row is cancelled."""
    stream = GenerationStream(
        _NoDecoder(), 3, GenerationParams(max_new_tokens=100), time.monotonic() - DEADLINE_GRACE - 1
    )
    error = _error(stream)
    assert (error.code, error.error_code) == (504, "request_timeout")
    assert stream.cancelled


def test_incremental_decoder_holds_back_a_split_character() -> None:
    """Text ending in U+FFFD waits for its next token; the window then moves on."""

    class Bytes:
        stop_ids: list[int] = []

        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    decoder = IncrementalDecoder(Bytes())
    euro = list("€".encode())
    assert decoder.push([ord("a")]) == "a"
    assert decoder.push(euro[:2]) == ""
    assert decoder.push(euro[2:]) == "€"
    assert decoder.push([ord("b")]) == "b"
    assert decoder.push(euro[:1]) == ""
    assert decoder.flush() == "\ufffd"


# Service: slots and client checks.


def test_no_preparation_slot_before_the_deadline_is_504_and_frees_the_place(
    make_app: Callable[..., Flask],
) -> None:
    """A request that never gets a slot is not prepared; its place is given back."""
    app = make_app(request_timeout=2)
    client = app.test_client()
    client.post("/v1/chat/vision", json=vision_body())  # loads the model
    assert wait_for(lambda: client.get("/readyz").status_code == 200)
    admission = app_state(app).service.backend.admission
    while admission._slots.take(0):
        pass
    response = client.post("/v1/chat/vision", json=vision_body())
    assert response.status_code == 504 and response.get_json()["error"]["code"] == "request_timeout"
    assert (admission.active, admission.preparing) == (0, 0)


def test_client_gone_check_reads_the_gunicorn_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    """Open and quiet, or with unread bytes: still there; closed: gone; no socket: never gone."""
    server, client = pair
    assert client_gone_check({})() is False
    gone = client_gone_check({"gunicorn.socket": server})
    assert gone() is False
    client.sendall(b"x")
    assert gone() is False  # readable, but with data: a pipelined byte, not a hang-up
    assert server.recv(1) == b"x"
    client.close()
    assert gone() is True


def test_client_gone_check_counts_a_reset_as_gone() -> None:
    """A connection reset (OSError on the peek) means the client is gone."""
    server, client = socket.socketpair()
    try:
        server.sendall(b"unread")
        client.close()  # closing with unread data resets the connection
        assert client_gone_check({"gunicorn.socket": server})() is True
    finally:
        server.close()
