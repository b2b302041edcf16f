"""Named keys' usage and quotas: counted per key and day in Redis (shared by the workers) or per process.

Admission holds a request's worst case against the key's daily budget: its images and max_tokens per
choice before anything is decoded, then its prompt's tokens once the inputs are prepared, before the
model generates. The request's end settles the tokens with the real usage (whatever its outcome). A
hold is one atomic step (a Lua script in Redis), so two workers never both take the last of a budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from glmvision.core.config import Settings
from glmvision.core.errors import api_error
from glmvision.core.keys import KeySpec
from glmvision.ops.record import RequestRecord
from glmvision.ops.redisstore import FailOpen, client, is_redis

if TYPE_CHECKING:
    from glmvision.core.generation import GenerationParams

log = logging.getLogger("glmvision")

PREFIX = "glmvision:usage"
# The usage hash's fields, as /v1/usage reports them; the budget fields are the quotas' own.
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "image_tokens", "images", "errors")
_TOKENS, _IMAGES = "budget_tokens", "budget_images"
_Budget = tuple[str, int, int, str, str]  # counter field, amount to hold, limit, header suffix, quota name
_KEEP_DAYS = 40  # a day's counters outlive it this long, for /v1/usage


class Counters(Protocol):
    """The few counter operations quotas need, in Redis or in this process."""

    def add_fields(self, name: str, amounts: dict[str, int]) -> None: ...

    def incr_window(self, name: str, ttl: int) -> int: ...

    def hold(self, name: str, holds: list[tuple[str, int, int]]) -> list[int]:
        """Add each (field, amount, limit) at once unless one would go over; the totals before."""
        ...

    def days(self) -> Iterator[tuple[str, dict[str, int]]]: ...


class MemoryCounters:
    """Counters of this process only (each gunicorn worker counts its own share)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[str, dict[str, int]] = {}
        self._windows: dict[str, tuple[float, int]] = {}

    def add_fields(self, name: str, amounts: dict[str, int]) -> None:
        with self._lock:
            fields = self._hashes.setdefault(name, {})
            for field, amount in amounts.items():
                fields[field] = fields.get(field, 0) + amount

    def hold(self, name: str, holds: list[tuple[str, int, int]]) -> list[int]:
        with self._lock:
            fields = self._hashes.setdefault(name, {})
            before = [fields.get(field, 0) for field, _, _ in holds]
            if all(total + amount <= limit for total, (_, amount, limit) in zip(before, holds, strict=True)):
                for field, amount, _ in holds:
                    fields[field] = fields.get(field, 0) + amount
            return before

    def incr_window(self, name: str, ttl: int) -> int:
        now = time.monotonic()
        with self._lock:
            ends, count = self._windows.get(name, (now + ttl, 0))
            if ends <= now:
                ends, count = now + ttl, 0
            self._windows[name] = (ends, count + 1)
            if len(self._windows) > 10_000:  # old windows of keys gone quiet
                self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
            return count + 1

    def days(self) -> Iterator[tuple[str, dict[str, int]]]:
        with self._lock:
            items = [(name, dict(fields)) for name, fields in self._hashes.items()]
        yield from items


# One round trip, atomic: the totals before; every amount added only if none would go over its limit.
_HOLD = """
local before, fits = {}, true
for i = 2, #ARGV, 3 do
  local total = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  table.insert(before, total)
  if total + tonumber(ARGV[i + 1]) > tonumber(ARGV[i + 2]) then fits = false end
end
if fits then
  for i = 2, #ARGV, 3 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return before
"""


