"""One app's state, typed, under one key of `app.extensions`: the pipeline's Service and the parts around it.

It lives in the web layer because that is the lowest one that knows every part's type: the API-key check,
the address allowlist and the rate limiter are web parts; the serving layer never needs this object (the
views hand the pipeline its Service inside each RequestContext).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app
from flask_limiter import Limiter

from glmvision.ops.metrics import Metrics
from glmvision.ops.reqlog import RequestLog
from glmvision.ops.watchdog import Watchdog
from glmvision.serving.responses_store import ResponseStore
from glmvision.serving.service import Service
from glmvision.web.security.allowlist import IpAllowlist
from glmvision.web.security.auth import ApiKeyAuth

EXTENSION = "glmvision"


@dataclass(frozen=True)
class AppState:
    """Everything glmvision keeps per app."""

    service: Service
    auth: ApiKeyAuth
    allowlist: IpAllowlist
    requests_log: RequestLog
    watchdog: Watchdog
    limiter: Limiter | None = None  # None without GLMVISION_RATE_LIMIT
    metrics: Metrics | None = None  # None without GLMVISION_METRICS
    responses: ResponseStore | None = None  # stored /v1/responses answers

    def install(self, app: Flask) -> None:
        """Keep this state as `app`'s."""
        app.extensions[EXTENSION] = self


def app_state(app: Flask | None = None) -> AppState:
    """`app`'s state (by default the current app's)."""
    state: AppState = (app or current_app).extensions[EXTENSION]
    return state


def service() -> Service:
    """The current app's Service: what the views hand the pipeline."""
    return app_state().service
