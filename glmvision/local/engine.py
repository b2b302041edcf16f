"""The batching engine: one model thread per worker runs padded generate() calls over waiting requests.

Requests are prepared (images decoded, processor run) in their own threads, then queued here. The
model thread takes what is waiting, groups rows that can share sampling settings, and runs one
left-padded generate(); each row's tokens go straight to its request, and a row that is done (its
own max_new_tokens, a stop token or string, its deadline, a client that left) stops receiving
tokens and is answered at once while the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backend import Ticket, retry_after_seconds
from ..config import Settings
from ..errors import APIError, out_of_time, unavailable
from ..generation import GenerationParams, GenerationStream
from .vram import cuda_module, maybe_empty_cache, release_cuda_cache

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

    @property
    def arrived(self) -> float:
        return self.ticket.arrived

    @property
    def deadline(self) -> float:
        return self.ticket.deadline

    @property
    def group(self) -> tuple[Any, ...]:
        """Rows with equal groups can share one generate() call."""
        p = self.params
        if p.seed is not None and p.temperature > 0:
            return ("seeded", id(self))  # a reproducible sample needs the RNG to itself
        sampling = (p.temperature, p.top_p) if p.temperature > 0 else ()
        return (p.temperature > 0, *sampling, p.min_new_tokens)


@dataclass
class EngineStats:
    """Counters the engine keeps about itself (served under /readyz)."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    completed: int = 0
    queue_timeouts: int = 0
    deadline_stops: int = 0
    oom_splits: int = 0
    cache_empties: int = 0
    drain_rate: float = 0.0  # requests per second, smoothed
    _last_done: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(self).items() if k[0] != "_"}


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
    for key in ("pixel_values", "image_grid_thw"):
        parts = [f[key] for f in features if key in f]
        if parts:
            batch[key] = torch.cat(parts, dim=0)
    return batch


class _RowStreamer:
    """Receives each step's tokens for the whole batch and routes them to the rows still running."""

    def __init__(self, jobs: list[Job], stop_ids: set[int]) -> None:
        self._jobs = jobs
        self._stop_ids = stop_ids
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompts themselves
            self._prompt_seen = True
            return
        for job, token_id in zip(self._jobs, value.reshape(-1).tolist(), strict=True):
            if job.finished:
                continue  # padding after this row's end: not its tokens
            job.generated += 1
            job.stream.put([token_id])
            if token_id in self._stop_ids or job.generated >= job.params.max_new_tokens:
                _finish(job)

    def end(self) -> None:
        pass


def _finish(job: Job) -> None:
    if not job.finished:
        job.finished = True
        job.stream.end()
        job.ticket.release()


def engine_failed() -> APIError:
    """The 503 for requests held by, or arriving at, an engine whose model thread failed."""
    return unavailable("engine_failed", "The model failed on this worker; it is being replaced. Retry.", 5)


def _fail_unfinished(jobs: list[Job], error: APIError) -> None:
    for job in jobs:
        if not job.finished:
            job.stream.fail(error)
            _finish(job)


def _rows_done_criteria(jobs: list[Job], stats: EngineStats, each_step: Callable[[], None]) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            each_step()
            now = time.monotonic()
            for job in jobs:
                if not job.finished and (job.stream.cancelled or now >= job.deadline):
                    if not job.stream.cancelled:
                        stats.deadline_stops += 1
                        log.info("request deadline reached after %d tokens", job.generated)
                    _finish(job)
            return torch.tensor([job.finished for job in jobs], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([RowsDone()])


class Engine:
    """A bounded queue in front of one model thread that batches compatible requests."""

    def __init__(
        self,
        model: Any,
        settings: Settings,
        arriving: Callable[[], int] = lambda: 0,
        on_fatal: Callable[[], None] = lambda: None,
    ) -> None:
        self._model = model
        self._arriving = arriving
        self._on_fatal = on_fatal
        self.failed: str | None = None  # why the model thread stopped; it is never restarted
        self.max_batch = settings.max_batch_size
        self.max_tokens = settings.max_batch_tokens
        self.batch_wait = settings.batch_wait_ms / 1000
        self.queue_timeout = settings.queue_timeout
        self.empty_cache_fraction = settings.empty_cache_fraction
        self.stats = EngineStats()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    # Request side.

    def submit(self, inputs: Any, params: GenerationParams, ticket: Ticket) -> GenerationStream:
        """Queue prepared inputs; the returned stream yields the answer as it is generated."""
        stream = GenerationStream(self._model, int(inputs["input_ids"].shape[1]), params, ticket.deadline)
        job = Job(inputs, params, stream, stream.prompt_tokens, ticket)
        with self._cond:
            if self.failed is not None:
                raise engine_failed()
            self._queue.append(job)
            self._ensure_thread()
            self._cond.notify()
        return stream

    def warm_up(self, inputs: Any, params: GenerationParams, ticket: Ticket) -> None:
        """Run one request in the calling thread before the model thread exists; the counters forget it."""
        assert self._thread is None, "warm up before serving"
        stream = GenerationStream(self._model, int(inputs["input_ids"].shape[1]), params, ticket.deadline)
        self._run([Job(inputs, params, stream, stream.prompt_tokens, ticket)])
        stream.whole()
        self.stats = EngineStats()

    def nudge(self) -> None:
        """Wake the model thread: a request it may be waiting for will not come (it failed early)."""
        with self._cond:
            self._cond.notify()

    def queued(self) -> int:
        """Requests waiting for the model right now."""
        return len(self._queue)

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

    def _loop(self) -> None:
        batch: list[Job] = []
        try:
            while True:
                batch = self._next_batch()
                if batch:
                    self._run(batch)
                    self._tidy_memory()
        except BaseException as exc:  # anything but OOM (handled in _run) leaves the model in doubt
            log.exception("the model thread failed; failing its requests and replacing this worker")
            self._fail_everything(batch, f"{type(exc).__name__}")

    def _fail_everything(self, batch: list[Job], reason: str) -> None:
        """Answer every held request with 503, refuse new ones, and ask for this worker's replacement."""
        with self._cond:
            self.failed = reason
            held = [*batch, *self._queue]
            self._queue.clear()
        _fail_unfinished(held, engine_failed())
        try:
            self._on_fatal()
        except Exception:  # the requests are answered; a failing exit hook must not hide that
            log.exception("could not ask for this worker's replacement")

    def _tidy_memory(self) -> None:
        """Between batches: give cached GPU memory back when the worker holds too much of the GPU."""
        device = str(self._model.device)
        if device.startswith("cuda"):
            try:
                if maybe_empty_cache(cuda_module(), device, self.empty_cache_fraction):
                    self.stats.cache_empties += 1
            except Exception:  # hygiene must never stop the engine
                log.exception("VRAM check failed")

    def _next_batch(self) -> list[Job]:
        with self._cond:
            # Requests that queued up while the model was busy mean load: the clients just served
            # tend to come straight back, so such a batch may wait a moment to fill. A request that
            # finds the model idle never waits, unless others are already being preprocessed.
            under_load = bool(self._queue)
            while not self._queue:
                self._cond.wait()
            deadline = time.monotonic() + self.batch_wait
            while len(self._queue) < self.max_batch and (under_load or self._arriving() > 0):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)  # submit() and nudge() notify
            return self._take()

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
            _finish(job)
        return why is not None

    def _take(self) -> list[Job]:
        now = time.monotonic()
        batch: list[Job] = []
        group: tuple[Any, ...] | None = None
        longest_prompt = longest_new = 0
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if self._expire(job, now):
                continue
            prompt = max(longest_prompt, job.prompt_tokens)
            new = max(longest_new, job.params.max_new_tokens)
            fits = (len(batch) + 1) * (prompt + new) <= self.max_tokens
            if batch and (len(batch) >= self.max_batch or job.group != group or not fits):
                kept.append(job)
                continue
            batch.append(job)
            group, longest_prompt, longest_new = job.group, prompt, new
        self._queue.extendleft(reversed(kept))
        return batch

    def _run(self, batch: list[Job]) -> None:
        import torch

        try:
            self._generate(batch)
        except torch.OutOfMemoryError:
            release_cuda_cache()
            fresh = [job for job in batch if job.generated == 0 and not job.finished]
            if len(batch) > 1 and len(fresh) == len(batch):
                self.stats.oom_splits += 1
                log.warning("out of GPU memory on a batch of %d: retrying in halves", len(batch))
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            log.warning("out of GPU memory on a batch of %d; cache emptied", len(batch))
            _fail_unfinished(
                batch, unavailable("gpu_out_of_memory", "The GPU ran out of memory; retry shortly.", 5)
            )
            return
        self._record(batch)

    def _generate(self, batch: list[Job]) -> None:
        import torch

        model = self._model
        inputs = collate([job.inputs for job in batch], model.pad_id)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        if model.model.dtype.is_floating_point and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.model.dtype)
        params = batch[0].params
        sampling: dict[str, Any] = {"do_sample": params.temperature > 0}
        if params.temperature > 0:
            sampling["temperature"] = params.temperature
            if params.top_p is not None:
                sampling["top_p"] = params.top_p
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)
        longest = max(job.params.max_new_tokens for job in batch)
        if params.min_new_tokens:
            sampling["min_new_tokens"] = min(params.min_new_tokens, longest)
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        with torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            model.model.generate(
                **inputs,
                max_new_tokens=longest,
                eos_token_id=model.stop_ids,
                pad_token_id=model.pad_id,
                streamer=_RowStreamer(batch, set(model.stop_ids)),
                stopping_criteria=_rows_done_criteria(batch, self.stats, self.expire_waiting),
                **sampling,
            )
        for job in batch:
            _finish(job)

    def _record(self, batch: list[Job]) -> None:
        now = time.monotonic()
        stats = self.stats
        stats.completed += len(batch)
        if stats._last_done:
            elapsed = max(now - stats._last_done, 1e-3)
            rate = len(batch) / elapsed
            stats.drain_rate = rate if stats.drain_rate == 0 else 0.8 * stats.drain_rate + 0.2 * rate
        stats._last_done = now
