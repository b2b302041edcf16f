"""What the blueprints share, kept in `app.extensions["glmvision"]`: settings, backend, URL policy."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from .backend import Backend
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
