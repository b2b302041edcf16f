"""The seam between the HTTP side and whatever generates answers (the in-process model, an upstream
engine, later an engine process): admission, submitting a generation, its health and capabilities."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from glmvision.core.errors import out_of_time, unavailable
from glmvision.core.generation import AnswerStream, GenerationParams
from glmvision.core.images import Fit


def retry_after_seconds(waiting: int, drain_rate: float) -> int:
    """Seconds until `waiting` requests and one more have likely drained (1..60; 5 before any rate)."""
    if drain_rate <= 0:
        return 5
    return max(1, min(60, math.ceil((waiting + 1) / drain_rate)))


def preparing_slots(max_batch_size: int) -> int:
    """Most requests a worker prepares at once: enough to fill a batch, or one per core."""
    return max(max_batch_size, os.cpu_count() or 1)


class PreparationSlots:
    """How many requests may read, decode and preprocess at once: a batch's worth while the model
    may be short of work, two once a batch's worth is already queued."""

    # Fewer than a batch's worth and batches run short (2 slots cost ~10% of req/s at 8 clients);
    # more than the model can use and a burst only adds GIL contention: probes and refusals waited
    # ~0.3 s behind eight preparing requests when 200 clients arrived at once.
    LEAST = 2
    RECHECK = 0.05  # the queue drains without telling us: look again this often while waiting

    def __init__(self, most: int, backlog: Callable[[], int], batch: int) -> None:
        self.most = max(most, self.LEAST)
        self._backlog = backlog
        self._batch = batch
        self._busy = 0
        self._cond = threading.Condition()

    def limit(self) -> int:
        """Slots open right now."""
        return self.LEAST if self._backlog() >= self._batch else self.most

    def take(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a slot; False if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy >= self.limit():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, self.RECHECK))
            self._busy += 1
            return True

    def give(self) -> None:
        """Hand a slot back."""
        with self._cond:
            self._busy -= 1
            self._cond.notify()


@dataclass(eq=False)
class Ticket:
    """One admitted request: when it arrived, its deadline, and its place until released."""

    arrived: float
    deadline: float
    _on_release: Callable[[Ticket], None] = field(repr=False)
    _slots: PreparationSlots = field(repr=False)
    _submitted: bool = False
    _released: bool = False
    _holds_slot: bool = False
    # Whether its client hung up (the server sets it where it can tell): work for it may stop.
    client_gone: Callable[[], bool] = field(default=lambda: False, repr=False)

    @classmethod
    def unheld(cls, timeout: float) -> Ticket:
        """A ticket that holds no place (a request answered without the model, e.g. the fallback)."""
        now = time.monotonic()
        return cls(now, now + timeout, lambda ticket: None, PreparationSlots(1, lambda: 0, 1))

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def release(self) -> None:
        """Give the place back (idempotent): the request is answered, failed or abandoned."""
        self._on_release(self)

    def abandon(self) -> None:
        """Give the place back unless the request reached the model (which then gives it back)."""
        if not self._submitted:
            self.release()

    def take_slot(self) -> None:
        """Wait (until the deadline) for one of the worker's preparation slots; kept until submitted."""
        if not self._slots.take(self.remaining()):
            raise out_of_time()
        self._holds_slot = True

    @contextmanager
    def slot_lent(self) -> Iterator[None]:
        """Lend the preparation slot to other requests while this one waits on another process (its
        grammar compiling), and take one again after (an error ends the request: none is taken)."""
        held = self._holds_slot
        if held:
            self._holds_slot = False
            self._slots.give()
        yield
        if held:
            self.take_slot()

    def split(self, parts: int) -> list[Ticket]:
        """Tickets for `parts` rows of this request (its n choices): it is released once all are."""
        lock = threading.Lock()

        def one_done(part: Ticket) -> None:
            with lock:
                if part._released:
                    return
                part._released = True
                last = all(ticket._released for ticket in parts_made)
            if last:
                self.release()

        slots = PreparationSlots(1, lambda: 0, 1)
        parts_made = [
            Ticket(
                self.arrived, self.deadline, one_done, slots, _submitted=True, client_gone=self.client_gone
            )
            for _ in range(parts)
        ]
        return parts_made

    def _give_slot_back(self) -> None:
        # Called under the admission's lock.
        if self._holds_slot:
            self._holds_slot = False
            self._slots.give()


