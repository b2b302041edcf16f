"""gunicorn pieces that deploy/gunicorn.conf.py names: a worker that answers probes first, and the
access logger."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

from glmvision.web import route_table

# Paths that only read the process's state: they never wait for the model.
PROBE_PATHS = tuple(path.encode() for path in route_table.PROBE_PATHS)
PROBE_THREADS = 2


def is_probe(head: bytes) -> bool:
    """True when the first bytes of a request are a GET or HEAD of a health or readiness probe."""
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    return method in (b"GET", b"HEAD") and path in PROBE_PATHS and (b" " in rest or b"?" in rest)


def _started_pool(size: int, name: str) -> futures.ThreadPoolExecutor:
    """A thread pool whose threads all run already."""
    # A pool starts its threads one submit at a time, from gunicorn's event loop, and each start
    # waits for the new thread to get the GIL: under a burst, with the model thread busy, the
    # loop spent ~0.4 s starting threads while every connection waited behind it.
    pool = futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix=name)
    everyone = threading.Barrier(size + 1)
    for _ in range(size):
        pool.submit(everyone.wait)
    everyone.wait()
    return pool


class ProbeFirstWorker(ThreadWorker):
    """gunicorn's gthread worker with a lane of its own for /healthz and /readyz.

    In gthread every request waits in one FIFO for a pool thread; under overload the pool is
    busy with model requests and refusals, and a liveness probe waiting there can time out and
    get a healthy worker killed. This worker peeks at each request line before handing the
    connection to a thread: probes go to a small pool of their own, everything else to the
    usual one. A connection that has sent nothing yet waits in the poller, not in a thread.
    """

    def init_process(self) -> None:
        self.probe_pool = _started_pool(PROBE_THREADS, "probe")
        super().init_process()

    def get_thread_pool(self) -> futures.ThreadPoolExecutor:
        return _started_pool(self.cfg.threads, "request")

    def enqueue_req(self, conn: Any) -> None:
        head = self._peek(conn)
        if head is None:
            self._wait_for_data(conn)
            return
        pool = self.probe_pool if is_probe(head) else self.tpool
        done = pool.submit(self.handle, conn)
        done.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _peek(self, conn: Any) -> bytes | None:
        """The request's first bytes without consuming them; None when nothing has arrived yet."""
        if self.cfg.is_ssl:
            return b""  # encrypted: cannot tell, so the usual pool
        buffered = conn.parser.unreader.buf.getvalue() if conn.parser is not None else b""
        if buffered:
            return bytes(buffered[:32])
        try:
            return conn.sock.recv(32, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"" when closed
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""  # let the usual path find out and close it

    def _wait_for_data(self, conn: Any) -> None:
        # As gthread does for a connection a thread gave up on: the poller wakes us when it is readable.
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def handle_quit(self, sig: Any, frame: Any) -> None:
        self.probe_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)


class AccessLogger(Logger):
    """gunicorn's logger, with `%(p)s` as a bare pid (gunicorn writes `<1234>`), and probes in its
    access log (when one is asked for) only at debug level, as in the request log."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        probe = environ.get("PATH_INFO", "").encode() in PROBE_PATHS
        if probe and self.loglevel > logging.DEBUG:
            return
        super().access(resp, req, environ, request_time)

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["p"] = str(os.getpid())
        return atoms
