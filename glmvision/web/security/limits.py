"""Rate limits with flask-limiter, keyed by API key (hashed) or else the client's address."""

from __future__ import annotations

import logging

from flask import Flask, request
from flask.wrappers import Response
from flask_limiter import Limiter
from limits import parse_many
from limits.errors import ConfigurationError

from glmvision.core.config import ConfigError, Settings
from glmvision.core.errors import unavailable
from glmvision.core.keys import key_digest, presented_key
from glmvision.ops import redisstore
from glmvision.web.errors import render_error
from glmvision.web.route_table import PUBLIC_ENDPOINTS

log = logging.getLogger("glmvision")


def rate_limit_key() -> str:
    """Return the bucket for this request; the key itself never reaches the storage."""
    key = presented_key(request.headers)
    if key:
        return "key:" + key_digest(key).hex()[:32]
    return "ip:" + (request.remote_addr or "unknown")


def init_app(app: Flask, settings: Settings) -> Limiter | None:
    """Apply GLMVISION_RATE_LIMIT to every endpoint but the health probes; None when unset."""
    rate = settings.rate_limit
    if not rate:
        return None
    try:
        parse_many(rate)
    except ValueError:
        raise ConfigError(f"GLMVISION_RATE_LIMIT: cannot parse {rate!r} (e.g. 60/minute)") from None
    uri = settings.ratelimit_storage_uri
    fail_open = settings.ratelimit_fail == "open"
    # A storage outage costs each request at most the Redis timeouts, never a hang.
    options = redisstore.limiter_options(uri)
    limiter = Limiter(
        key_func=rate_limit_key,
        application_limits=[rate],  # one budget per key across all endpoints
        storage_uri=uri,
        storage_options=options,
        strategy="moving-window",
        headers_enabled=True,
        # Fail open: a storage outage falls back to per-process counters. Fail closed: the error
        # reaches _storage_down below and the request is refused.
        swallow_errors=fail_open,
        in_memory_fallback_enabled=fail_open,
        key_prefix="glmvision",
    )
    if not fail_open:
        import redis

        app.register_error_handler(redis.RedisError, _storage_down)
    limiter.request_filter(lambda: request.endpoint in PUBLIC_ENDPOINTS)
    # Registered first so it runs after the limiter's header hook (Flask runs them in reverse).
    app.after_request(_retry_after_only_on_refusals)
    try:
        limiter.init_app(app)  # builds the storage from the URI
    except ConfigurationError as exc:
        variable = "GLMVISION_RATELIMIT_STORAGE_URI"
        raise ConfigError(
            f"{variable}: {redisstore.redact(uri)!r}: {exc}; e.g. {variable}=redis://127.0.0.1:6379/0"
        ) from None
    return limiter


def _storage_down(exc: Exception) -> Response:
    log.warning("rate-limit storage unavailable (%s): refusing", type(exc).__name__)
    return render_error(
        unavailable("ratelimit_unavailable", "Rate limits cannot be checked right now; retry shortly.", 5)
    )


def _retry_after_only_on_refusals(response: Response) -> Response:
    # flask-limiter adds Retry-After to every response; on a success it would tell clients to wait.
    if response.status_code < 400:
        response.headers.pop("Retry-After", None)
    return response
