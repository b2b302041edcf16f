"""The request's record from first hook to last byte: X-Request-ID, one JSON log line, and the finishers
(metrics, the circuit breaker) that read the record once the response is sent."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from flask import Flask, Request, g, request
from flask.wrappers import Response

from glmvision.core.keys import key_digest, presented_key
from glmvision.ops.record import RequestRecord, current_record, request_id_from

REQUEST_ID_HEADER = "X-Request-ID"
# Polled every few seconds by load balancers and Prometheus: logged at DEBUG, so real requests stand out.
QUIET_ROUTES = frozenset({"/healthz", "/health", "/readyz", "/metrics"})
Finisher = Callable[[RequestRecord, float], None]


def key_id(key: str) -> str:
    """The short id of an API key in logs and metrics: 12 hex digits of its SHA-256, never the key."""
    return key_digest(key).hex()[:12]


def request_logger() -> logging.Logger:
    """`glmvision.request`: one JSON object per line on stderr, apart from the service's own log."""
    from pythonjsonlogger.json import JsonFormatter

    logger = logging.getLogger("glmvision.request")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger


def new_record(incoming: Request) -> RequestRecord:
    """A fresh record of `incoming`: its id (the client's, if tame), method, route, client and key id."""
    rule = incoming.url_rule
    record = RequestRecord(
        request_id=request_id_from(incoming.headers.get(REQUEST_ID_HEADER)),
        method=incoming.method,
        route=rule.rule if rule is not None else "unmatched",
        client=incoming.remote_addr,
    )
    key = presented_key(incoming.headers)
    if key is not None:
        record.key_id = key_id(key)
    return record


class RequestLog:
    """Starts each request's record, returns its id, and finishes it once the last byte is out."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.finishers: list[Finisher] = []
        self._logger = request_logger() if enabled else None

    def init_app(self, app: Flask) -> None:
        """Register first, so the record exists before the allowlist, auth and limits look at it."""
        app.before_request(self._begin)
        app.after_request(self._end)

    def add_finisher(self, finisher: Finisher) -> None:
        """Call `finisher(record, total_seconds)` for every request once its response is sent."""
        self.finishers.append(finisher)

    def _begin(self) -> None:
        g.glmvision_record = new_record(request)

    def _end(self, response: Response) -> Response:
        record = current_record()
        if record is None:  # a request that failed before our first hook ran (none do today)
            return response
        record.status = response.status_code
        response.headers[REQUEST_ID_HEADER] = record.request_id
        if record.cache is not None:
            response.headers["X-Cache"] = record.cache
        if response.is_streamed:
            # A stream ends long after this hook: its record is finished when the server closes it.
            response.call_on_close(lambda: self._finish(record))
        else:
            self._finish(record)
        return response

    def _finish(self, record: RequestRecord) -> None:
        total = time.perf_counter() - record.started
        for finisher in self.finishers:
            try:
                finisher(record, total)
            except Exception:  # bookkeeping must never break a response already sent
                logging.getLogger("glmvision").exception("finishing a request's record failed")
        if self._logger is not None:
            level = logging.DEBUG if record.route in QUIET_ROUTES else logging.INFO
            self._logger.log(level, "request", extra={"pid": os.getpid(), **record.log_fields(total)})