class Admission:
    """Counts the requests a worker holds (preparing, queued, running) and refuses the one too many."""

    def __init__(
        self,
        capacity: int,
        request_timeout: float,
        drain_rate: Callable[[], float],
        on_abandoned: Callable[[], None] = lambda: None,
        slots: PreparationSlots | None = None,
    ) -> None:
        self.capacity = capacity
        self._slots = slots or PreparationSlots(2, lambda: 0, 1)
        self.request_timeout = request_timeout
        self._drain_rate = drain_rate
        self._on_abandoned = on_abandoned
        self._lock = threading.Lock()
        self.active = 0
        self.preparing = 0
        self.refused = 0

    def admit(self, engines_full: bool = False) -> Ticket:
        """A ticket for a new request, or 503 `overloaded` at once when the worker is full (or the
        engine processes, which see every worker's requests, say they are)."""
        now = time.monotonic()
        with self._lock:
            if self.active >= self.capacity or engines_full:
                self.refused += 1
                raise unavailable(
                    "overloaded", "The server is at capacity; retry shortly.", self.retry_after()
                )
            self.active += 1
            self.preparing += 1
        return Ticket(now, now + self.request_timeout, self._release, self._slots)

    def submitted(self, ticket: Ticket) -> None:
        """The request's inputs are prepared and queued: it no longer counts as arriving."""
        with self._lock:
            if not ticket._submitted and not ticket._released:
                ticket._submitted = True
                self.preparing -= 1
                ticket._give_slot_back()

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            ticket._give_slot_back()
            self.active -= 1
            abandoned = not ticket._submitted
            if abandoned:
                self.preparing -= 1
        if abandoned:
            self._on_abandoned()

    def retry_after(self) -> int:
        """Seconds until the requests held now have likely drained."""
        return retry_after_seconds(self.active, self._drain_rate())

    def as_dict(self) -> dict[str, int]:
        return {"capacity": self.capacity, "active": self.active, "refused": self.refused}


@dataclass(frozen=True)
class GpuMemory:
    """One device's memory as torch sees it, in bytes."""

    device: str
    allocated: int
    reserved: int
    total: int


