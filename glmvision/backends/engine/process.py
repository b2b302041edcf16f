"""The engine process (GLMVISION_ENGINE=process): one model and its QueueEngine, shared by every worker.

The gunicorn master starts it (`EngineSupervisor`, multiprocessing's spawn context: a fresh
interpreter, never a fork of the master), stops it at exit and starts a new one if it dies. Inside,
the main thread owns the EngineEndpoint and waits on it with a bounded poll; the QueueEngine's model
thread hands tokens to `RemoteSink`s, which queue them for the main thread to send (a zmq socket
belongs to one thread) and wake it through a pipe its poll watches. The main thread sends each
request's queued tokens as one message. A request's first token and its end wake it at once; tokens
in between do when TOKEN_BATCH_S has passed since the last send, else they go with the next send,
at most TOKEN_BATCH_S later: a slow model's tokens each go at once, a fast one's a few per message
(each message costs the model thread about a third of a millisecond of its GIL and cores).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from glmvision.backends.engine.transport import Waker
from glmvision.backends.engine.wire import (
    Abort,
    HealthQuery,
    HealthReport,
    Message,
    State,
    Submit,
    Tokens,
)

if TYPE_CHECKING:
    from glmvision.backends.local.engine import QueueEngine
    from glmvision.backends.local.runtime import LoadedModel
    from glmvision.core.config import Settings
    from glmvision.core.generation import RawLogprob

log = logging.getLogger("glmvision")

# A worker's message and the model thread's tokens end the wait at once; the bound is for stopping.
POLL_S = 0.05
TOKEN_BATCH_S = 0.005  # while rows run: how long a token may wait for the ones after it
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_AFTER_S = 60.0  # an engine that lived this long resets the backoff


class RemoteSink:
    """The producer side of a GenerationStream, for a request whose reader is in a worker."""

    def __init__(
        self,
        request_id: str,
        peer: bytes,
        prompt_tokens: int,
        post: Callable[[bytes, Message, bool], None],
    ) -> None:
        self.request_id = request_id
        self.peer = peer
        self.prompt_tokens = prompt_tokens
        self._post = post
        self.cached_tokens = 0  # the engine sets it before the first token
        self._sent = False
        self._cancelled = threading.Event()
        self.ended = False

    def start(self) -> None:
        """The queue wait ends (the worker's own stream marks its times)."""

    def put(self, token_ids: list[int], logprobs: list[RawLogprob] | None = None) -> None:
        first, self._sent = not self._sent, True
        cached = self.cached_tokens if first else 0
        ids = tuple(int(i) for i in token_ids)
        message = Tokens(self.request_id, ids, cached_tokens=cached, logprobs=tuple(logprobs or ()))
        self._post(self.peer, message, first)

    def end(self) -> None:
        self.ended = True
        self._post(self.peer, Tokens(self.request_id, end=True), True)

    def fail(self, error: Exception) -> None:
        self.ended = True
        code = getattr(error, "error_code", "row_failed")
        message = getattr(error, "description", None) or str(error)
        param = getattr(error, "param", None)
        self._post(
            self.peer,
            Tokens(self.request_id, end=True, error_code=code, error_message=message, error_param=param),
            True,
        )

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()


def coalesce(outbox: queue.SimpleQueue[tuple[bytes, Message]]) -> list[tuple[bytes, Message]]:
    """Everything queued, each request's consecutive Tokens joined into one message (in their order)."""
    out: list[tuple[bytes, Message]] = []
    last: dict[str, int] = {}  # request id -> index in `out` of its Tokens still open to more
    while True:
        try:
            peer, message = outbox.get_nowait()
        except queue.Empty:
            return out
        if isinstance(message, Tokens):
            index = last.get(message.request_id)
            if index is not None:
                before = cast(Tokens, out[index][1])
                joined = msgspec.structs.replace(
                    message,
                    token_ids=before.token_ids + message.token_ids,
                    logprobs=before.logprobs + message.logprobs,
                    cached_tokens=before.cached_tokens or message.cached_tokens,
                )
                out[index] = (peer, joined)
                if message.end:
                    del last[message.request_id]
                continue
            if not message.end:
                last[message.request_id] = len(out)
        out.append((peer, message))


class EngineServer:
    """The engine process's main loop: load in a thread, answer health at once, route requests."""

    def __init__(self, settings: Settings, path: str, device: str) -> None:
        self.settings = settings
        self.path = path
        self.device = device
        self.state: State = "loading"
        self.loaded: LoadedModel | None = None
        self.engine: QueueEngine | None = None
        self.sinks: dict[str, RemoteSink] = {}
        self.outbox: queue.SimpleQueue[tuple[bytes, Message]] = queue.SimpleQueue()
        self.waker = Waker()  # ends the main thread's socket wait when the outbox has something
        self.flushed_at = 0.0
        self.fatal = threading.Event()
        # Batch sizes and empty_cache calls since the last report, handed to whichever worker asks next.
        self._batches: collections.Counter[int] = collections.Counter()
        self._batches_lock = threading.Lock()
        self.peers: set[bytes] = set()  # every worker that has talked to this engine
        self._empties_reported = 0
        self._events_reported: dict[str, int] = {}

    def post(self, peer: bytes, message: Message, urgent: bool = True) -> None:
        """Queue `message` for worker `peer` (any thread): sent at once if `urgent`, else within
        TOKEN_BATCH_S (see the module's docstring)."""
        self.outbox.put((peer, message))
        if urgent or time.monotonic() - self.flushed_at >= TOKEN_BATCH_S:
            self.waker.wake()

    def load(self) -> None:
        """Load the model and build the engine the settings choose (in a thread: health answers meanwhile)."""
        from glmvision.backends.local.backend import first_answer, make_engine
        from glmvision.backends.local.loading import load_model
        from glmvision.core.backend import Ticket

        try:
            loaded = load_model(self.settings)
            engine = make_engine(loaded, self.settings, on_fatal=self._on_fatal)
            first_answer(loaded, engine, Ticket.unheld(60.0))
            engine.on_batch = self._count_batch  # after the warm-up, which metrics forget
            self._empties_reported = engine.stats.cache_empties
            self._events_reported = engine.stats.cache_events()
            self.loaded, self.engine, self.state = loaded, engine, "ready"
            if self.settings.stall_seconds > 0:
                threading.Thread(target=self._watch, name="glmvision-engine-watchdog", daemon=True).start()
            log.info("engine process pid=%d ready on %s", os.getpid(), loaded.device)
        except Exception:
            log.exception("the engine process failed to load its model")
            self.state = "failed"
            self._on_fatal()

    def _count_batch(self, rows: int) -> None:
        with self._batches_lock:
            self._batches[rows] += 1

    def _watch(self) -> None:
        """The watchdog, here: with work waiting and no model step for GLMVISION_STALL_SECONDS, fail every
        request (503) and end the process, for the master to start another."""
        engine, limit = self.engine, self.settings.stall_seconds
        assert engine is not None
        while not self.fatal.wait(max(0.1, min(5.0, limit / 4))):
            stalled = engine.stalled_for(time.monotonic())
            if stalled >= limit:
                log.error("watchdog: no model progress for %.0fs while requests wait", stalled)
                engine.stall(stalled)
                self._on_fatal()
                return

    def _on_fatal(self) -> None:
        self.fatal.set()
        self.waker.wake()

    def report(self, query_id: int) -> HealthReport:
        engine, loaded = self.engine, self.loaded
        state: State = "failed" if engine is not None and engine.failed is not None else self.state
        if engine is None or loaded is None:
            return HealthReport(query_id, os.getpid(), self.device, "", False, 0, 0, state)
        with self._batches_lock:
            batches, self._batches = tuple(sorted(self._batches.items())), collections.Counter()
        empties = engine.stats.cache_empties - self._empties_reported
        self._empties_reported += empties
        events = engine.stats.cache_events()
        fresh = {name: count - self._events_reported.get(name, 0) for name, count in events.items()}
        self._events_reported = events
        queued, running = engine.queued(), engine.running()
        return HealthReport(
            query_id=query_id,
            pid=os.getpid(),
            device=loaded.device,
            model_id=loaded.model_id,
            loaded=True,
            queue_depth=queued,
            running=running,
            state=state,
            full=queued + running >= self.settings.admission_capacity,
            stalled_s=round(engine.stalled_for(time.monotonic()), 3),
            counters=engine.stats.as_dict(),
            gpu=gpu_memory(loaded.device),
            batches=batches,
            cache_empties=empties,
            cache_events={name: count for name, count in fresh.items() if count > 0},
        )

    def submit(self, peer: bytes, message: Submit) -> None:
        from glmvision.backends.engine.shm import TensorsGone, open_tensors
        from glmvision.core.backend import Ticket
        from glmvision.core.errors import APIError

        engine, loaded = self.engine, self.loaded
        if engine is None or loaded is None:
            self.post(peer, Tokens(message.request_id, end=True, error_code="model_loading"))
            return
        try:
            inputs = open_tensors(message.tensors)
        except TensorsGone:
            return  # its worker gave it up: nobody waits for an answer
        params = message.params.to_params()
        constraint = None
        try:
            if message.grammar is not None and params.constraint is not None:
                constraint = loaded.grammars().adopt(params.constraint, message.grammar)
            ticket = Ticket.unheld(message.deadline_s)  # the worker holds the admission place
            sink = RemoteSink(message.request_id, peer, int(inputs["input_ids"].shape[1]), self.post)
            self.sinks[message.request_id] = sink
            engine.submit(inputs, params, ticket, constraint, cast(Any, sink))
        except APIError as exc:
            self.sinks.pop(message.request_id, None)
            RemoteSink(message.request_id, peer, 0, self.post).fail(exc)
        except Exception as exc:
            log.exception("submitting a request to the engine failed")
            self.sinks.pop(message.request_id, None)
            RemoteSink(message.request_id, peer, 0, self.post).fail(exc)

    def handle(self, peer: bytes, message: Message) -> None:
        self.peers.add(peer)
        if isinstance(message, Submit):
            self.submit(peer, message)
        elif isinstance(message, Abort):
            sink = self.sinks.get(message.request_id)
            if sink is not None:
                sink.cancel()
                if self.engine is not None:
                    self.engine.nudge()
        elif isinstance(message, HealthQuery):
            self.outbox.put((peer, self.report(message.query_id)))  # the loop flushes after handling

    def flush(self, endpoint: Any) -> None:
        """Send what the model thread queued; forget requests that ended."""
        from glmvision.backends.engine.transport import EngineUnreachable

        self.waker.clear()  # before taking the outbox: a wake from now on is for what this misses
        self.flushed_at = time.monotonic()
        for peer, message in coalesce(self.outbox):
            try:
                endpoint.send(peer, message)
            except EngineUnreachable:
                # Its worker is gone: stop everything it asked for.
                for sink in self.sinks.values():
                    if sink.peer == peer:
                        sink.cancel()
            if isinstance(message, Tokens) and message.end:
                self.sinks.pop(message.request_id, None)

    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        from glmvision.backends.engine.transport import EngineEndpoint

        with EngineEndpoint(self.path, waker=self.waker) as endpoint:
            threading.Thread(target=self.load, name="glmvision-engine-load", daemon=True).start()
            while not stop():
                received = endpoint.receive(TOKEN_BATCH_S if self.sinks else POLL_S)
                while received is not None:
                    self.handle(*received)
                    received = endpoint.receive(0)
                self.flush(endpoint)
                if self.fatal.is_set():
                    # The failed requests' answers, then word that this engine failed, go out before the
                    # process does: workers stop sending at once instead of after LOST_AFTER_S of silence.
                    for peer in self.peers:
                        self.outbox.put((peer, self.report(0)))
                    self.flush(endpoint)
                    log.error("the engine process stops: its model failed (the master starts another)")
                    return


def gpu_memory(device: str) -> tuple[int, int, int] | None:
    """(allocated, reserved, total) bytes on `device`, None off GPU or when CUDA cannot say."""
    if not device.startswith("cuda"):
        return None
    from glmvision.backends.local.vram import cuda_module, memory_report

    try:
        report = memory_report(cuda_module(), device)
    except Exception:  # a health report must never fail on a CUDA hiccup
        log.exception("reading GPU memory failed")
        return None
    return None if report is None else (int(report[0]), int(report[1]), int(report[2]))


def engine_settings(device: str) -> Settings:
    """The settings from the environment the engine inherited, on the device the master chose for it."""
    from glmvision.core.config import load_settings

    return load_settings({"GLMVISION_DEVICE": device} if device else None)


def run_engine(path: str, device: str) -> None:
    """The spawned process's entry point: settings from the environment it inherited."""
    from glmvision.backends.local.loading import torch_threads

    logging.basicConfig(level=logging.INFO, format="[engine %(process)d] %(levelname)s %(message)s")
    master = os.getppid()
    # A session of its own: signals for the server's process group (Ctrl-C, `kill -- -PGID`, a
    # service manager stopping the group) are the master's to handle, which stops the engines last,
    # after its workers; the engine ending first would be restarted in the middle of the shutdown.
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = engine_settings(device)
    # load_model sets torch's intra-op threads from GLMVISION_TORCH_THREADS (1 for a tiny model);
    # inter-op threads are set here, once, before any parallel work starts.
    import torch

    torch.set_num_interop_threads(max(1, torch_threads(settings.torch_threads, 0) or 1))
    EngineServer(settings, path, device or settings.device).serve(stop=lambda: orphaned(master))
    os._exit(1)  # a failed model or a dead master ends the loop: exit without waiting on its threads


def orphaned(master: int) -> bool:
    """The master is gone (killed with SIGKILL: it could not stop us): an engine must not outlive it."""
    if os.getppid() == master:
        return False
    log.error("the gunicorn master (pid %d) is gone: the engine process stops", master)
    return True


class EngineSupervisor:
    """In the gunicorn master: start the engine process, restart it when it dies, stop it at exit."""

    def __init__(self, path: str, device: str, log_line: Callable[[str], None] = log.warning) -> None:
        self.path = path
        self.device = device
        self._log = log_line
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="glmvision-engine-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        process = self._context.Process(
            target=run_engine, args=(self.path, self.device), name="glmvision-engine", daemon=False
        )
        process.start()
        # The master stops it itself (stop()); forked workers inherit multiprocessing's list of
        # children and would try to join it at their exit, which only its parent may.
        getattr(multiprocessing.process, "_children", set()).discard(process)
        self._process = process
        self._started_at = time.monotonic()
        self._log(f"engine process pid={process.pid} started ({self.device or 'default device'})")

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        failures = 0
        while not self._stopping.is_set():
            # The sentinel, not is_alive(): gunicorn's SIGCHLD handler may reap our child first.
            if not wait([self._process.sentinel], timeout=1.0):
                continue
            if self._stopping.is_set():
                return
            if time.monotonic() - self._started_at > HEALTHY_AFTER_S:
                failures = 0
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            failures += 1
            self._log(f"engine process pid={self._process.pid} died; starting another in {delay:g}s")
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()

    def begin_stop(self) -> None:
        """Stop restarting it and send it SIGTERM (stop() then waits): several engines stop at once."""
        self._stopping.set()
        if self._process is not None:
            try:
                os.kill(self._process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (idempotent)."""
        self._stopping.set()
        process = self._process
        if process is None:
            return
        from multiprocessing.connection import wait

        for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                return
            if wait([process.sentinel], timeout=timeout):
                return
