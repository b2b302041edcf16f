"""A worker's side of the engine processes: submit prepared inputs, route their tokens into local streams.

One RemoteEngine per engine process. Its I/O thread owns the EngineConnection (made lazily in that
thread, after gunicorn's fork); request threads hand it messages through a queue. Each request's
GenerationStream lives here, so detokenising and post-processing stay in the worker; only token ids
cross the socket. `EnginePool` sends each request to the least-loaded engine.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmvision.backends.engine.shm import SharedMemoryFull, SharedTensors, share_tensors
from glmvision.backends.engine.transport import SOCKET_ENV, EngineConnection, EngineUnreachable, Waker
from glmvision.backends.engine.wire import (
    Abort,
    HealthQuery,
    HealthReport,
    Message,
    Submit,
    Tokens,
    WireParams,
)
from glmvision.core.backend import Ticket
from glmvision.core.errors import APIError, api_error, error_spec, unavailable
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.stream import DEADLINE_GRACE, Decoder, GenerationStream

log = logging.getLogger("glmvision")

HEALTH_EVERY_S = 0.5
LOST_AFTER_S = 10.0  # no health report for this long: the engine is gone (its requests end with 503)
# The engine's messages and request threads' (through the waker) end the wait at once; the bound is
# for the I/O thread's own rounds: health queries, aborts of requests whose client left, deadlines.
POLL_S = 0.05
READY_POLL_S = 0.05  # how often a request waiting for a loading engine looks again


def engine_restarting() -> APIError:
    return unavailable("engine_restarting", "The engine process is restarting; retry shortly.", 5)


def remote_error(code: str, message: str | None, param: str | None = None) -> APIError:
    """The APIError an engine's error code stands for (its Retry-After for a 503)."""
    spec = error_spec(code)
    return api_error(code, message or None, param, retry_after=5 if spec.status == 503 else None)


@dataclass(eq=False)
class _Request:
    stream: GenerationStream
    shared: SharedTensors
    ticket: Ticket
    engine_pid: int | None
    aborted: bool = False
    started: bool = False
    give_up_at: float = field(default=0.0)

    def close(self) -> None:
        self.shared.release()
        self.ticket.release()


