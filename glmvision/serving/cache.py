"""The response cache: answers to deterministic requests, found by an exact key or a perceptually close image.

A key has two digests: `exact` covers everything (model, revision, conversation, generation settings and
every image's pixels); `rest` covers everything but the pixels and names a bucket of the most recent
entries that share it, each with one 64-bit pHash per image. A lookup tries `exact` first and, when
perceptual matching is on, scans that bucket (at most `BUCKET_SIZE` entries) for the nearest entry whose
every image is within the configured Hamming distance.

Storage is in process (cachetools' TTLCache: LRU + TTL, one per worker) or Redis (shared by workers and
replicas). Redis failures never reach the caller (glmvision.ops.redisstore's FailOpen): they count in
`errors`, log a warning without content, and make the cache skip Redis for `BACKOFF_SECONDS` before
trying again.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import imagehash
from cachetools import TTLCache
from PIL import Image

from glmvision.core.config import ConfigError, Settings
from glmvision.ops import redisstore

# Entries kept per perceptual bucket (most recent first), so a perceptual lookup is a bounded scan.
BUCKET_SIZE = 32
# After a storage error the cache is skipped this long, so a dead Redis does not cost every request
# its timeout; then the next call tries again, and the cache recovers by itself.
BACKOFF_SECONDS = redisstore.BACKOFF
# Values live at REDIS_PREFIX + exact, buckets at REDIS_PREFIX + "bucket:" + rest; bump the version
# whenever the key derivation or the value format changes, so old entries are never read.
REDIS_PREFIX = "glmvision:cache:v1:"

_KEY_HEADER = b"glmvision-cache-key-v1\x00"
_PHASH_SIDE = 128
_VALUE_VERSION = 1


@dataclass(frozen=True)
class CachedAnswer:
    """What a hit gives back."""

    text: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    # (width, height, resized width, resized height) of each image, as the answer reported them.
    images: tuple[tuple[int, int, int, int], ...] = ()
    # The answer's usage details, so that a hit reports the usage the answer first had.
    cached_tokens: int | None = None
    image_tokens: int | None = None

    def to_bytes(self) -> bytes:
        """Serialise for storage (compact JSON with a format version)."""
        return json.dumps(
            {
                "v": _VALUE_VERSION,
                "text": self.text,
                "reasoning": self.reasoning,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason,
                "images": [list(sizes) for sizes in self.images],
                "cached_tokens": self.cached_tokens,
                "image_tokens": self.image_tokens,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        """Parse what `to_bytes` wrote; ValueError on anything else."""
        data = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not isinstance(data, dict) or data.get("v") != _VALUE_VERSION:
            raise ValueError("not a cached answer")
        text, reasoning, finish = data.get("text"), data.get("reasoning"), data.get("finish_reason")
        prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
        if not isinstance(text, str) or not isinstance(finish, str):
            raise ValueError("not a cached answer")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError("not a cached answer")
        if not (_is_count(prompt) and _is_count(completion)):
            raise ValueError("not a cached answer")
        images = data.get("images", [])
        if not isinstance(images, list) or not all(_is_sizes(sizes) for sizes in images):
            raise ValueError("not a cached answer")
        cached, image = data.get("cached_tokens"), data.get("image_tokens")
        if not all(count is None or _is_count(count) for count in (cached, image)):
            raise ValueError("not a cached answer")
        sizes = tuple(tuple(sizes) for sizes in images)
        return cls(text, reasoning, prompt, completion, finish, sizes, cached, image)


def _is_sizes(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_count(n) for n in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class CacheKey:
    """Where an answer is stored: exact digest, perceptual bucket and the images' pHashes."""

    exact: str  # hex digest over everything, the pixels included
    rest: str  # hex digest over everything but the pixels (the perceptual bucket)
    phashes: tuple[int, ...]  # one 64-bit pHash per image, () when perceptual matching is off


def _canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _frame(digest: Any, tag: bytes, data: bytes) -> None:
    # Tag plus length prefix: no two different sequences of parts can hash the same byte stream.
    digest.update(tag + len(data).to_bytes(8, "big"))
    digest.update(data)


def _phash(image: Image.Image) -> int:
    # pHash only looks at a 32x32 thumbnail: a box reduction first (to >= _PHASH_SIDE px) changes the hash
    # by a bit or two at most on real pictures and makes it several times cheaper on large ones.
    factor = min(image.width, image.height) // _PHASH_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    return int(str(imagehash.phash(image)), 16)


