"""What the pipeline shares across requests: settings, backend, URL policy, and the operations parts (cache,
audit log, redaction, circuit breaker). The web layer keeps one `Service` per app and hands it down."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmvision.core.backend import Backend
from glmvision.core.config import Settings
from glmvision.core.urlfetch import FetchPolicy
from glmvision.ops.record import RequestRecord

if TYPE_CHECKING:
    from glmvision.ops.audit import AuditLog
    from glmvision.ops.breaker import CircuitBreaker
    from glmvision.postprocess.redact import Redactor
    from glmvision.serving.cache import ResponseCache
    from glmvision.serving.moderation import Moderator
    from glmvision.serving.quotas import Quotas

# The codes the circuit breaker counts as a client's request timing out. Not queue_timeout: that is
# the server's overload, and every client behind one address would be shut out for it at once.
TIMEOUT_CODES = frozenset({"request_timeout"})
# A model that cannot answer right now (rather than a busy one): the fallback message may answer instead.
FALLBACK_CODES = frozenset({"model_loading", "model_unavailable", "engine_failed"})


@dataclass(frozen=True)
class Service:
    """One app's glmvision state."""

    settings: Settings
    backend: Backend
    fetch_policy: FetchPolicy
    started: float
    cache: ResponseCache | None = None
    audit: AuditLog | None = None
    redactor: Redactor | None = None
    breaker: CircuitBreaker | None = None
    moderator: Moderator | None = None  # None: nothing is checked, at no cost
    quotas: Quotas | None = None  # named keys' usage and quotas (a TOML keys file)

    @property
    def redacting(self) -> Redactor | None:
        """The redactor when one masks anything, else None: the one place that decides."""
        return self.redactor if self.redactor is not None and self.redactor.enabled else None

    def falls_back(self, code: str) -> bool:
        """Whether the fallback message answers instead of the error `code` (a model that cannot answer)."""
        return bool(self.settings.fallback_message) and code in FALLBACK_CODES


def breaker_client(key_id: str | None, client: str | None) -> str:
    """Whom the circuit breaker counts: the API key's id, else the client's address."""
    return f"key:{key_id}" if key_id else f"ip:{client}"


def record_outcome(state: Service, record: RequestRecord) -> None:
    """Feed the circuit breaker: a timeout, or an answer the model produced (which resets the streak)."""
    client = record.breaker_client
    if state.breaker is None or client is None:
        return
    timed_out = record.code in TIMEOUT_CODES
    if timed_out or (record.finish_reason is not None and not record.fallback and record.cache != "hit"):
        if state.breaker.record(client, timed_out):
            record.circuit_tripped = True


def client_gone_check(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check that the client of this WSGI request hung up (gunicorn exposes its socket)."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return lambda: False  # another server (or Flask's test client): cannot tell

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # The body was read already: a readable socket with nothing to read is a closed one.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone
