"""Redis, reached one way: a client from a settings URL (short timeouts, no retries), the rate limiter's
storage options, and one failure policy for the stores that must never fail a request (`FailOpen`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from glmvision.core.config import ConfigError

log = logging.getLogger("glmvision")
T = TypeVar("T")

SCHEMES = ("redis", "rediss", "unix")
# A dead or silent Redis costs one call at most this long (each), never a hang.
CONNECT_TIMEOUT = 0.5
READ_TIMEOUT = 0.5
# After a storage error, seconds before it is tried again (meanwhile the caller falls back).
BACKOFF = 5.0
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)


def scheme_of(uri: str) -> str:
    """The URI's scheme, lower-cased; "" when it has none."""
    return uri.partition("://")[0].lower() if "://" in uri else ""


def is_redis(uri: str) -> bool:
    """Whether `uri` names a Redis server (redis://, rediss:// or unix://)."""
    return scheme_of(uri) in SCHEMES


def redact(uri: str) -> str:
    """`uri` fit for a message or log: no password (in the user part or the query) survives."""
    try:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"***@{host}" if "@" in parts.netloc else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable>"


def client(uri: str, variable: str) -> redis.Redis:
    """A client for `uri` (it connects on first use); ConfigError naming `variable` when it is unusable."""
    if not is_redis(uri):
        example = f"; e.g. {variable}=redis://127.0.0.1:6379/0"
        raise ConfigError(f"{variable}: {redact(uri)!r} is not a redis://host:port/db URL{example}")
    db = urlsplit(uri).path.strip("/") if scheme_of(uri) != "unix" else ""
    # redis-py quietly ignores a database that is not a number: refuse it rather than use db 0.
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError(f"{variable}: {redact(uri)!r}: database {db!r} is not a number")
    try:
        return redis.Redis.from_url(
            uri,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=READ_TIMEOUT,
            retry_on_timeout=False,
            # redis-py retries by default (with back-off); one attempt keeps an outage's cost bounded.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
    except ValueError as exc:
        raise ConfigError(f"{variable}: {redact(uri)!r} is not usable: {exc}") from None


def limiter_options(uri: str) -> dict[str, Any]:
    """flask-limiter's storage_options for `uri`: the same timeouts for any Redis storage, else none."""
    # limits names its Redis storages redis://, rediss://, redis+unix://, redis+sentinel://, redis+cluster://.
    if scheme_of(uri).startswith("redis"):
        return {"socket_timeout": READ_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    return {}


class FailOpen:
    """Storage trouble never fails a request: the caller gets its fallback, and the storage a back-off."""

    # Each error is counted and logged; then the storage is skipped for `backoff` seconds (so logged once
    # per back-off, and a dead Redis costs one timeout per back-off, not one per request).

    def __init__(
        self,
        what: str,
        backoff: float = BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        errors: tuple[type[Exception], ...] = REDIS_ERRORS,
    ) -> None:
        """A policy for the storage `what` names in its log lines, catching `errors`."""
        self.what = what
        self.backoff = backoff
        self.clock = clock
        self.catches = errors
        self.errors = 0
        self._lock = threading.Lock()
        self._down_until = 0.0

    def call(self, operation: Callable[[], T], fallback: T, context: str = "") -> T:
        """`operation()`, or `fallback` while backing off or when it fails; `context` goes in the log line."""
        if self._down_until and self.clock() < self._down_until:
            return fallback
        try:
            result = operation()
        except self.catches as exc:
            self.failed(exc, context)
            return fallback
        if self._down_until:
            self._down_until = 0.0
        return result

    def failed(self, exc: Exception, context: str = "") -> None:
        """Count `exc`, start the back-off and log it without content."""
        with self._lock:
            self.errors += 1
            self._down_until = self.clock() + self.backoff
        # A connection error says only where and why; other errors' text could echo a command (content).
        detail = f": {exc}" if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError) else ""
        log.warning(
            "%s error (%s%s)%s; falling back for %.1f s",
            self.what,
            type(exc).__name__,
            detail,
            f" {context}" if context else "",
            self.backoff,
        )