class RedisCounters:
    """Counters in Redis, shared by every worker (and server) using it."""

    def __init__(self, uri: str) -> None:
        self._redis = client(uri, "GLMVISION_USAGE_STORAGE_URI")
        self._hold = self._redis.register_script(_HOLD)

    def add_fields(self, name: str, amounts: dict[str, int]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for field, amount in amounts.items():
            pipe.hincrby(name, field, amount)
        pipe.expire(name, _KEEP_DAYS * 86400)
        pipe.execute()

    def hold(self, name: str, holds: list[tuple[str, int, int]]) -> list[int]:
        args = [str(_KEEP_DAYS * 86400)] + [str(x) for hold in holds for x in hold]
        return [int(total) for total in self._hold(keys=[name], args=args)]

    def incr_window(self, name: str, ttl: int) -> int:
        pipe = self._redis.pipeline()
        pipe.incr(name)
        pipe.expire(name, ttl + 1)
        return int(pipe.execute()[0])

    def days(self) -> Iterator[tuple[str, dict[str, int]]]:
        for name in self._redis.scan_iter(match=f"{PREFIX}:*", count=500):
            text = name.decode() if isinstance(name, bytes) else name
            fields = self._redis.hgetall(text)
            yield text, {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in fields.items()}


@dataclass(frozen=True)
class UsageRow:
    """One key's totals on one (UTC) day."""

    key: str
    day: str
    totals: dict[str, int]


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def _to_midnight(now: float) -> int:
    return max(1, 86400 - int(now) % 86400)


class Quotas:
    """Usage per named key and the quotas of the keys file, in one store."""

    def __init__(
        self, keys: list[KeySpec], counters: Counters, clock: Callable[[], float] = time.time
    ) -> None:
        self.specs = tuple(keys)  # every accepted key, the plain ones too (the key check's list)
        self.keys = {spec.name: spec for spec in keys if spec.name is not None}
        self.counters = counters
        self.shared = isinstance(counters, RedisCounters)
        self.clock = clock
        self._storage = FailOpen("usage storage")

    @classmethod
    def from_settings(cls, settings: Settings, keys: list[KeySpec]) -> Quotas | None:
        """The quotas of the named keys; None when the keys file names none."""
        if not any(spec.name for spec in keys):
            return None
        uri = settings.usage_storage_uri
        if is_redis(uri):
            return cls(keys, RedisCounters(uri))
        log.warning(
            "GLMVISION_USAGE_STORAGE_URI=%s: per-key usage and quotas are counted PER WORKER PROCESS "
            "(each worker allows the whole quota); set redis://host:port/db to share them",
            uri,
        )
        return cls(keys, MemoryCounters())

    def _name(self, key: str, day: str) -> str:
        return f"{PREFIX}:{day}:{key}"

    def check_rate(self, spec: KeySpec, record: RequestRecord) -> None:
        """Count one request against the key's requests_per_minute (429 quota_exceeded when over)."""
        limit = spec.requests_per_minute
        if limit is None or spec.name is None:
            return
        now = self.clock()
        minute = int(now // 60)
        used = self._storage.call(
            lambda: self.counters.incr_window(f"{PREFIX}-rpm:{minute}:{spec.name}", 60), 0, "(rate)"
        )
        record.quota_remaining["Requests"] = max(0, limit - used)
        if used > limit:
            wait = max(1, 60 - int(now) % 60)
            raise self._exceeded(record, "requests_per_minute", limit, wait)

    def admit(
        self, spec: KeySpec | None, record: RequestRecord, params: GenerationParams, images: int, n: int
    ) -> None:
        """Check the model and hold what is known of the request's worst case before decoding: its
        images, max_tokens per choice (its prompt is held once tokenised: `hold_prompt`)."""
        if spec is None or spec.name is None:
            return
        if not spec.allows(params.adapter):
            what = f"adapter {params.adapter!r}" if params.adapter else "the base model"
            raise api_error("model_not_allowed", f"This API key may not use {what}.", "model")
        worst = params.max_new_tokens * max(1, n)
        budgets = [
            (field, amount, limit, header, what)
            for field, amount, limit, header, what in (
                (_IMAGES, images, spec.images_per_day, "Images", "images_per_day"),
                (_TOKENS, worst, spec.tokens_per_day, "Tokens", "tokens_per_day"),
            )
            if limit is not None
        ]
        if not budgets:
            return
        now = self.clock()
        name = self._name(spec.name, _day(now))
        if self._hold(record, name, budgets, now) and spec.tokens_per_day is not None:
            record.quota_reserved, record.quota_hold = worst, name

    def hold_prompt(self, spec: KeySpec | None, record: RequestRecord, tokens: int) -> None:
        """Add the prompt's tokens to the request's hold once they are known, before the model generates
        (429 quota_exceeded when the worst case, prompt included, does not fit what is left today)."""
        name, limit = record.quota_hold, spec.tokens_per_day if spec is not None else None
        if name is None or limit is None or tokens <= 0:  # no token budget, or nothing held at admission
            return
        budget = (_TOKENS, tokens, limit, "Tokens", "tokens_per_day")
        # A refusal's remaining count includes this request's own hold (its max_tokens): it goes back
        # at settlement.
        if self._hold(record, name, [budget], self.clock(), given_back=record.quota_reserved):
            record.quota_reserved += tokens

    def _hold(
        self, record: RequestRecord, name: str, budgets: list[_Budget], now: float, given_back: int = 0
    ) -> bool:
        """Hold every budget's amount in `name` in one atomic step and note what is left, or refuse with
        429 quota_exceeded naming the first that does not fit; False when storage is down (nothing held,
        nothing refused: counted again once it is back)."""
        holds = [(field, amount, limit) for field, amount, limit, _, _ in budgets]
        totals = self._storage.call(lambda: self.counters.hold(name, holds), None, "(admit)")
        if totals is None:
            return False
        fits = all(total + hold[1] <= hold[2] for total, hold in zip(totals, holds, strict=True))
        for (_, amount, limit, header, _), total in zip(budgets, totals, strict=True):
            left = limit - total - amount if fits else limit - total + given_back
            record.quota_remaining[header] = max(0, left)
        if not fits:
            what, limit = next(
                (what, limit)
                for (_, amount, limit, _, what), total in zip(budgets, totals, strict=True)
                if total + amount > limit
            )
            raise self._exceeded(record, what, limit, _to_midnight(now))
        return True

    def _exceeded(self, record: RequestRecord, what: str, limit: int, wait: int) -> Exception:
        headers = {f"X-Quota-Remaining-{kind}": str(left) for kind, left in record.quota_remaining.items()}
        message = f"This API key's {what} quota ({limit}) is used up; retry in {wait} s."
        return api_error("quota_exceeded", message, retry_after=wait, headers=headers)

    def settle(self, record: RequestRecord) -> None:
        """Once the response is out: count the request's usage, and settle its held tokens (on the day
        they were held, so a request across midnight gives its hold back to the budget that lent it)."""
        name = record.key_name
        if name is None:
            return
        now = self.clock()
        hash_name = self._name(name, _day(now))
        held_in = record.quota_hold or hash_name
        prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
        amounts = {
            "requests": 1,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "image_tokens": record.visual_tokens or 0,
            "images": len(record.images),
            "errors": int(record.status >= 400),
        }
        spec = self.keys.get(name)
        settled: dict[str, int] = {}
        if spec is not None and spec.tokens_per_day is not None:
            settled[_TOKENS] = prompt + completion - record.quota_reserved
        if held_in == hash_name:
            amounts.update(settled)
        elif settled:
            self._storage.call(lambda: self.counters.add_fields(held_in, settled), None, "(settle)")
        self._storage.call(lambda: self.counters.add_fields(hash_name, amounts), None, "(settle)")

    def usage(self) -> list[UsageRow]:
        """Every key's totals by day, newest day first (read by GET /v1/usage)."""
        rows: list[UsageRow] = []
        none: list[tuple[str, dict[str, int]]] = []
        for name, fields in self._storage.call(lambda: list(self.counters.days()), none, "(read)"):
            day, _, key = name[len(PREFIX) + 1 :].partition(":")
            rows.append(UsageRow(key, day, {field: fields.get(field, 0) for field in USAGE_FIELDS}))
        return sorted(rows, key=lambda row: (row.day, row.key), reverse=True)

    def limits(self) -> dict[str, dict[str, Any]]:
        """The named keys' limits (never their keys or digests)."""
        return {
            name: {
                "requests_per_minute": spec.requests_per_minute,
                "tokens_per_day": spec.tokens_per_day,
                "images_per_day": spec.images_per_day,
                "models": None if spec.models is None else list(spec.models),
                "admin": spec.admin,
            }
            for name, spec in self.keys.items()
        }
