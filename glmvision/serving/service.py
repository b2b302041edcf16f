"""What the blueprints share, kept in `app.extensions["glmvision"]`: settings, backend, URL policy, and the
operations parts (cache, audit log, redaction, circuit breaker) that the pipeline uses."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, g, request

from glmvision.core.backend import Backend, Ticket
from glmvision.core.config import Settings
from glmvision.core.errors import APIError
from glmvision.core.urlfetch import FetchPolicy
from glmvision.ops.record import RequestRecord, current_record

if TYPE_CHECKING:
    from glmvision.ops.audit import AuditLog
    from glmvision.ops.breaker import CircuitBreaker
    from glmvision.postprocess.redact import Redactor
    from glmvision.serving.cache import ResponseCache

# The codes the circuit breaker counts as a client's request timing out. Not queue_timeout: that is
# the server's overload, and every client behind one address would be shut out for it at once.
TIMEOUT_CODES = frozenset({"request_timeout"})
# A model that cannot answer right now (rather than a busy one): the fallback message may answer instead.
FALLBACK_CODES = frozenset({"model_loading", "model_unavailable", "engine_failed"})


@dataclass(frozen=True)
class Service:
    """One app's glmvision state."""

    settings: Settings
    backend: Backend
    fetch_policy: FetchPolicy
    started: float
    cache: ResponseCache | None = None
    audit: AuditLog | None = None
    redactor: Redactor | None = None
    breaker: CircuitBreaker | None = None


def service() -> Service:
    """The current app's state."""
    return current_app.extensions["glmvision"]


def breaker_client(record: RequestRecord) -> str:
    """Whom the circuit breaker counts: the API key's id, else the client's address."""
    return f"key:{record.key_id}" if record.key_id else f"ip:{record.client}"


def admit() -> Ticket:
    """Take this request's place before its body is even read (503 overloaded if full), then a slot."""
    # A refusal then costs no body parsing: under overload that is most of what the worker does.
    state = service()
    record = current_record()
    if state.breaker is not None and record is not None:
        client = breaker_client(record)
        wait = state.breaker.retry_after(client)
        if wait is not None:
            raise APIError(
                429,
                "circuit_open",
                f"Your recent requests timed out {state.breaker.threshold} times in a row; "
                f"retry in {wait} s.",
                retry_after=wait,
            )
        record.breaker_client = client
    ticket = _admit_or_fallback(state, record)
    g.glmvision_ticket = ticket
    settings = state.settings
    if (
        record is not None
        and settings.degrade == "shrink"
        and state.backend.health().occupancy >= settings.degrade_queue_fraction
    ):
        record.degraded = True
    ticket.take_slot()  # read the body, decode and preprocess only a few requests at a time
    ticket.client_gone = client_gone_check(request.environ)
    return ticket


def _admit_or_fallback(state: Service, record: RequestRecord | None) -> Ticket:
    try:
        return state.backend.admit()
    except APIError as exc:
        if not (state.settings.fallback_message and exc.error_code in FALLBACK_CODES and record):
            raise
        record.fallback = True  # the pipeline answers with the fallback message once the body is checked
        return Ticket.unheld(state.settings.request_timeout)


def record_outcome(state: Service, record: RequestRecord) -> None:
    """Feed the circuit breaker: a timeout, or an answer the model produced (which resets the streak)."""
    client = record.breaker_client
    if state.breaker is None or client is None:
        return
    timed_out = record.code in TIMEOUT_CODES
    if timed_out or (record.finish_reason is not None and not record.fallback and record.cache != "hit"):
        if state.breaker.record(client, timed_out):
            record.circuit_tripped = True


def _abandon_unsubmitted(_: BaseException | None) -> None:
    ticket: Ticket | None = g.pop("glmvision_ticket", None)
    if ticket is not None:
        ticket.abandon()  # a bad body or image: the place goes back; a queued request keeps it


def init_app(app: Flask) -> None:
    """Give back the places of requests that ended before reaching the model."""
    app.teardown_request(_abandon_unsubmitted)


def client_gone_check(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check that the client of this WSGI request hung up (gunicorn exposes its socket)."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return lambda: False  # another server (or Flask's test client): cannot tell

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # The body was read already: a readable socket with nothing to read is a closed one.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone
