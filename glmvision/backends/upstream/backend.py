"""The upstream backend: no model in this process; every generation goes to an OpenAI-compatible engine."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmvision.backends.upstream.client import (
    UpstreamClient,
    UpstreamCounters,
    openai_messages,
    upstream_down,
)
from glmvision.backends.upstream.stream import UpstreamStream
from glmvision.core.backend import (
    Admission,
    Capabilities,
    Health,
    ModelDescription,
    PreparationSlots,
    Snapshot,
    Submission,
    Submitted,
    Ticket,
    preparing_slots,
)
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, bad_request, unavailable
from glmvision.core.generation import Constraint, GenerationParams
from glmvision.core.lora import model_name

log = logging.getLogger("glmvision")

# /readyz asks the upstream at most this often, and waits at most PROBE_TIMEOUT for it.
PROBE_EVERY = 2.0
PROBE_TIMEOUT = 0.8
# Finished requests over this many seconds make the drain rate behind Retry-After.
RATE_WINDOW = 30.0


@dataclass(frozen=True)
class Prepared:
    """A request as the upstream will be sent it, and the name we answer it under."""

    model_id: str
    upstream_model: str  # the model (or adapter) the upstream is asked for
    messages: list[dict[str, Any]]  # in OpenAI's shape
    image_sizes: list[tuple[int, int]]


def upstream_format(constraint: Constraint) -> dict[str, Any]:
    """A constraint as OpenAI's response_format: the upstream engine enforces it with its own grammar."""
    if constraint.schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": json.loads(constraint.schema)}}


class UpstreamBackend:
    """Admission, then a bounded number of concurrent requests to the upstream over one pooled session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = UpstreamClient(
            settings.upstream_url,
            settings.upstream_key.get_secret_value(),
            settings.upstream_concurrency,
            settings.upstream_connect_timeout,
        )
        self.counters = UpstreamCounters()
        self.admission = Admission(
            settings.admission_capacity,
            settings.request_timeout,
            self._drain_rate,
            slots=PreparationSlots(
                preparing_slots(settings.max_batch_size), lambda: 0, settings.max_batch_size
            ),
        )
        self._in_flight = threading.BoundedSemaphore(settings.upstream_concurrency)
        self._lock = threading.Lock()
        self.running = 0
        self._ended: collections.deque[float] = collections.deque(maxlen=4096)
        self._model: str | None = settings.upstream_model or None
        self._probe_lock = threading.Lock()
        self._probed_at = -float("inf")
        self._probe: tuple[bool, str | None] = (False, "not probed yet")
        self.on_fatal: Callable[[], None] = lambda: None
        self.on_batch: Callable[[int], None] = lambda rows: None

    # The upstream's model and readiness.

    def _ask(self, timeout: float) -> tuple[bool, str | None]:
        """Ask the upstream's /models now: (answers, why not); learns the default model id."""
        try:
            ids = self.client.model_ids(timeout)
        except APIError as exc:
            return False, exc.description
        if not ids:
            return False, "the upstream lists no model"
        if self._model is None:
            self._model = ids[0]
            log.info("upstream model: %s (the first of %s)", ids[0], ", ".join(ids))
        return True, None

    def _probed(self) -> tuple[bool, str | None]:
        """The upstream's last known state, asked again if older than PROBE_EVERY (one asker at a time)."""
        if time.monotonic() - self._probed_at >= PROBE_EVERY and self._probe_lock.acquire(blocking=False):
            try:
                self._probe = self._ask(PROBE_TIMEOUT)
                self._probed_at = time.monotonic()
            finally:
                self._probe_lock.release()
        return self._probe

    def _upstream_model(self, ticket: Ticket) -> str:
        """The model id to send; asked of the upstream (bounded by the deadline) until known."""
        if self._model is None:
            self._ask(max(0.05, min(self.settings.upstream_connect_timeout, ticket.remaining())))
        if self._model is None:
            raise self.counters.count(upstream_down("The upstream engine lists no model yet; retry shortly."))
        return self._model

    def _model_names(self, probe: bool = True) -> tuple[str, ...]:
        if probe and self._model is None:
            self._probed()
        served = self.settings.model_id or self._model or self.settings.upstream_model or "upstream"
        return (served, *self.settings.model_aliases)

    def capabilities(self) -> Capabilities:
        names = self._model_names()
        revision = None if self._model is None else f"upstream:{self.client.base_url}:{self._model}"
        # No adapters list: the upstream serves its own LoRA modules by name. No image fit: its processor
        # resizes; we only cap sides at GLMVISION_MAX_IMAGE_SIDE.
        return Capabilities(names, ModelDescription(names[0], False, "upstream", None), None, None, revision)

    def health(self, probe: bool = True) -> Health:
        ready, why = self._probed() if probe else self._probe
        engine: dict[str, int | float | str] = {
            "upstream": self.client.base_url,
            "running": self.running,
            "unavailable": self.counters.unavailable,
            "rejected": self.counters.rejected,
            **self.admission.as_dict(),
        }
        if not ready:
            engine["error"] = why or "the upstream does not answer"
        failures = (
            ("upstream_unavailable", self.counters.unavailable),
            ("upstream_rejected", self.counters.rejected),
        )
        gauges = Snapshot(
            loaded=ready, running=self.running, active=self.admission.active, upstream_failures=failures
        )
        return Health(
            ready,
            "ready" if ready else "unhealthy",
            ModelDescription(self._model_names(probe)[0], False, "upstream", None),
            engine,
            self.admission.active / self.admission.capacity,
            gauges,
            # No GPU here, and no stall to watch for: every upstream wait has its own timeout.
        )

    def warm_up(self) -> None:
        threading.Thread(target=self._probed, name="glmvision-upstream-probe", daemon=True).start()

    def stall(self, seconds: float) -> None:
        """Nothing to replace: requests to a stuck upstream time out by themselves."""

    # Load (the drain rate behind Retry-After).

    def _drain_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._ended and self._ended[0] < now - RATE_WINDOW:
                self._ended.popleft()
            return len(self._ended) / RATE_WINDOW

    # Requests.

    def admit(self) -> Ticket:
        return self.admission.admit()

    def _prepare(self, messages: list[dict[str, Any]], params: GenerationParams, ticket: Ticket) -> Prepared:
        sizes = [
            part["image"].size
            for message in messages
            if not isinstance(message["content"], str)
            for part in message["content"]
            if part["type"] == "image"
        ]
        # An adapter is asked for by its own name, as vLLM's --lora-modules serves it.
        model = params.adapter or self._upstream_model(ticket)
        # Named as we serve it (GLMVISION_MODEL_ID).
        return Prepared(
            model_name(self._model_names()[0], params.adapter), model, openai_messages(messages), sizes
        )

    def _body(self, prepared: Prepared, params: GenerationParams, streamed: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": prepared.upstream_model,
            "messages": prepared.messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            # A whole answer is asked for whole: streaming costs the engine per token (~20% of the
            # demo engine's req/s at 8 clients), and only a streamed answer needs the pieces.
            "stream": streamed,
            "chat_template_kwargs": {"enable_thinking": params.enable_thinking},
        }
        if streamed:
            body["stream_options"] = {"include_usage": True}
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens
        if params.constraint is not None and params.constraint.tools is None:  # tool_choice says it for calls
            body["response_format"] = upstream_format(params.constraint)
        if params.tools:
            body["tools"] = list(params.tools)
            if params.tool_choice is not None:
                body["tool_choice"] = params.tool_choice.to_json()
        return body

    def submit(self, submission: Submission, ticket: Ticket) -> Submitted:
        params, streamed = submission.params, submission.streamed
        # Refused rather than passed on: the upstream's own choices and logprobs are not read back.
        if submission.n > 1:
            raise bad_request(
                "unsupported_parameter", "n above 1 is not served with an upstream engine.", "n"
            )
        if params.logprobs is not None:
            message = "logprobs are not served with an upstream engine."
            raise bad_request("unsupported_parameter", message, "logprobs")
        prepared = self._prepare(submission.messages, params, ticket)
        prepared_at, queued_at = time.perf_counter(), time.monotonic()
        self.admission.submitted(ticket)  # prepared: its preparation slot goes to the next request
        if not self._in_flight.acquire(timeout=min(self.settings.queue_timeout, ticket.remaining())):
            raise unavailable(
                "queue_timeout",
                "Every upstream connection stayed busy; retry shortly.",
                self.admission.retry_after(),
            )
        with self._lock:
            self.running += 1
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            with self._lock:
                self.running -= 1
                self._ended.append(time.monotonic())
            self._in_flight.release()
            ticket.release()

        sent_at = time.monotonic()
        try:
            response = self.client.chat(self._body(prepared, params, streamed), max(0.05, ticket.remaining()))
        except APIError as exc:
            end()
            raise self.counters.count(exc) from None
        except BaseException:
            end()
            raise
        stream = UpstreamStream(
            response, params, ticket.deadline, end, self.counters.count, queued_at, streamed, sent_at
        )
        return Submitted(stream, prepared.model_id, prepared.image_sizes, prepared_at=prepared_at)