def make_key(
    model_id: str,
    revision: str,
    images: Sequence[Image.Image],
    conversation: Any,
    settings: Mapping[str, Any],
    perceptual: bool,
) -> CacheKey:
    """The cache key of a request: SHA-256 over canonical JSON and raw pixels; TypeError if not JSON-able."""
    rest = hashlib.sha256(_KEY_HEADER + b"rest")
    _frame(rest, b"M", model_id.encode("utf-8"))
    _frame(rest, b"R", revision.encode("utf-8"))
    _frame(rest, b"C", _canonical_json(conversation))
    _frame(rest, b"S", _canonical_json(dict(settings)))
    _frame(rest, b"N", str(len(images)).encode("ascii"))
    rest_hex = rest.hexdigest()

    exact = hashlib.sha256(_KEY_HEADER + b"exact")
    _frame(exact, b"K", rest_hex.encode("ascii"))
    for image in images:
        _frame(exact, b"I", f"{image.mode}:{image.width}x{image.height}".encode("ascii"))
        if image.mode in ("P", "PA"):
            _frame(exact, b"P", bytes(image.getpalette() or ()))
        _frame(exact, b"X", image.tobytes())
    phashes = tuple(_phash(image) for image in images) if perceptual else ()
    return CacheKey(exact.hexdigest(), rest_hex, phashes)


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int] | None:
    """(sum, max) of the per-image Hamming distances, None when the image counts differ."""
    if len(a) != len(b):
        return None
    bits = [(x ^ y).bit_count() for x, y in zip(a, b, strict=True)]
    return sum(bits), max(bits, default=0)


def _nearest(entries: Sequence[tuple[str, tuple[int, ...]]], key: CacheKey, limit: int) -> list[str]:
    """Exact digests of the bucket entries within `limit` bits on every image, nearest first."""
    found: list[tuple[int, int, int, str]] = []
    for order, (exact, phashes) in enumerate(entries):
        if exact == key.exact:
            continue
        distance = _distance(phashes, key.phashes)
        if distance is not None and distance[1] <= limit:
            # Nearest by total bits, then worst image; ties go to the most recent (bucket order).
            found.append((distance[0], distance[1], order, exact))
    found.sort()
    return [exact for *_, exact in found]


class _Store(Protocol):
    shared: bool

    def get(self, key: CacheKey, distance: int | None) -> CachedAnswer | None: ...

    def put(self, key: CacheKey, answer: CachedAnswer, bucket: bool) -> None: ...

    def close(self) -> None: ...


