"""zmq sockets between workers and one engine process: a ROUTER in the engine, a DEALER per worker.

Loopback only: `ipc://` sockets (Unix domain) in a runtime directory only this user can enter, never
TCP. Every wait is bounded (a poll with a timeout), and a socket closes without lingering. A socket
belongs to one thread: the caller that shares one between threads serialises its use.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

import zmq

from glmvision.backends.engine.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

# Where the gunicorn master tells its workers the engine's socket is (not GLMVISION_*: not a setting).
SOCKET_ENV = "GLMV_ENGINE_SOCKET"

# sockaddr_un's sun_path holds 108 bytes, its last a NUL: a longer ipc:// path cannot be bound.
MAX_SOCKET_PATH = 107
# Messages queued per peer before a send waits (then times out): far above one request's stream.
HIGH_WATER_MARK = 100_000


class Waker:
    """A pipe whose read end a socket wait watches: another thread ends that wait at once with `wake`.

    A thread that wakes after queueing work, and a waiting thread that `clear`s before taking its queue,
    never lose a wake-up; a wake while one is pending writes nothing (one byte per wait at most).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._pending = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        """End the waiting thread's socket wait now (or its next one)."""
        if self._pending:
            return
        self._pending = True
        try:
            os.write(self._write, b"w")
        except (BlockingIOError, OSError):  # a full pipe wakes anyway; a closed one has nobody waiting
            pass

    def clear(self) -> None:
        """Forget the wake-ups so far (the waiting thread, before it takes what was queued)."""
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Only now: a wake between the read and this line was for work that is queued already.
        self._pending = False

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class _Wait:
    """A socket's bounded wait for its next message, which a `Waker` (if any) ends early."""

    def __init__(self, sock: zmq.Socket[bytes], waker: Waker | None) -> None:
        self._socket = sock
        self._poller: zmq.Poller | None = None
        if waker is not None:
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(waker.fileno(), zmq.POLLIN)

    def __call__(self, timeout_s: float) -> bool:
        """Whether a message is there to read, after waiting up to `timeout_s` (less when woken)."""
        timeout_ms = max(0, int(timeout_s * 1000))
        if self._poller is None or timeout_ms == 0:
            return bool(self._socket.poll(timeout_ms, zmq.POLLIN))
        ready = dict(self._poller.poll(timeout_ms))
        return self._socket in ready


class EngineUnreachable(ConnectionError):
    """A send to the engine (or to a worker) did not go through in time, or its peer is gone."""


def socket_path(runtime_dir: str | os.PathLike[str], index: int) -> Path:
    """The engine socket for device `index` in `runtime_dir`, made private (0700) if it is not yet."""
    directory = Path(runtime_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{directory} is open to other users (mode {mode:o}); make it 0700")
    path = directory / f"engine-{index}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter dir")
    return path


def _socket(context: zmq.Context[zmq.Socket[bytes]], kind: int, send_timeout_s: float) -> zmq.Socket[bytes]:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # close drops unsent messages: a closing side never waits on its peer
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    return sock


class EngineEndpoint:
    """The engine's end: one ROUTER bound to its socket path, answering many worker connections."""

    def __init__(
        self, path: str | os.PathLike[str], send_timeout_s: float = 5.0, waker: Waker | None = None
    ) -> None:
        self.path = Path(path)
        self.refused = 0  # frames that were not messages, dropped
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = _socket(self._context, zmq.ROUTER, send_timeout_s)
        self._wait = _Wait(self._socket, waker)
        # A send to a worker that has gone raises instead of vanishing: its requests can be stopped.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.path.unlink(missing_ok=True)  # a socket file left by an engine that died
        self._socket.bind(f"ipc://{self.path}")

    def receive(self, timeout_s: float) -> tuple[bytes, Message] | None:
        """The next message and the worker it came from; None when none came within `timeout_s`, or
        when the endpoint's waker woke first."""
        while self._wait(timeout_s):
            frames = self._socket.recv_multipart(copy=True)
            if len(frames) != 2:
                self.refused += 1
                log.warning("engine endpoint dropped a message of %d frames (expected 2)", len(frames))
                continue
            peer, frame = frames
            try:
                return peer, decode(frame)
            except WireError as exc:
                self.refused += 1
                log.warning("engine endpoint dropped a frame from %r: %s", peer, exc)
            timeout_s = 0  # what is already queued, no more waiting: the caller's bound holds
        return None

    def send(self, peer: bytes, message: Message) -> None:
        """Send `message` to worker `peer`; EngineUnreachable when it is gone or does not read."""
        try:
            self._socket.send_multipart([peer, encode(message)], copy=False)
        except zmq.Again:
            raise EngineUnreachable(f"worker {peer!r} did not take a message in time") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise EngineUnreachable(f"worker {peer!r} is gone") from None
            raise

    def close(self) -> None:
        """Close the socket and remove its file (idempotent)."""
        if not self._socket.closed:
            self._socket.close(linger=0)
            self._context.term()
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> EngineEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineConnection:
    """A worker's end: one DEALER connected to an engine's socket."""

    def __init__(
        self, path: str | os.PathLike[str], send_timeout_s: float = 5.0, waker: Waker | None = None
    ) -> None:
        self.path = Path(path)
        self.refused = 0
        # A readable identity: the engine's logs say which worker a request came from.
        self.identity = f"w{os.getpid()}-{secrets.token_hex(4)}".encode()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = _socket(self._context, zmq.DEALER, send_timeout_s)
        self._wait = _Wait(self._socket, waker)
        self._socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self._socket.connect(f"ipc://{self.path}")

    def send(self, message: Message) -> None:
        """Send `message` to the engine; EngineUnreachable when it does not take it in time."""
        try:
            self._socket.send(encode(message), copy=False)
        except zmq.Again:
            raise EngineUnreachable(f"the engine at {self.path} did not take a message in time") from None

    def receive(self, timeout_s: float) -> Message | None:
        """The engine's next message; None when none came within `timeout_s`, or when the connection's
        waker woke first."""
        while self._wait(timeout_s):
            frame = self._socket.recv(copy=True)
            try:
                return decode(frame)
            except WireError as exc:
                self.refused += 1
                log.warning("engine connection dropped a frame: %s", exc)
            timeout_s = 0
        return None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._socket.closed:
            self._socket.close(linger=0)
            self._context.term()

    def __enter__(self) -> EngineConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
