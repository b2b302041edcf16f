"""Stored /v1/responses answers, for GET, DELETE and previous_response_id: bounded, expiring, per API key.

In process (each worker its own, the oldest out past GLMVISION_RESPONSES_STORE_SIZE), or in Redis when
GLMVISION_CACHE_URI is redis:// (shared by the workers, Redis expiring them). Redis trouble never fails a
request: a response it cannot store is simply not found later.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from glmvision.core.config import Settings
from glmvision.ops import redisstore

REDIS_PREFIX = "glmvision:responses:"


def scope_of(key_id: str | None) -> str:
    """Whose responses a request may see: its own API key's (anonymous callers share one scope)."""
    return f"key:{key_id}" if key_id else "anonymous"


class ResponseStore:
    """Stored responses as JSON-ready records, keyed by scope and id."""

    def __init__(
        self, size: int, ttl: float, uri: str = "memory://", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size, self.ttl, self.clock = size, ttl, clock
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._redis = redisstore.client(uri, "GLMVISION_CACHE_URI") if redisstore.is_redis(uri) else None
        self._policy = redisstore.FailOpen("response store")

    @classmethod
    def from_settings(cls, settings: Settings) -> ResponseStore:
        """The store the settings describe (Redis only when the response cache uses it)."""
        uri = settings.cache_uri if settings.cache else "memory://"
        return cls(settings.responses_store_size, settings.responses_ttl, uri)

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def put(self, scope: str, response_id: str, record: dict[str, Any]) -> None:
        """Keep `record` for `ttl` seconds (or until pushed out)."""
        if not self.enabled:
            return
        key = f"{scope}:{response_id}"
        if self._redis is not None:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            client, seconds = self._redis, max(1, round(self.ttl))
            self._policy.call(lambda: client.set(REDIS_PREFIX + key, text, ex=seconds), None, "storing")
            return
        with self._lock:
            self._memory[key] = (self.clock() + self.ttl, record)
            self._memory.move_to_end(key)
            while len(self._memory) > self.size:
                self._memory.popitem(last=False)

    def get(self, scope: str, response_id: str) -> dict[str, Any] | None:
        """The record, if stored for this scope and not expired."""
        key = f"{scope}:{response_id}"
        if self._redis is not None:
            client = self._redis
            raw = self._policy.call(lambda: client.get(REDIS_PREFIX + key), None, "reading")
            return json.loads(raw) if raw else None
        with self._lock:
            found = self._memory.get(key)
            if found is None:
                return None
            if found[0] <= self.clock():
                del self._memory[key]
                return None
            return found[1]

    def delete(self, scope: str, response_id: str) -> bool:
        """Forget the record; whether there was one."""
        key = f"{scope}:{response_id}"
        if self._redis is not None:
            client = self._redis
            return bool(self._policy.call(lambda: client.delete(REDIS_PREFIX + key), 0, "deleting"))
        with self._lock:
            found = self._memory.pop(key, None)
            return found is not None and found[0] > self.clock()
