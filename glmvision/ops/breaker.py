"""Per-client circuit breaker: N timeouts in a row and the client is refused for a cool-down.

A client whose requests keep running into GLMVISION_REQUEST_TIMEOUT holds the model the longest
and gets nothing for it; refusing it for a while frees the model for everyone else. There is no
half-open state: when the cool-down ends the circuit closes and the client starts from a count of
zero, so it needs N more timeouts in a row to be refused again.

State lives in this process (memory://) or in Redis (redis://), where every gunicorn worker and
replica shares it. Redis trouble never refuses anyone: the breaker fails open.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cachetools import TTLCache

from glmvision.core.config import ConfigError
from glmvision.ops import redisstore

if TYPE_CHECKING:
    import redis

    from glmvision.core.config import Settings

VARIABLE = "GLMVISION_BREAKER_STORAGE_URI"
KEY_PREFIX = "glmvision:breaker:"
# A streak of timeouts is forgotten once its client has gone this long without another one.
WINDOW = 3600.0
# Clients the in-memory store tracks at most (least recently used out), so cycling ids cannot grow it.
MAX_CLIENTS = 65536
# After a Redis error, seconds before Redis is tried again (meanwhile everyone is let through).
BACKOFF = redisstore.BACKOFF

# Atomic so that concurrent timeouts from several workers open the circuit exactly once, never zero times.
_RECORD_TIMEOUT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if count >= tonumber(ARGV[1]) then
    redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""


def client_hash(client: str) -> str:
    """A short fixed-length digest of a client id, for storage keys and logs."""
    return hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _Store(Protocol):
    def open_for(self, client: str) -> float | None: ...

    def record(self, client: str, timed_out: bool) -> bool: ...


class _MemoryStore:
    """This process's counts and open circuits, bounded in size, guarded by a lock."""

    def __init__(self, threshold: int, cooldown: float, window: float, clock: Callable[[], float]) -> None:
        self.threshold = threshold
        self.clock = clock
        self.lock = threading.Lock()
        self.counts: TTLCache[str, int] = TTLCache(MAX_CLIENTS, ttl=window, timer=clock)
        self.opened: TTLCache[str, float] = TTLCache(MAX_CLIENTS, ttl=cooldown, timer=clock)
        self.cooldown = cooldown

    def open_for(self, client: str) -> float | None:
        with self.lock:
            until = self.opened.get(client)
        if until is None:
            return None
        left = until - self.clock()
        return left if left > 0 else None

    def record(self, client: str, timed_out: bool) -> bool:
        with self.lock:
            if not timed_out:
                self.counts.pop(client, None)
                return False
            now = self.clock()
            until = self.opened.get(client)
            if until is not None and until > now:
                return False
            count = self.counts.get(client, 0) + 1
            if count < self.threshold:
                self.counts[client] = count
                return False
            self.counts.pop(client, None)
            self.opened[client] = now + self.cooldown
            return True


class _RedisStore:
    """Counts and open circuits in Redis, shared by every worker and replica."""

    def __init__(self, client: redis.Redis, threshold: int, cooldown: float, window: float) -> None:
        self.client = client
        self.script = self.client.register_script(_RECORD_TIMEOUT)
        self.threshold = threshold
        self.cooldown_ms = max(1, math.ceil(cooldown * 1000))
        self.window_ms = max(1, math.ceil(window * 1000))

    @staticmethod
    def keys(client: str) -> tuple[str, str]:
        # The hash tag keeps both keys in one slot, so the script also runs on Redis Cluster.
        digest = client_hash(client)
        return f"{KEY_PREFIX}{{{digest}}}:count", f"{KEY_PREFIX}{{{digest}}}:open"

    def open_for(self, client: str) -> float | None:
        left_ms = int(self.client.pttl(self.keys(client)[1]))
        if left_ms == -2:
            return None
        if left_ms == -1:  # set without an expiry by hand: treat it as a fresh cool-down
            return self.cooldown_ms / 1000
        return left_ms / 1000 if left_ms > 0 else None

    def record(self, client: str, timed_out: bool) -> bool:
        count_key, open_key = self.keys(client)
        if not timed_out:
            self.client.delete(count_key)
            return False
        opened = self.script(
            keys=[count_key, open_key], args=[self.threshold, self.window_ms, self.cooldown_ms]
        )
        return bool(opened)


class CircuitBreaker:
    """Counts each client's timeouts in a row; opens its circuit for a cool-down after N."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        storage_uri: str = "memory://",
        clock: Callable[[], float] = time.time,
        *,
        window: float = WINDOW,
        backoff: float = BACKOFF,
    ) -> None:
        """A breaker opening after `threshold` timeouts in a row, for `cooldown` seconds."""
        if threshold < 1:
            raise ConfigError(
                f"GLMVISION_BREAKER_TIMEOUTS: must be at least 1 to build a breaker, got {threshold}"
            )
        if not cooldown > 0 or math.isinf(cooldown):
            raise ConfigError(
                f"GLMVISION_BREAKER_COOLDOWN: must be a positive number of seconds, got {cooldown}"
            )
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.backoff = backoff
        self._policy = redisstore.FailOpen("circuit breaker storage", backoff, clock)
        self._store: _Store
        if redisstore.scheme_of(storage_uri) == "memory" and storage_uri.partition("://")[2] == "":
            self._store = _MemoryStore(threshold, cooldown, window, clock)
        elif redisstore.is_redis(storage_uri):
            client = redisstore.client(storage_uri, VARIABLE)
            self._store = _RedisStore(client, threshold, cooldown, window)
        else:
            raise ConfigError(
                f"{VARIABLE}: {redisstore.redact(storage_uri)!r} is not memory:// or redis://host:port/db; "
                f"e.g. {VARIABLE}=redis://127.0.0.1:6379/0"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> CircuitBreaker | None:
        """The breaker GLMVISION_BREAKER_* describe, or None when GLMVISION_BREAKER_TIMEOUTS is 0."""
        if settings.breaker_timeouts == 0:
            return None
        return cls(settings.breaker_timeouts, settings.breaker_cooldown, settings.breaker_storage_uri)

    @property
    def errors(self) -> int:
        """Storage errors so far (each starts a back-off during which everyone is let through)."""
        return self._policy.errors

    @property
    def shared(self) -> bool:
        """Whether the state is shared across processes (Redis) rather than this worker's own."""
        return isinstance(self._store, _RedisStore)

    def retry_after(self, client: str) -> int | None:
        """Whole seconds (at least 1) until `client`'s circuit closes, or None when it is closed."""
        left = self._policy.call(lambda: self._store.open_for(client), None, self._context(client))
        return None if left is None else max(1, math.ceil(left))

    def record(self, client: str, timed_out: bool) -> bool:
        """Count a request's outcome (a success resets the count); True when this call opened the circuit."""
        return self._policy.call(lambda: self._store.record(client, timed_out), False, self._context(client))

    @staticmethod
    def _context(client: str) -> str:
        return f"for client hash {client_hash(client)[:8]}"
