"""What the blueprints share, kept in `app.extensions["glmvision"]`: settings, backend, URL policy."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g

from .backend import Backend, Ticket
from .config import Settings
from .urlfetch import FetchPolicy


@dataclass(frozen=True)
class Service:
    """One app's glmvision state."""

    settings: Settings
    backend: Backend
    fetch_policy: FetchPolicy
    started: float


def service() -> Service:
    """The current app's state."""
    return current_app.extensions["glmvision"]


def admit() -> Ticket:
    """Take this request's place before its body is even read (503 overloaded if full), then a slot."""
    # A refusal then costs no body parsing: under overload that is most of what the worker does.
    ticket = service().backend.admit()
    g.glmvision_ticket = ticket
    ticket.take_slot()  # read the body, decode and preprocess only a few requests at a time
    return ticket


def _abandon_unsubmitted(_: BaseException | None) -> None:
    ticket: Ticket | None = g.pop("glmvision_ticket", None)
    if ticket is not None:
        ticket.abandon()  # a bad body or image: the place goes back; a queued request keeps it


def init_app(app: Flask) -> None:
    """Give back the places of requests that ended before reaching the model."""
    app.teardown_request(_abandon_unsubmitted)