class RemoteEngine:
    """QueueEngine's request side, for an engine in another process."""

    def __init__(
        self, path: str, decoder: Decoder, on_batch: Callable[[int], None] = lambda rows: None
    ) -> None:
        self.path = path
        self._on_batch = on_batch  # each model call's rows, as the engine reports them (to one worker)
        self._decoder = decoder
        self._outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        # Woken by request threads: the I/O thread's socket wait ends, so that a Submit goes out at once.
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self.report: HealthReport | None = None  # the engine's last word about itself
        self.reported_at = 0.0
        self.sent_since_report = 0  # requests sent after that word (for picking the least loaded)
        self.cache_empties = 0  # the engine's torch.cuda.empty_cache() calls reported to this worker
        self.cache_events: collections.Counter[str] = collections.Counter()  # its caches' (to this worker)
        self.completed = 0
        self.lost = 0  # requests ended because the engine went away

    # Request threads.

    def start(self) -> None:
        """Start the I/O thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="glmvision-engine-io", daemon=True)
                self._thread.start()

    @property
    def reachable(self) -> bool:
        return self.report is not None and time.monotonic() - self.reported_at < LOST_AFTER_S

    @property
    def ready(self) -> bool:
        report = self.report
        return self.reachable and report is not None and report.loaded and report.state == "ready"

    @property
    def full(self) -> bool:
        return self.report is not None and self.report.full

    def queued(self) -> int:
        return self.report.queue_depth if self.report is not None else 0

    def running(self) -> int:
        return self.report.running if self.report is not None else 0

    def load(self) -> int:
        """Requests in the engine as last reported, plus those this worker sent since."""
        report = self.report
        return self.sent_since_report + (report.queue_depth + report.running if report is not None else 0)

    def mine(self) -> tuple[int, int]:
        """This worker's requests in the engine: (waiting for their first token, generating)."""
        with self._lock:
            started = sum(1 for request in self._requests.values() if request.started)
            return len(self._requests) - started, started

    def submit(
        self, inputs: Any, params: GenerationParams, ticket: Ticket, grammar: str | None
    ) -> GenerationStream:
        """Send prepared inputs to the engine; the returned stream yields the answer as it comes."""
        self.start()
        report = self.report
        if report is not None and (not self.reachable or report.state == "failed"):
            raise engine_restarting()
        if not self.ready:
            raise unavailable("model_loading", "The model is still loading; retry shortly.", 10)
        tensors = {key: value for key, value in inputs.items() if hasattr(value, "dtype")}
        try:
            shared, refs = share_tensors(tensors)
        except SharedMemoryFull as exc:
            log.warning(
                "%s: give the server a larger /dev/shm (docker --shm-size, see docs/deployment.md)", exc
            )
            raise unavailable(
                "overloaded", "The server has no room for this request's images now.", 5
            ) from None
        stream = GenerationStream(self._decoder, int(inputs["input_ids"].shape[1]), params, ticket.deadline)
        request_id = secrets.token_hex(8)
        request = _Request(stream, shared, ticket, self.report.pid if self.report else None)
        request.give_up_at = ticket.deadline + DEADLINE_GRACE
        with self._lock:
            self._requests[request_id] = request
            self.sent_since_report += 1
        self._outbox.put(Submit(request_id, refs, WireParams.of(params), grammar, ticket.remaining()))
        self._waker.wake()
        return stream

    # The I/O thread.

    def _loop(self) -> None:
        connection = EngineConnection(self.path, send_timeout_s=0.5, waker=self._waker)
        asked_at = 0.0
        query = 0
        while True:
            try:
                now = time.monotonic()
                if now - asked_at >= HEALTH_EVERY_S:
                    query += 1
                    asked_at = now
                    self._outbox.put(HealthQuery(query))
                self._send(connection)
                self._tend(connection)
                message = connection.receive(min(POLL_S, asked_at + HEALTH_EVERY_S - now))
                while message is not None:
                    self._route(message)
                    message = connection.receive(0)
            except Exception:  # the I/O thread must outlive any one bad message
                log.exception("the engine I/O thread hit an error; going on")
                time.sleep(0.1)

    def _send(self, connection: EngineConnection) -> None:
        self._waker.clear()  # before taking the outbox: a wake from now on is for what this misses
        while True:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                connection.send(message)
            except EngineUnreachable:
                if isinstance(message, Submit):
                    self._end(message.request_id, engine_restarting())

    def _route(self, message: Message) -> None:
        if isinstance(message, HealthReport):
            with self._lock:
                previous, self.report, self.reported_at = self.report, message, time.monotonic()
                self.sent_since_report = 0
                self.cache_empties += message.cache_empties
                self.cache_events.update(message.cache_events)
            for rows, batches in message.batches:
                for _ in range(min(batches, 100_000)):
                    self._on_batch(rows)
            if previous is not None and previous.pid != message.pid:
                log.warning("engine process pid=%d replaced pid=%d", message.pid, previous.pid)
                self._fail_all(lambda request: request.engine_pid == previous.pid)
            return
        if not isinstance(message, Tokens):
            return
        with self._lock:
            request = self._requests.get(message.request_id)
        if request is None:
            return  # a request already given up
        request.shared.release()  # the engine has read its tensors (it does so before any Tokens)
        if not request.started:
            request.started = True
            request.stream.start()
        if message.cached_tokens:
            request.stream.cached_tokens = message.cached_tokens
        if message.token_ids:
            request.stream.put(list(message.token_ids), list(message.logprobs) or None)
        if message.end:
            if message.error_code is not None:
                error = remote_error(message.error_code, message.error_message, message.error_param)
                self._end(message.request_id, error)
            else:
                self._end(message.request_id, None)

    def _end(self, request_id: str, error: APIError | None) -> None:
        with self._lock:
            request = self._requests.pop(request_id, None)
        if request is None:
            return
        if error is None:
            self.completed += 1
            request.stream.end()
        else:
            request.stream.fail(error)
        request.close()

    def _fail_all(self, which: Any) -> None:
        with self._lock:
            ids = [request_id for request_id, request in self._requests.items() if which(request)]
        self.lost += len(ids)
        for request_id in ids:
            self._end(request_id, engine_restarting())

    def _tend(self, connection: EngineConnection) -> None:
        """Abort what its client left, give up what is long past its deadline or held by a lost engine."""
        now = time.monotonic()
        with self._lock:
            requests = list(self._requests.items())
        for request_id, request in requests:
            if request.stream.cancelled and not request.aborted:
                request.aborted = True
                request.shared.release()
                try:
                    connection.send(Abort(request_id))
                except EngineUnreachable:
                    self._end(request_id, engine_restarting())
            elif now > request.give_up_at:
                self._end(request_id, engine_restarting())
        if requests and self.report is not None and not self.reachable:
            log.error("no word from the engine process for %.0fs: failing its requests", LOST_AFTER_S)
            self._fail_all(lambda request: True)