class _MemoryStore:
    """An LRU + TTL cache in this process, guarded by a lock (gthread workers share it)."""

    shared = False

    def __init__(self, size: int, ttl: float, timer: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._values: TTLCache[str, CachedAnswer] = TTLCache(maxsize=size, ttl=ttl, timer=timer)
        self._buckets: TTLCache[str, tuple[tuple[str, tuple[int, ...]], ...]] = TTLCache(
            maxsize=size, ttl=ttl, timer=timer
        )

    def get(self, key: CacheKey, distance: int | None) -> CachedAnswer | None:
        with self._lock:
            answer = self._values.get(key.exact)
            if answer is not None or distance is None:
                return answer
            # An entry whose value expired or was evicted is skipped: bucket entries share the value's TTL.
            for exact in _nearest(self._buckets.get(key.rest, ()), key, distance):
                answer = self._values.get(exact)
                if answer is not None:
                    return answer
            return None

    def put(self, key: CacheKey, answer: CachedAnswer, bucket: bool) -> None:
        with self._lock:
            self._values[key.exact] = answer
            if bucket:
                old = self._buckets.get(key.rest, ())
                kept = tuple(entry for entry in old if entry[0] != key.exact)[: BUCKET_SIZE - 1]
                self._buckets[key.rest] = ((key.exact, key.phashes), *kept)

    def close(self) -> None:
        with self._lock:
            self._values.clear()
            self._buckets.clear()


def _bucket_entry(key: CacheKey) -> bytes:
    return f"{key.exact}:{','.join(f'{h:016x}' for h in key.phashes)}".encode("ascii")


def _parse_entry(raw: bytes) -> tuple[str, tuple[int, ...]] | None:
    try:
        exact, _, hashes = raw.decode("ascii").partition(":")
        return exact, tuple(int(h, 16) for h in hashes.split(",") if h)
    except ValueError:
        return None


def _decode(raw: bytes | None) -> CachedAnswer | None:
    if raw is None:
        return None
    try:
        return CachedAnswer.from_bytes(raw)
    except ValueError:
        return None  # a corrupted or foreign value is a miss, not a storage error


class _RedisStore:
    """Values and buckets in Redis, with short timeouts and no retries (the caller backs off instead)."""

    shared = True

    def __init__(self, uri: str, ttl: float) -> None:
        self._ttl = max(1, math.ceil(ttl))
        self._client = redisstore.client(uri, "GLMVISION_CACHE_URI")

    def get(self, key: CacheKey, distance: int | None) -> CachedAnswer | None:
        value_key = REDIS_PREFIX + key.exact
        if distance is None:
            return _decode(self._client.get(value_key))
        # One round trip for the exact value and the bucket, so a perceptual miss costs two at most.
        pipe = self._client.pipeline(transaction=False)
        pipe.get(value_key)
        pipe.lrange(REDIS_PREFIX + "bucket:" + key.rest, 0, BUCKET_SIZE - 1)
        raw, entries = pipe.execute()
        answer = _decode(raw)
        if answer is not None:
            return answer
        parsed = [entry for entry in map(_parse_entry, entries) if entry is not None]
        candidates = _nearest(parsed, key, distance)
        if not candidates:
            return None
        for value in self._client.mget([REDIS_PREFIX + exact for exact in candidates]):
            answer = _decode(value)
            if answer is not None:
                return answer
        return None

    def put(self, key: CacheKey, answer: CachedAnswer, bucket: bool) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(REDIS_PREFIX + key.exact, answer.to_bytes(), ex=self._ttl)
        if bucket:
            bucket_key = REDIS_PREFIX + "bucket:" + key.rest
            entry = _bucket_entry(key)
            pipe.lrem(bucket_key, 0, entry)
            pipe.lpush(bucket_key, entry)
            pipe.ltrim(bucket_key, 0, BUCKET_SIZE - 1)
            pipe.expire(bucket_key, self._ttl)
        pipe.execute()

    def close(self) -> None:
        self._client.close()


class ResponseCache:
    """Answers to deterministic requests, in process (LRU + TTL) or in Redis (shared across workers)."""

    def __init__(self, store: _Store, phash_distance: int) -> None:
        self._store = store
        self._phash_distance = phash_distance
        # Read here, not at import, so a test can shorten it; anything a store raises is a miss.
        self._policy = redisstore.FailOpen("response cache", BACKOFF_SECONDS, time.monotonic, (Exception,))

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timer: Callable[[], float] = time.monotonic
    ) -> ResponseCache | None:
        """The cache the settings describe, None when caching is off; `timer` drives the in-process TTL."""
        if not settings.cache:
            return None
        uri = settings.cache_uri
        scheme = redisstore.scheme_of(uri)
        store: _Store
        if scheme == "memory":
            store = _MemoryStore(settings.cache_size, settings.cache_ttl, timer)
        elif redisstore.is_redis(uri):
            store = _RedisStore(uri, settings.cache_ttl)
        else:
            raise ConfigError(
                f"GLMVISION_CACHE_URI: expected memory:// or redis://host:port/db, got scheme {scheme!r}"
            )
        return cls(store, settings.cache_phash_distance)

    @property
    def perceptual(self) -> bool:
        """Whether an image whose pHash is close enough also hits (pass it to `make_key`)."""
        return self._phash_distance >= 0

    @property
    def errors(self) -> int:
        """Storage errors so far (each skips the cache for the back-off)."""
        return self._policy.errors

    @property
    def shared(self) -> bool:
        """Whether the cache is shared by workers and replicas (Redis)."""
        return self._store.shared

    def _perceptual_for(self, key: CacheKey) -> bool:
        # A key made without pHashes (or without images) has nothing to compare.
        return self.perceptual and bool(key.phashes)

    def get(self, key: CacheKey) -> CachedAnswer | None:
        """The stored answer for `key` (or a perceptually close one), None on a miss; never raises."""
        distance = self._phash_distance if self._perceptual_for(key) else None
        return self._policy.call(lambda: self._store.get(key, distance), None, "in get")

    def put(self, key: CacheKey, answer: CachedAnswer) -> None:
        """Store `answer` under `key` for the TTL; dropped silently when storage fails; never raises."""
        self._policy.call(lambda: self._store.put(key, answer, self._perceptual_for(key)), None, "in put")

    def close(self) -> None:
        """Release the storage's connections (the in-process cache is emptied)."""
        try:
            self._store.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            self._policy.failed(exc, "in close")
