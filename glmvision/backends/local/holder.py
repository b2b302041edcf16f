"""The lazily loaded model of one worker process: loaded once, by warm-up or the first request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, unavailable

log = logging.getLogger("glmvision")


class ModelHolder:
    """Loads one model on demand; threads wait for a load in progress, each up to its own bound."""

    RETRY_AFTER_FAILURE = 30.0

    def __init__(self, settings: Settings, load: Callable[[Settings], LoadedModel]) -> None:
        self._settings = settings
        self._load = load
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._failed_at: float | None = None
        self.error: str | None = None
        self.loading = False

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def get(self, timeout: float) -> LoadedModel:
        """Return the model, loading it now if needed; 503 if it cannot be had within `timeout` seconds."""
        if self._loaded is not None:
            return self._loaded
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            raise unavailable("model_loading", "The model is still loading; retry shortly.", 10)
        try:
            if self._loaded is not None:
                return self._loaded
            if self._failed_at and time.monotonic() - self._failed_at < self.RETRY_AFTER_FAILURE:
                raise unavailable("model_unavailable", "The model failed to load; see the server log.", 30)
            self.loading = True
            try:
                self._loaded, self.error = self._load(self._settings), None
            except APIError:
                raise
            except Exception as exc:  # reported as 503, logged in full
                self._failed_at = time.monotonic()
                self.error = type(exc).__name__
                log.exception("model failed to load")
                raise unavailable(
                    "model_unavailable", "The model failed to load; see the server log.", 30
                ) from None
            finally:
                self.loading = False
            return self._loaded
        finally:
            self._lock.release()

    def warm_up(self) -> threading.Thread:
        """Start loading in a background thread (gunicorn calls this in each new worker)."""

        def run() -> None:
            try:
                self.get(timeout=0)
            except APIError:
                pass  # already logged; requests will see 503 and the next one retries

        thread = threading.Thread(target=run, name="glmvision-warmup", daemon=True)
        thread.start()
        return thread
