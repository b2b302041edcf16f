"""The watchdog: a worker whose engine makes no progress while work waits gives up, so gunicorn
replaces it (the seed guide's "restart when the health check fails", done by the process manager)."""

from __future__ import annotations

import logging
import threading

from glmvision.core.backend import Backend

log = logging.getLogger("glmvision")


class Watchdog:
    """Checks a backend's progress every few seconds; at the first stall, fails it once and stops."""

    def __init__(self, stall_seconds: float, backend: Backend) -> None:
        self.stall_seconds = stall_seconds
        self.interval = max(0.1, min(5.0, stall_seconds / 4))
        self._backend = backend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    def check(self) -> bool:
        """Fail the backend if it has stalled for too long; True if it did."""
        if self.fired:
            return True
        stalled = self._backend.health(probe=False).stalled_s
        if stalled < self.stall_seconds:
            return False
        self.fired = True
        log.error("watchdog: no model progress for %.0fs while requests wait", stalled)
        self._backend.stall(stalled)
        return True

    def start(self) -> None:
        """Watch from a daemon thread (gunicorn's post_worker_init calls this in each worker)."""
        if self.stall_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glmvision-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (tests)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.check():
                    return
            except Exception:  # the watchdog itself failing must not go unnoticed, nor kill the worker
                log.exception("watchdog check failed")
