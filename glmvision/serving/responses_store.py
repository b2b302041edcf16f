"""Stored /v1/responses answers, for GET, DELETE and previous_response_id: bounded, expiring, per API key.

In Redis when GLMVISION_CACHE_URI is redis:// (shared by servers, Redis expiring them); under glmvision's
gunicorn config in one SQLite file that every worker of the server shares (a follow-up may land on any
worker); otherwise in process. Each keeps at most GLMVISION_RESPONSES_STORE_SIZE, the oldest out. Storage
trouble never fails a request: a response it cannot store is simply not found later.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from glmvision.core.config import SHARED_DIR_ENV, Settings
from glmvision.ops import redisstore

REDIS_PREFIX = "glmvision:responses:"

log = logging.getLogger("glmvision")


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
        shared = os.environ.get(SHARED_DIR_ENV)
        self._file: SharedFileStore | None = None
        if self._redis is None and shared and size > 0:
            self._file = SharedFileStore(os.path.join(shared, "responses.sqlite"), size, ttl)

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
        if self._file is not None:
            file = self._file
            self._guarded(lambda: file.put(key, record), None, "storing")
            return
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
        if self._file is not None:
            file = self._file
            found: dict[str, Any] | None = self._guarded(lambda: file.get(key), None, "reading")
            return found
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
        if self._file is not None:
            file = self._file
            return bool(self._guarded(lambda: file.delete(key), False, "deleting"))
        if self._redis is not None:
            client = self._redis
            return bool(self._policy.call(lambda: client.delete(REDIS_PREFIX + key), 0, "deleting"))
        with self._lock:
            found = self._memory.pop(key, None)
            return found is not None and found[0] > self.clock()

    def _guarded(self, call: Callable[[], Any], fallback: Any, doing: str) -> Any:
        """The shared file's answer; on a database error, `fallback` (logged), never the request's failure."""
        try:
            return call()
        except (sqlite3.Error, OSError, ValueError):
            log.warning("the response store failed %s a response; going on without it", doing, exc_info=True)
            return fallback


class SharedFileStore:
    """Stored responses in one SQLite file that every worker of a server opens (WAL: readers never
    wait for the writer); each process opens its own connection after the fork."""

    def __init__(self, path: str, size: int, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.path, self.size, self.ttl, self.clock = path, size, ttl, clock
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0

    def _open(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            # Bounded waits: a writer holds the file for microseconds; 5 s means something is wrong.
            connection = sqlite3.connect(
                self.path, timeout=5.0, check_same_thread=False, isolation_level=None
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, expires REAL, record TEXT)"
            )
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    def put(self, key: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            db = self._open()
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, self.clock() + self.ttl, text)
            )
            db.execute("DELETE FROM responses WHERE expires <= ?", (self.clock(),))
            db.execute(
                "DELETE FROM responses WHERE rowid NOT IN "
                "(SELECT rowid FROM responses ORDER BY rowid DESC LIMIT ?)",
                (self.size,),
            )

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = (
                self._open()
                .execute("SELECT record FROM responses WHERE key = ? AND expires > ?", (key, self.clock()))
                .fetchone()
            )
        return json.loads(row[0]) if row else None

    def delete(self, key: str) -> bool:
        with self._lock:
            cursor = self._open().execute(
                "DELETE FROM responses WHERE key = ? AND expires > ?", (key, self.clock())
            )
        return cursor.rowcount > 0
