"""What both schedulers share: the queue in front of one model thread, expiry, failure and counters.

Requests are prepared (images decoded, processor run) in their own threads, then queued here. One
model thread per worker serves the queue; how it forms batches is the scheduler's business
(`static.StaticEngine` runs whole generate() calls, `continuous.ContinuousEngine` lets rows join and
leave at every decode step). Each row's tokens go straight to its request, and a row that is done
(its own max_new_tokens, a stop token or string, its deadline, a client that left) is answered at
once while the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmvision.backends.local.grammar import CompiledConstraint, DeadEnd
from glmvision.backends.local.vram import cuda_module, maybe_empty_cache
from glmvision.core.backend import Ticket, retry_after_seconds
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, bad_request, out_of_time, row_failed, unavailable
from glmvision.core.generation import GenerationParams, RawLogprob
from glmvision.postprocess.stream import GenerationStream

log = logging.getLogger("glmvision")


@dataclass(eq=False)
class Job:
    """One request waiting for, or inside, a batch."""

    inputs: Any
    params: GenerationParams
    stream: GenerationStream
    prompt_tokens: int
    ticket: Ticket
    generated: int = 0
    finished: bool = False
    constraint: CompiledConstraint | None = None  # the grammar its answer must match
    image_hashes: list[int] | None = None  # one per image, made when the engine first needs them
    prompt_keys: Any = None  # the prefix cache's keys, made when first needed (False: it has none)

    @property
    def arrived(self) -> float:
        return self.ticket.arrived

    @property
    def deadline(self) -> float:
        return self.ticket.deadline

    @property
    def full_length(self) -> int:
        """Tokens this row may hold in the KV cache at most: its prompt plus all it may generate."""
        return self.prompt_tokens + self.params.max_new_tokens

    def take(
        self, token_id: int, stop_ids: set[int] | frozenset[int], logprobs: RawLogprob | None = None
    ) -> None:
        """Hand one generated token (and its log-probabilities, when asked) to the request; answer it
        if that was its last. Should that fail, this row alone fails."""
        try:
            self.generated += 1
            if logprobs is None:
                self.stream.put([token_id])
            else:
                self.stream.put([token_id], [logprobs])
            if token_id in stop_ids or self.generated >= self.params.max_new_tokens:
                finish(self)
        except Exception:
            log.exception("handing a token to its request failed: that row alone fails")
            fail_row(self)


@dataclass
class EngineStats:
    """Counters the engine keeps about itself (served under /readyz)."""

    scheduler: str = ""
    batches: int = 0  # generate() calls (static) or prefills of newcomers (continuous)
    rows: int = 0
    largest_batch: int = 0
    steps: int = 0  # decode steps (continuous)
    completed: int = 0
    queue_timeouts: int = 0
    deadline_stops: int = 0
    oom_splits: int = 0
    oom_evictions: int = 0
    cache_empties: int = 0
    # The model caches (continuous scheduler): lookups that found a prefix or an image's embeddings,
    # the prompt tokens reused, entries evicted, and what they hold.
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_reused_tokens: int = 0
    prefix_evictions: int = 0
    prefix_tokens: int = 0
    prefix_bytes: int = 0
    encoder_hits: int = 0
    encoder_misses: int = 0
    encoder_evictions: int = 0
    encoder_bytes: int = 0
    shared_prefills: int = 0  # rows whose prompt's KV was copied from a row beside them (a request's n)
    drain_rate: float = 0.0  # requests per second, smoothed
    _last_done: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(self).items() if k[0] != "_"}

    def cache_events(self) -> dict[str, int]:
        """The model caches' event counters so far (for /metrics)."""
        return {name: getattr(self, name) for name in CACHE_EVENTS}

    def cache_bytes(self) -> dict[str, int]:
        """Bytes each model cache holds now."""
        return {"prefix": self.prefix_bytes, "encoder": self.encoder_bytes}


