"""The application factory."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask

from glmvision.backends import check_backend, make_backend
from glmvision.core.config import ConfigError, Settings, load_settings, warn_unknown_variables
from glmvision.core.keys import load_keys
from glmvision.core.urlfetch import FetchPolicy
from glmvision.ops.audit import AuditLog
from glmvision.ops.breaker import CircuitBreaker
from glmvision.ops.metrics import Metrics
from glmvision.ops.record import RequestRecord
from glmvision.ops.reqlog import RequestLog
from glmvision.ops.watchdog import Watchdog
from glmvision.serving import context
from glmvision.serving.cache import ResponseCache
from glmvision.serving.moderation import Moderator
from glmvision.serving.quotas import Quotas
from glmvision.serving.responses_store import ResponseStore
from glmvision.serving.service import Service, record_outcome
from glmvision.web import errors
from glmvision.web.native.routes import bp as api_bp
from glmvision.web.openai import responses
from glmvision.web.openai.routes import bp as openai_bp
from glmvision.web.openapi import bp as openapi_bp
from glmvision.web.page import routes as page
from glmvision.web.security import auth, limits
from glmvision.web.security.allowlist import IpAllowlist
from glmvision.web.security.proxy import trusted_proxy_app
from glmvision.web.state import AppState, app_state
from glmvision.web.usage import bp as usage_bp

if TYPE_CHECKING:
    from glmvision.postprocess.redact import Redactor

log = logging.getLogger("glmvision")


def _configure_logging(level: str) -> None:
    log.setLevel(level)
    # Under gunicorn nothing configures the root logger: give ours a handler of its own.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
        log.addHandler(handler)


def _fetch_policy(settings: Settings) -> FetchPolicy:
    try:
        return FetchPolicy.from_settings(settings)
    except ValueError as exc:
        example = "; e.g. GLMVISION_IMAGE_URL_DOMAINS=example.com,*.example.org"
        raise ConfigError(f"GLMVISION_IMAGE_URL_DOMAINS: {exc}{example}") from None


def create_app(overrides: Mapping[str, Any] | None = None, *, warn_unknown: bool = True) -> Flask:
    """Build the app: settings from defaults, then `GLMVISION_*` environment, then `overrides`."""
    settings = load_settings(overrides)
    _configure_logging(settings.log_level)
    if warn_unknown:
        warn_unknown_variables()
    check_backend(settings)
    app = Flask(__name__)
    app.config.update(
        {key: value for key, value in (overrides or {}).items() if not key.startswith("GLMVISION_")}
    )
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * 1024 * 1024)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    backend = make_backend(settings)
    audit = AuditLog.from_settings(settings)
    quotas = Quotas.from_settings(settings, load_keys(settings))
    state = Service(
        settings,
        backend,
        _fetch_policy(settings),
        time.time(),
        cache=ResponseCache.from_settings(settings),
        audit=audit,
        redactor=_redactor(settings),
        breaker=CircuitBreaker.from_settings(settings),
        moderator=Moderator.from_settings(settings, audit),
        quotas=quotas,
    )
    # The client's address as the trusted proxies report it: limits, logs and the allowlist use it.
    app.wsgi_app = trusted_proxy_app(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    requests_log = RequestLog(settings.request_log)
    requests_log.init_app(app)  # first: every later hook and error fills this request's record
    allowlist = IpAllowlist.from_settings(settings)
    allowlist.init_app(app)
    errors.init_app(app)
    context.init_app(app)
    # Before the limiter, so unauthenticated calls never count against a key.
    key_check = auth.init_app(app, settings, quotas)
    limiter = limits.init_app(app, settings)
    app.register_blueprint(api_bp)
    app.register_blueprint(openai_bp)
    responses.init_app(app)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(usage_bp)
    page.init_app(app)
    requests_log.add_finisher(lambda record, _: _finish(state, record))
    if quotas is not None:
        requests_log.add_finisher(lambda record, _: quotas.settle(record))
    metrics = Metrics() if settings.metrics else None
    if metrics is not None:
        metrics.init_app(app, backend, settings)
        requests_log.add_finisher(metrics.observe)
    watchdog = Watchdog(settings.stall_seconds, backend)
    stored = ResponseStore.from_settings(settings)
    AppState(state, key_check, allowlist, requests_log, watchdog, limiter, metrics, stored).install(app)
    return app


def _redactor(settings: Settings) -> Redactor | None:
    if not settings.redact:
        return None
    from glmvision.postprocess.redact import Redactor

    return Redactor(settings.redact)


def _finish(state: Service, record: RequestRecord) -> None:
    """After the response: the GPU peak for the log, the circuit breaker's count."""
    if record.finish_reason is not None and record.cache != "hit":
        record.gpu_peak_bytes = state.backend.health(probe=False).gpu_peak
    record_outcome(state, record)


def start_worker_threads(app: Flask) -> None:
    """In a gunicorn worker: start the watchdog and the metrics sampler (never in tests' apps)."""
    state = app_state(app)
    state.watchdog.start()
    if state.metrics is not None:
        state.metrics.start_sampler()