@dataclass(frozen=True)
class Snapshot:
    """A backend's gauges at one moment (for /metrics); never waits."""

    loaded: bool
    queued: int = 0
    running: int = 0
    active: int = 0
    cache_empties: int = 0
    # The model caches: event counters this worker reports (each event by one worker), and the bytes
    # held, by cache; `caches_shared`: every worker reports the same engine processes' bytes.
    cache_events: tuple[tuple[str, int], ...] = ()
    cache_bytes: tuple[tuple[str, int], ...] = ()
    caches_shared: bool = False
    gpus: tuple[GpuMemory, ...] = ()
    # An upstream backend's failures so far, as (error code, count).
    upstream_failures: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ModelDescription:
    """The model as /v1/models and /readyz describe it: its id, whether it is the demo, where it runs."""

    id: str
    demo: bool
    device: str | None
    dtype: str | None

    def as_dict(self) -> dict[str, str | bool | None]:
        return {"id": self.id, "demo": self.demo, "device": self.device, "dtype": self.dtype}


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves; it changes only as its model loads (device, dtype, image fit, revision)."""

    model_names: tuple[str, ...]  # the served model id first, then the aliases clients may use
    model: ModelDescription
    # The LoRA adapters a request may name; None: any name, passed on to an engine that knows its own.
    adapters: tuple[str, ...] | None
    # The size the model resizes images to, once known, so they are decoded to it directly.
    image_fit: Fit | None = None
    # What identifies the weights answering (for the response cache); None until loaded.
    revision: str | None = None


# /readyz's status: ready, or why not.
ReadyStatus = Literal["ready", "loading", "failed", "not_loaded", "unhealthy"]


@dataclass(frozen=True)
class Health:
    """A backend's state at one moment: readiness for /readyz, load, gauges for /metrics, progress."""

    ready: bool
    status: ReadyStatus
    model: ModelDescription | None = None  # once loaded
    engine: Mapping[str, int | float | str] | None = None  # the engine's counters, once loaded
    occupancy: float = 0.0  # the share of the admission capacity in use (0..1)
    gauges: Snapshot = Snapshot(loaded=False)
    gpu_peak: int | None = None  # peak GPU bytes allocated since the engine was last idle; None off GPU
    stalled_s: float = 0.0  # seconds without progress while work waits (0 when idle or not loaded)
    # GLMVISION_ENGINE=process: each engine process's device, pid, model, queue, running and state.
    engines: tuple[Mapping[str, object], ...] = ()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, the rest of the /readyz body)."""
        details: dict[str, object] = {"status": self.status}
        if self.model is not None:
            details["model"] = self.model.as_dict()
        if self.engine is not None:
            details["engine"] = dict(self.engine)
        if self.engines:
            details["engines"] = [dict(engine) for engine in self.engines]
        return self.ready, details


@dataclass(frozen=True)
class Submission:
    """One generation asked of a backend: chat messages (images as PIL images) and how to sample."""

    messages: list[dict[str, Any]]  # the chat template's own shape: roles, text and image parts
    params: GenerationParams
    param: str = "image"  # the request field an image the model refuses came from
    streamed: bool = True  # False when only the whole answer will be read (a backend may fetch it whole)
    n: int = 1  # choices from the one prompt (OpenAI's `n`)
    # Told the prompt's token count once the inputs are prepared, before anything is queued (the named
    # key's quota holds it); raising refuses the request. A backend that does not tokenise never calls it.
    on_prompt: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Submitted:
    """A queued generation: its stream, and what preparing its inputs found."""

    stream: AnswerStream
    model_id: str  # the name of the model answering (an adapter's included)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) the model sees
    visual_tokens: int = 0  # prompt tokens that stand for image patches
    prepared_at: float = 0.0  # time.perf_counter() when the inputs were ready (preprocessing ends there)
    more: tuple[AnswerStream, ...] = ()  # the streams of choices 1..n-1, when n > 1


class Backend(Protocol):
    """What the HTTP side needs from whatever generates answers: describe it, check it, admit, submit.

    Cancelling is on what `admit` and `submit` return: `Ticket.abandon` gives back the place of a request
    that never reached the model, `AnswerStream.close` stops a generation (its ticket is then released).
    """

    # Called when the backend can no longer serve (its model thread died); gunicorn exits the worker.
    on_fatal: Callable[[], None]
    # Called with the rows of each model call (the batch-size metric).
    on_batch: Callable[[int], None]

    def capabilities(self) -> Capabilities:
        """Model names, card, adapters, image fit and revision; never waits on the model."""
        ...

    def health(self, probe: bool = True) -> Health:
        """Readiness, occupancy and gauges; never waits on the model. With `probe` an upstream is asked
        (at most every couple of seconds, by one caller at a time, with a short timeout) and GPU memory
        is read; without it, only what this process knows already: for the request path."""
        ...

    def warm_up(self) -> None:
        """Start loading or connecting in the background."""
        ...

    def stall(self, seconds: float) -> None:
        """Give up on a stalled engine: answer its requests with 503 and ask for a replacement."""
        ...

    def admit(self) -> Ticket:
        """Take a place for a new request or raise 503 `overloaded`; never waits."""
        ...

    def submit(self, submission: Submission, ticket: Ticket) -> Submitted:
        """Prepare the inputs (waiting at most until the ticket's deadline) and queue them; the stream
        yields the answer, and the ticket is released when it ends."""
        ...
