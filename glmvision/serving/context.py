"""One request's facts and decisions, made by the view and handed down to the pipeline explicitly.

What admission decided (degraded, fallback), who asks (key id, client), the cache key made once and the
client-gone check live here, and the pipeline decides from nothing else: never from `flask.g`, never from
the request record. The record is the request log's and the metrics': the pipeline writes it, never reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, g, request

from glmvision.core.backend import Ticket
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, api_error
from glmvision.core.keys import KeySpec
from glmvision.ops.record import RequestRecord, current_record
from glmvision.ops.reqlog import new_record
from glmvision.serving.service import Service, breaker_client, client_gone_check

if TYPE_CHECKING:
    from glmvision.serving.cache import CacheKey

# Where new_context() leaves the context for the teardown hook, which only gives its place back.
_OWNED = "glmvision_context"


def _never() -> bool:
    return False


@dataclass
class RequestContext:
    """One request: who asks, what admission decided, its place, and the record it fills for the log."""

    service: Service
    record: RequestRecord
    request_id: str
    route: str
    key_id: str | None
    client: str | None
    client_gone: Callable[[], bool] = field(default=_never, repr=False)
    ticket: Ticket | None = None
    degraded: bool = False
    fallback: bool = False
    # Made once, when the cache is first asked; the answer is stored under the same key.
    cache_key: CacheKey | None = None
    key: KeySpec | None = None  # the key auth accepted; named ones carry quotas and allowed models

    @classmethod
    def of(
        cls, service: Service, record: RequestRecord, client_gone: Callable[[], bool] = _never
    ) -> RequestContext:
        """A context for the request `record` describes: its ids are copied once, never read back."""
        ids = (record.request_id, record.route, record.key_id, record.client)
        return cls(service, record, *ids, client_gone)

    @property
    def settings(self) -> Settings:
        return self.service.settings

    def held(self) -> Ticket:
        """The request's place, taken by admit()."""
        if self.ticket is None:
            raise RuntimeError("admit(context) first: the request holds no place")
        return self.ticket

    def degrade(self) -> None:
        """Answer with smaller images and fewer tokens: the queue is deep."""
        self.degraded = self.record.degraded = True

    def fall_back(self) -> None:
        """Answer with the fallback message: the model cannot answer now."""
        self.fallback = self.record.fallback = True


def new_context(service: Service) -> RequestContext:
    """The context of the Flask request being served; a place it takes goes back at the request's end
    unless the model got the request."""
    record = current_record() or new_record(request)
    context = RequestContext.of(service, record, client_gone_check(request.environ))
    if service.quotas is not None and record.key_name is not None:  # named by the key check
        context.key = service.quotas.keys.get(record.key_name)
    setattr(g, _OWNED, context)  # read only by _abandon_unsubmitted, to give the place back
    return context


def admit(context: RequestContext) -> Ticket:
    """Take the request's place before its body is even read (503 overloaded if full), then a slot."""
    # A refusal then costs no body parsing: under overload that is most of what the worker does.
    state = context.service
    if state.breaker is not None:
        client = breaker_client(context.key_id, context.client)
        wait = state.breaker.retry_after(client)
        if wait is not None:
            message = f"Your recent requests timed out {state.breaker.threshold} times in a row; "
            raise api_error("circuit_open", message + f"retry in {wait} s.", retry_after=wait)
        context.record.breaker_client = client  # for record_outcome, once the response is sent
    ticket = context.ticket = _admit_or_fallback(context)
    settings = state.settings
    if settings.degrade == "shrink":
        if state.backend.health(probe=False).occupancy >= settings.degrade_queue_fraction:
            context.degrade()
    ticket.take_slot()  # read the body, decode and preprocess only a few requests at a time
    ticket.client_gone = context.client_gone
    return ticket


def _admit_or_fallback(context: RequestContext) -> Ticket:
    state = context.service
    try:
        return state.backend.admit()
    except APIError as exc:
        if not state.falls_back(exc.error_code):
            raise
        context.fall_back()  # the pipeline answers with the fallback message once the body is checked
        return Ticket.unheld(state.settings.request_timeout)


def _abandon_unsubmitted(_: BaseException | None) -> None:
    context: RequestContext | None = g.pop(_OWNED, None)
    if context is not None and context.ticket is not None:
        context.ticket.abandon()  # a bad body or image: the place goes back; a queued request keeps it


def init_app(app: Flask) -> None:
    """Give back the places of requests that ended before reaching the model."""
    app.teardown_request(_abandon_unsubmitted)