class EnginePool:
    """Every engine process this worker talks to; a request goes to the least-loaded ready one."""

    def __init__(
        self, paths: list[str], decoder: Decoder, on_batch: Callable[[int], None], load_timeout: float = 0.0
    ) -> None:
        self.engines = [RemoteEngine(path, decoder, on_batch) for path in paths]
        self.load_timeout = load_timeout  # how long a request may wait for a loading engine
        # Ties go round in turn, each worker starting elsewhere: one request at a time, which always
        # sees every engine idle, still spreads over them instead of piling onto the first.
        self._turn = itertools.count(os.getpid())

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    @property
    def ready(self) -> bool:
        """Every engine loaded and answering (what /readyz asks)."""
        return all(engine.ready for engine in self.engines)

    @property
    def full(self) -> bool:
        """Every engine that answers says its queue is full: refuse in front."""
        reachable = [engine for engine in self.engines if engine.reachable]
        return bool(reachable) and all(engine.full for engine in reachable)

    def pick(self) -> RemoteEngine:
        """The ready engine with the fewest requests, ties taken in turn; else the first (its submit
        says why it cannot)."""
        ready = [engine for engine in self.engines if engine.ready]
        if not ready:
            return self.engines[0]
        start = next(self._turn) % len(ready)
        return min(ready[start:] + ready[:start], key=RemoteEngine.load)

    def submit(
        self, inputs: Any, params: GenerationParams, ticket: Ticket, grammar: str | None
    ) -> GenerationStream:
        """Send to the least-loaded ready engine; while none is ready but one is loading (or not heard
        from yet: this worker just started), wait for it up to GLMVISION_LOAD_TIMEOUT, as requests
        wait for an in-worker model's load."""
        deadline = time.monotonic() + min(self.load_timeout, ticket.remaining())
        while (
            not any(engine.ready for engine in self.engines) and self.loading() and not ticket.client_gone()
        ):
            if time.monotonic() >= deadline:
                break
            time.sleep(READY_POLL_S)
        return self.pick().submit(inputs, params, ticket, grammar)

    def loading(self) -> bool:
        """Some engine is loading its model, or has not answered this worker yet."""
        return any(engine.report is None or engine.report.state == "loading" for engine in self.engines)

    def queued(self) -> int:
        return sum(engine.queued() for engine in self.engines)

    def mine(self) -> tuple[int, int]:
        """This worker's requests in the engines: (waiting for their first token, generating)."""
        pairs = [engine.mine() for engine in self.engines]
        return sum(waiting for waiting, _ in pairs), sum(started for _, started in pairs)

    def drain_rate(self) -> float:
        """Requests per second the engines finish, smoothed (for Retry-After)."""
        reports = [engine.report for engine in self.engines if engine.report is not None]
        return sum(float(report.counters.get("drain_rate", 0.0)) for report in reports)

    def cache_empties(self) -> int:
        """torch.cuda.empty_cache() calls the engines reported to this worker (each call to one worker)."""
        return sum(engine.cache_empties for engine in self.engines)

    def cache_events(self) -> dict[str, int]:
        """The engines' cache counters reported to this worker (each event to one worker)."""
        total: collections.Counter[str] = collections.Counter()
        for engine in self.engines:
            total.update(engine.cache_events)
        return dict(total)

    def cache_bytes(self) -> dict[str, int]:
        """Bytes the engines' caches hold now, all engines together."""
        reports = [engine.report for engine in self.engines if engine.report is not None]
        return {
            name: sum(int(report.counters.get(f"{name}_bytes", 0)) for report in reports)
            for name in ("prefix", "encoder")
        }


def engine_sockets() -> list[str]:
    """The engines' socket paths the master passed down (none outside its gunicorn)."""
    return [path for path in os.environ.get(SOCKET_ENV, "").split(os.pathsep) if path]
