"""What one request did, gathered as it runs: the request log line and the metrics both read it."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import g, has_request_context

# A client's X-Request-ID is kept when it is this tame; anything else is replaced (log injection).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id_from(header: str | None) -> str:
    """The client's request id when it is safe to echo and log, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ImageStat:
    """One image's size as sent and as it went on (after our resize)."""

    width: int
    height: int
    resized_width: int
    resized_height: int


@dataclass
class RequestRecord:
    """Ids, sizes, tokens and timings of one request; never its prompt or answer."""

    request_id: str
    method: str
    route: str
    client: str | None
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    status: int = 0
    code: str | None = None
    stream: bool = False
    images: list[ImageStat] = field(default_factory=list)
    prompt_tokens: int | None = None
    visual_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    preprocess_s: float | None = None
    queue_s: float | None = None
    generate_s: float | None = None
    first_token_s: float | None = None
    gpu_peak_bytes: int | None = None
    cache: str | None = None  # "hit" or "miss" for a cacheable request
    degraded: bool = False
    fallback: bool = False
    redactions: dict[str, int] = field(default_factory=dict)  # masked matches per kind
    breaker_client: str | None = None  # whom the circuit breaker counts, once admitted
    circuit_tripped: bool = False
    # Content moderation's checks: (stage, outcome), stage input|output, outcome passed|flagged|failed.
    moderation: list[tuple[str, str]] = field(default_factory=list)
    key_name: str | None = None  # a named key's name (the keys file's TOML form): usage and metrics
    quota_reserved: int = 0  # tokens held against the key's daily quota at admission, settled at the end
    quota_hold: str | None = None  # the day's budget those tokens are held in (None: nothing held)
    quota_remaining: dict[str, int] = field(default_factory=dict)  # budget left, for X-Quota-Remaining-*

    def log_fields(self, total_s: float) -> dict[str, Any]:
        """The request log line's fields (milliseconds, rounded); absent values are left out."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "code": self.code,
            "key_id": self.key_id,
            "client": self.client,
            "stream": self.stream,
            "images": [vars(image) for image in self.images] or None,
            "prompt_tokens": self.prompt_tokens,
            "visual_tokens": self.visual_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "cache": self.cache,
            "degraded": self.degraded or None,
            "fallback": self.fallback or None,
            "preprocess_ms": _ms(self.preprocess_s),
            "queue_ms": _ms(self.queue_s),
            "generate_ms": _ms(self.generate_s),
            "first_token_ms": _ms(self.first_token_s),
            "total_ms": _ms(total_s),
            "gpu_peak_bytes": self.gpu_peak_bytes,
        }
        return {key: value for key, value in fields.items() if value is not None}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def current_record() -> RequestRecord | None:
    """This request's record for the log and metrics to fill (None outside a request, or before the app
    made one); never read to decide how to answer: the pipeline's facts are in its RequestContext."""
    if not has_request_context():
        return None
    return g.get("glmvision_record")