CACHE_EVENTS = (
    "prefix_hits",
    "prefix_misses",
    "prefix_reused_tokens",
    "prefix_evictions",
    "encoder_hits",
    "encoder_misses",
    "encoder_evictions",
)


def collate(features: list[Any], pad_id: int) -> dict[str, Any]:
    """Left-pad single-conversation processor outputs into one batch; image tensors concatenate."""
    import torch

    length = max(int(f["input_ids"].shape[1]) for f in features)
    batch: dict[str, Any] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            row = f[key]
            pad = torch.full((1, length - row.shape[1]), fill, dtype=row.dtype)
            rows.append(torch.cat([pad, row], dim=1))
        batch[key] = torch.cat(rows, dim=0)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [f[key] for f in features if key in f]
        if parts:
            batch[key] = torch.cat(parts, dim=0)
    return batch


def on_device(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs moved to the model's device, pixels in the model's floating dtype."""
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if model.model.dtype.is_floating_point and key in inputs:
            inputs[key] = inputs[key].to(model.model.dtype)
    return inputs


def mark_started(jobs: list[Job]) -> None:
    """Their first model call begins: the queue wait of each ends here."""
    for job in jobs:
        job.stream.start()


def finish(job: Job) -> None:
    """Answer a job (once): no more tokens will come, and its admission slot is free."""
    if not job.finished:
        job.finished = True
        job.stream.end()
        job.ticket.release()


def engine_failed() -> APIError:
    """The 503 for requests held by, or arriving at, an engine whose model thread failed."""
    return unavailable("engine_failed", "The model failed on this worker; it is being replaced. Retry.", 5)


def gpu_out_of_memory() -> APIError:
    """The 503 for a request the GPU had no room for."""
    return unavailable("gpu_out_of_memory", "The GPU ran out of memory; retry shortly.", 5)


def fail_row(job: Job, exc: BaseException | None = None) -> None:
    """Answer one row whose own work failed (its grammar, its draw, its token's hand-over) with 503
    row_failed, or 400 schema_unsupported when its grammar reached a dead end; the batch, the other
    rows and the model thread go on."""
    error = row_failed()
    if isinstance(exc, DeadEnd):  # the same request would fail again: the client's to change, not retry
        param = job.params.constraint.param if job.params.constraint is not None else None
        message = (
            "The JSON schema needs text here that the model's vocabulary cannot spell "
            "(a character no allowed token holds); change the schema."
        )
        error = bad_request("schema_unsupported", message, param)
    fail_unfinished([job], error)


def fail_unfinished(jobs: list[Job], error: APIError) -> None:
    """Answer every job not yet answered with `error`."""
    for job in jobs:
        if not job.finished:
            job.stream.fail(error)
            finish(job)


def stop_if_gone_or_late(job: Job, stats: EngineStats, now: float) -> None:
    """Answer a running row whose client left or whose deadline passed (what it has is its answer)."""
    if not job.finished and (job.stream.cancelled or now >= job.deadline):
        if not job.stream.cancelled:
            stats.deadline_stops += 1
            log.info("request deadline reached after %d tokens", job.generated)
        finish(job)


class QueueEngine:
    """A bounded queue in front of one model thread; subclasses decide how rows are batched."""

    scheduler = ""

    def __init__(
        self,
        model: Any,
        settings: Settings,
        arriving: Callable[[], int] = lambda: 0,
        on_fatal: Callable[[], None] = lambda: None,
        token_budget: int | None = None,
    ) -> None:
        self._model = model
        self._arriving = arriving
        self._on_fatal = on_fatal
        self.failed: str | None = None  # why the model thread stopped; it is never restarted
        self.max_batch = settings.max_batch_size
        self.max_tokens = token_budget if token_budget is not None else settings.max_batch_tokens
        self.batch_wait = settings.batch_wait_ms / 1000
        self.queue_timeout = settings.queue_timeout
        self.empty_cache_fraction = settings.empty_cache_fraction
        self.stats = EngineStats(self.scheduler)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        # Rows per model call, for the batch-size metric (set by the backend's owner).
        self.on_batch: Callable[[int], None] = lambda rows: None
        # When the model thread last made progress (a model call done, or work arriving at an idle
        # engine): the watchdog compares it with the clock while work is waiting.
        self.heartbeat = time.monotonic()

    # Request side.

    def submit(
        self,
        inputs: Any,
        params: GenerationParams,
        ticket: Ticket,
        constraint: CompiledConstraint | None = None,
        stream: GenerationStream | None = None,
    ) -> GenerationStream:
        """Queue prepared inputs; the returned stream yields the answer as it is generated (`stream`:
        one made by the caller, e.g. an engine process's sink with the same producer side)."""
        return self.submit_choices(inputs, [params], [ticket], constraint, [stream])[0]

    def submit_choices(
        self,
        inputs: Any,
        choices: list[GenerationParams],
        tickets: list[Ticket],
        constraint: CompiledConstraint | None = None,
        streams: list[GenerationStream | None] | None = None,
    ) -> list[GenerationStream]:
        """Queue one prompt's choices together, a ticket each (their rows share one prefill: see
        continuous.shared_prompts); a stream per choice."""
        jobs = [
            self._job(inputs, params, ticket, stream)
            for params, ticket, stream in zip(choices, tickets, streams or [None] * len(choices), strict=True)
        ]
        for job in jobs:
            job.constraint = constraint
        with self._cond:
            if self.failed is not None:
                raise engine_failed()
            if not self._queue and not self._held():
                self.heartbeat = time.monotonic()  # an idle engine has not stalled: work starts now
            self._queue.extend(jobs)
            self._ensure_thread()
            self._cond.notify()
        return [job.stream for job in jobs]

    def _job(
        self, inputs: Any, params: GenerationParams, ticket: Ticket, stream: GenerationStream | None = None
    ) -> Job:
        if stream is None:
            stream = GenerationStream(self._model, int(inputs["input_ids"].shape[1]), params, ticket.deadline)
        return Job(inputs, params, stream, stream.prompt_tokens, ticket)

    def warm_up(self, inputs: Any, params: GenerationParams, ticket: Ticket) -> None:
        """Run one request in the calling thread before the model thread exists; the counters forget it."""
        assert self._thread is None, "warm up before serving"
        job = self._job(inputs, params, ticket)
        self._serve_alone(job)
        try:
            job.stream.whole()
        except APIError as exc:
            if exc.error_code != "row_failed":
                raise
            # Its one row failed: this model cannot answer at all, and the load must fail as such.
            raise RuntimeError("the warm-up answer failed (see the trace above)") from exc
        self.stats = EngineStats(self.scheduler)

    def nudge(self) -> None:
        """Wake the model thread: a request it may be waiting for will not come (it failed early)."""
        with self._cond:
            self._cond.notify()

    def queued(self) -> int:
        """Requests waiting for the model right now."""
        return len(self._queue)

    def running(self) -> int:
        """Requests the model thread is generating for right now."""
        return len(self._held())

    def stalled_for(self, now: float) -> float:
        """Seconds without progress while work waits or runs; 0 when idle."""
        if not self._queue and not self._held():
            return 0.0
        return max(0.0, now - self.heartbeat)

    def stall(self, seconds: float) -> None:
        """The watchdog's verdict: answer every held request with 503 and ask for a replacement."""
        log.error("no model progress for %.0fs with work waiting: this worker gives up", seconds)
        self._fail_everything(list(self._held()), "stalled")

    def beat(self, rows: int = 0) -> None:
        """Note progress (one model call done); `rows` in it, for the batch-size metric."""
        self.heartbeat = time.monotonic()
        if rows:
            self.on_batch(rows)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained."""
        return retry_after_seconds(len(self._queue), self.stats.drain_rate)

    def _ensure_thread(self) -> None:
        # Called with self._cond held. Started once: a dead model thread means a sick worker, which
        # gunicorn replaces (see _fail_everything), rather than one quietly restarted.
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="glmvision-engine", daemon=True)
            self._thread.start()

    # Model thread.

    def _serve_alone(self, job: Job) -> None:
        """Generate one job's whole answer (warm-up)."""
        raise NotImplementedError

    def _cycle(self) -> None:
        """One round of the model thread's loop: wait for work, then do a bounded amount of it."""
        raise NotImplementedError

    def _held(self) -> list[Job]:
        """Jobs the model thread is generating for right now."""
        raise NotImplementedError

    def _loop(self) -> None:
        try:
            while True:
                self._cycle()
        except BaseException as exc:  # anything but OOM (handled by the scheduler) leaves the model in doubt
            log.exception("the model thread failed; failing its requests and replacing this worker")
            self._fail_everything(self._held(), f"{type(exc).__name__}")

    def _fail_everything(self, running: list[Job], reason: str) -> None:
        """Answer every held request with 503, refuse new ones, and ask for this worker's replacement."""
        with self._cond:
            self.failed = reason
            held = [*running, *self._queue]
            self._queue.clear()
        fail_unfinished(held, engine_failed())
        try:
            self._on_fatal()
        except Exception:  # the requests are answered; a failing exit hook must not hide that
            log.exception("could not ask for this worker's replacement")

    def _tidy_memory(self) -> None:
        """Between batches: give cached GPU memory back when the worker holds too much of the GPU."""
        device = str(self._model.device)
        if device.startswith("cuda"):
            try:
                cuda = cuda_module()
                if maybe_empty_cache(cuda, device, self.empty_cache_fraction):
                    self.stats.cache_empties += 1
                # Idle: the peak that requests report from now on is their own batch's.
                cuda.reset_peak_memory_stats(device)
            except Exception:  # hygiene must never stop the engine
                log.exception("VRAM check failed")

    def _wait_for_work(self) -> None:
        """Wait (holding the lock) until something is queued; under load, let a batch fill a moment."""
        # Requests that queued up while the model was busy mean load: the clients just served tend
        # to come straight back, so such a batch may wait a moment to fill. A request that finds
        # the model idle never waits, unless others are already being preprocessed.
        under_load = bool(self._queue)
        while not self._queue:
            self._cond.wait()
        deadline = time.monotonic() + self.batch_wait
        while len(self._queue) < self.max_batch and (under_load or self._arriving() > 0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)  # submit() and nudge() notify

    def expire_waiting(self) -> None:
        """Answer queued requests past their queue timeout or deadline now, even while a batch runs."""
        now = time.monotonic()
        with self._cond:
            expired = [job for job in self._queue if self._expiry(job, now) is not None]
            for job in expired:
                self._queue.remove(job)
        for job in expired:
            self._expire(job, now)

    def _expiry(self, job: Job, now: float) -> str | None:
        if job.stream.cancelled:
            return "cancelled"
        if now >= job.deadline:
            return "deadline"
        if now - job.arrived > self.queue_timeout:
            return "queue_timeout"
        return None

    def _expire(self, job: Job, now: float) -> bool:
        """Answer a queued job that can no longer run; False if it still can."""
        why = self._expiry(job, now)
        if why == "deadline":
            self.stats.deadline_stops += 1
            job.stream.fail(out_of_time())
        elif why == "queue_timeout":
            self.stats.queue_timeouts += 1
            job.stream.fail(
                unavailable("queue_timeout", "Waited too long for the model.", self.retry_after())
            )
        if why is not None:
            finish(job)
        return why is not None

    def _record(self, done: int) -> None:
        """Count `done` answered requests and update the drain rate behind Retry-After."""
        now = time.monotonic()
        stats = self.stats
        stats.completed += done
        if stats._last_done:
            elapsed = max(now - stats._last_done, 1e-3)
            rate = done / elapsed
            stats.drain_rate = rate if stats.drain_rate == 0 else 0.8 * stats.drain_rate + 0.2 * rate
        stats._last_done = now
