"""The in-process backend: the model loaded in this worker, fed by the batching engine."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable

from glmvision.backends.engine.client import EnginePool, engine_sockets
from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import QueueEngine, engine_failed
from glmvision.backends.local.holder import ModelHolder
from glmvision.backends.local.kvcache import memory_token_budget
from glmvision.backends.local.loading import is_demo, load_model, load_processor, model_id_for
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.static import StaticEngine
from glmvision.backends.local.vram import cuda_module, memory_report
from glmvision.core.backend import (
    Admission,
    Capabilities,
    GpuMemory,
    Health,
    ModelDescription,
    PreparationSlots,
    ReadyStatus,
    Snapshot,
    Submission,
    Submitted,
    Ticket,
    preparing_slots,
)
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, bad_request
from glmvision.core.generation import GenerationParams, choice_params
from glmvision.core.lora import model_name
from glmvision.postprocess.stream import GenerationStream

log = logging.getLogger("glmvision")


def make_engine(
    loaded: LoadedModel,
    settings: Settings,
    arriving: Callable[[], int] = lambda: 0,
    on_fatal: Callable[[], None] = lambda: None,
) -> QueueEngine:
    """The engine GLMVISION_SCHEDULER names, its KV budget capped by the GPU memory left after loading."""
    budget = min(settings.max_batch_tokens, memory_token_budget(loaded.model, loaded.device))
    if budget < settings.max_batch_tokens:
        log.info("KV-cache budget %d tokens: what the free GPU memory holds", budget)
    if settings.scheduler == "static":
        return StaticEngine(loaded, settings, arriving, on_fatal, token_budget=budget)
    return ContinuousEngine(loaded, settings, arriving, on_fatal, token_budget=budget)


def first_answer(loaded: LoadedModel, engine: QueueEngine, ticket: Ticket) -> None:
    """Answer one tiny image request (in this worker or an engine process) before reporting ready."""
    # The first decode, preprocess and generate import modules and initialise kernels, holding
    # the GIL for a few hundred milliseconds; under a burst every request waited behind that.
    from PIL import Image

    Image.init()
    image = Image.new("RGB", (56, 56), (128, 128, 128))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}
    ]
    params = GenerationParams(max_new_tokens=2, temperature=0.0)
    engine.warm_up(loaded.prepare(messages, enable_thinking=False), params, ticket)


def engine_paths(settings: Settings) -> list[str]:
    """The engine processes' sockets this worker sends to; none with GLMVISION_ENGINE=thread or outside
    glmvision's gunicorn (then the model loads in this process)."""
    return engine_sockets() if settings.engine == "process" else []


def image_cache_events(loaded: LoadedModel) -> tuple[tuple[str, int], ...]:
    """This worker's image cache (the processor's output) counters, named as the engine's caches'."""
    stats = loaded.image_cache_stats()
    return tuple((f"image_{name}", stats[name]) for name in ("hits", "misses", "evictions"))


def image_cache_counters(loaded: LoadedModel) -> dict[str, int]:
    """This worker's image cache, for /readyz."""
    return {f"image_cache_{name}": value for name, value in loaded.image_cache_stats().items()}


def merged_counters(reports: list[dict[str, float | int | str]]) -> dict[str, float | int | str]:
    """The engines' counters as one engine's: numbers summed (the largest batch: the largest), text
    from the first; this worker's own `completed` replaces theirs."""
    merged: dict[str, float | int | str] = {}
    for counters in reports:
        for key, value in counters.items():
            before = merged.get(key)
            if isinstance(value, str) or before is None or isinstance(before, str):
                merged.setdefault(key, value)
            elif key == "largest_batch":
                merged[key] = max(before, value)
            else:
                merged[key] = round(before + value, 2)
    return merged


class LocalBackend:
    """GLM-4.6V-Flash in this process: lazily loaded, one engine thread, admission in front."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._adapters = tuple(settings.lora_adapters)
        self.engine: QueueEngine | None = None
        # GLMVISION_ENGINE=process: the engine processes' request side; this worker holds no weights.
        self.remote: EnginePool | None = None
        self.holder = ModelHolder(settings, self._load)
        self.admission = Admission(
            settings.admission_capacity,
            settings.request_timeout,
            self._drain_rate,
            self._abandoned,
            PreparationSlots(preparing_slots(settings.max_batch_size), self._queued, settings.max_batch_size),
        )
        # What to do when the model thread fails: gunicorn's post_worker_init sets "exit this worker".
        self.on_fatal: Callable[[], None] = lambda: None
        self.on_batch: Callable[[int], None] = lambda rows: None

    def _load(self, settings: Settings) -> LoadedModel:
        paths = engine_paths(settings)
        if settings.engine == "process" and not paths:
            # No engine processes: not served by glmvision's gunicorn config (flask run, a test client).
            log.info("no engine processes to talk to: the model loads in this process")
        if paths:
            loaded = load_processor(settings)
            self.remote = EnginePool(paths, loaded, lambda rows: self.on_batch(rows), settings.load_timeout)
            self.remote.start()
            gc.collect()
            gc.freeze()
            return loaded
        loaded = load_model(settings)
        engine = make_engine(
            loaded, settings, arriving=lambda: self.admission.preparing, on_fatal=lambda: self.on_fatal()
        )
        self._first_answer(loaded, engine)
        engine.on_batch = lambda rows: self.on_batch(rows)  # after the warm-up, which metrics forget
        self.engine = engine
        # torch and transformers leave ~450k long-lived objects behind; a full collection walking
        # them holds the GIL for ~0.3 s, stalling probes and refusals. They live as long as the worker.
        gc.collect()
        gc.freeze()
        return loaded

    def _first_answer(self, loaded: LoadedModel, engine: QueueEngine) -> None:
        """Answer one tiny request before reporting ready, so no client pays for first-call set-up."""
        ticket = self.admission.admit()
        try:
            first_answer(loaded, engine, ticket)
        finally:
            ticket.release()

    def _abandoned(self) -> None:
        if self.engine is not None:
            self.engine.nudge()  # a batch waiting for this request need not wait any longer

    def _queued(self) -> int:
        if self.remote is not None:
            return self.remote.queued()
        return self.engine.queued() if self.engine is not None else 0

    def _drain_rate(self) -> float:
        if self.remote is not None:
            return self.remote.drain_rate()
        return self.engine.stats.drain_rate if self.engine is not None else 0.0

    # What it serves, and how it is.

    def capabilities(self) -> Capabilities:
        loaded = self.holder.loaded
        names = (model_id_for(self.settings.model, self.settings.model_id), *self.settings.model_aliases)
        if loaded is None:
            model = ModelDescription(names[0], is_demo(self.settings.model), None, None)
            return Capabilities(names, model, self._adapters)
        model = ModelDescription(loaded.model_id, loaded.demo, self._device(loaded), loaded.dtype)
        revision = f"{loaded.model_id}@{loaded.revision}:{loaded.dtype}"
        return Capabilities(names, model, self._adapters, loaded.fit_image, revision)

    def health(self, probe: bool = True) -> Health:
        loaded, engine, holder = self.holder.loaded, self.engine, self.holder
        occupancy = self.admission.active / self.admission.capacity
        if loaded is not None and self.remote is not None:
            return self._remote_health(loaded, self.remote, occupancy)
        if loaded is None or engine is None:
            status: ReadyStatus = "failed" if holder.error else "not_loaded"
            if holder.loading:
                status = "loading"
            gauges = Snapshot(loaded=False, active=self.admission.active)
            return Health(False, status, occupancy=occupancy, gauges=gauges)
        model = ModelDescription(loaded.model_id, loaded.demo, loaded.device, loaded.dtype)
        counters = {
            "queued": engine.queued(),
            **engine.stats.as_dict(),
            **self.admission.as_dict(),
            **image_cache_counters(loaded),
        }
        failed = engine.failed
        if failed is not None:
            counters["error"] = failed
        return Health(
            failed is None,
            "ready" if failed is None else "unhealthy",
            model,
            counters,
            occupancy,
            self._gauges(loaded, engine, probe),
            self._gpu_peak(loaded),
            engine.stalled_for(time.monotonic()) if failed is None else 0.0,
        )

    def _device(self, loaded: LoadedModel) -> str:
        """Where the model runs: the first engine process's device, or this process's."""
        reports = [engine.report for engine in self.remote.engines] if self.remote is not None else []
        return next((report.device for report in reports if report is not None), loaded.device)

    def _remote_health(self, loaded: LoadedModel, pool: EnginePool, occupancy: float) -> Health:
        """The engine processes' state, from their last health reports (the I/O threads refresh them)."""
        counters: dict[str, int | float | str] = {
            "mode": "process",
            "worker_pid": os.getpid(),
            "worker_weights": int(bool(getattr(loaded.model, "weights", True))),
            "queued": pool.queued(),
            **merged_counters([engine.report.counters for engine in pool.engines if engine.report]),
            "completed": sum(engine.completed for engine in pool.engines),
            "engine_lost": sum(engine.lost for engine in pool.engines),
            **self.admission.as_dict(),
            **image_cache_counters(loaded),
        }
        engines: list[dict[str, object]] = []
        states: list[str] = []
        gpus: list[GpuMemory] = []
        for engine in pool.engines:
            report = engine.report
            state = "loading" if report is None else report.state if engine.reachable else "unreachable"
            states.append(state)
            if report is None:
                engines.append({"device": None, "pid": None, "model": None, "queue": 0, "state": state})
                continue
            engines.append(
                {
                    "device": report.device,
                    "pid": report.pid,
                    "model": report.model_id,
                    "queue": report.queue_depth,
                    "running": report.running,
                    "state": state,
                    "full": report.full,
                    "stalled_s": report.stalled_s,
                    **({"gpu_allocated": report.gpu[0]} if report.gpu is not None else {}),
                    "counters": dict(report.counters),
                }
            )
            if report.gpu is not None:
                gpus.append(GpuMemory(report.device, *report.gpu))
        ready = pool.ready
        waiting, generating = pool.mine()  # this worker's share: the workers' gauges sum to the engines'
        gauges = Snapshot(
            loaded=ready,
            queued=waiting,
            running=generating,
            active=self.admission.active,
            cache_empties=pool.cache_empties(),
            cache_events=(*pool.cache_events().items(), *image_cache_events(loaded)),
            cache_bytes=(*pool.cache_bytes().items(), ("image", loaded.image_cache_stats()["bytes"])),
            caches_shared=True,
            gpus=tuple(gpus),
        )
        loading = "loading" in states
        status: ReadyStatus = "ready" if ready else ("loading" if loading else "unhealthy")
        model = ModelDescription(loaded.model_id, loaded.demo, self._device(loaded), loaded.dtype)
        return Health(
            ready, status, model if ready else None, counters, occupancy, gauges, engines=tuple(engines)
        )

    def _gauges(self, loaded: LoadedModel, engine: QueueEngine, probe: bool) -> Snapshot:
        gpus: tuple[GpuMemory, ...] = ()
        if probe and loaded.device.startswith("cuda"):
            try:
                report = memory_report(cuda_module(), loaded.device)
            except Exception:  # a metrics scrape must never fail on a CUDA hiccup
                log.exception("reading GPU memory failed")
                report = None
            if report is not None:
                gpus = (GpuMemory(loaded.device, *report),)
        return Snapshot(
            loaded=True,
            queued=engine.queued(),
            running=engine.running(),
            active=self.admission.active,
            cache_empties=engine.stats.cache_empties,
            cache_events=(*engine.stats.cache_events().items(), *image_cache_events(loaded)),
            cache_bytes=(*engine.stats.cache_bytes().items(), ("image", loaded.image_cache_stats()["bytes"])),
            gpus=gpus,
        )

    def _gpu_peak(self, loaded: LoadedModel) -> int | None:
        if not loaded.device.startswith("cuda"):
            return None
        try:
            return int(cuda_module().max_memory_allocated(loaded.device))
        except Exception:  # the log line goes without it rather than the request failing
            log.debug("reading the GPU memory peak failed", exc_info=True)
            return None

    # Lifecycle.

    def warm_up(self) -> None:
        if engine_paths(self.settings):
            # Only the processor: seconds, done before this worker accepts a connection. In the
            # background it would load while request threads answer a storm of retries, which
            # starve it of the GIL (the engine's load, in its own process, does not wait on it).
            thread = self.holder.warm_up()
            thread.join(timeout=self.settings.load_timeout)
            return
        self.holder.warm_up()

    def stall(self, seconds: float) -> None:
        if self.engine is not None:
            self.engine.stall(seconds)

    # Requests.

    def admit(self) -> Ticket:
        if self.engine is not None and self.engine.failed is not None:
            raise engine_failed()
        return self.admission.admit(engines_full=self.remote is not None and self.remote.full)

    def submit(self, submission: Submission, ticket: Ticket) -> Submitted:
        params, param = submission.params, submission.param
        loaded = self.holder.get(timeout=min(self.settings.load_timeout, ticket.remaining()))
        constraint = None
        if params.constraint is not None:  # compiled before queueing: a bad schema is the client's 400
            grammars = loaded.grammars()
            constraint = grammars.cached(params.constraint)
            if constraint is None:
                # In compiler processes, within GLMVISION_GRAMMAR_TIMEOUT; a hang-up or the deadline
                # ends it. Meanwhile other requests may prepare: this one only waits.
                with ticket.slot_lent():
                    constraint = grammars.compile(params.constraint, ticket.deadline, ticket.client_gone)
        if params.logprobs is not None and self.settings.scheduler == "static":
            message = "logprobs need GLMVISION_SCHEDULER=continuous (static's generate() gives none)."
            raise bad_request("unsupported_parameter", message, "logprobs")
        inputs = loaded.prepare(submission.messages, params.enable_thinking, param, params.tools)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        self._check_prompt_tokens(prompt_tokens, loaded, params, param)
        if submission.on_prompt is not None:
            submission.on_prompt(prompt_tokens)
        sizes, visual = loaded.image_sizes(inputs), loaded.visual_tokens(inputs)
        prepared_at = time.perf_counter()
        choices = choice_params(params, submission.n)
        # One ticket per choice: the request's place goes back when its last choice ends.
        tickets = ticket.split(len(choices)) if len(choices) > 1 else [ticket]
        if self.remote is not None:
            grammar = constraint.serialized if constraint is not None else None
            # Each choice its own message: those after the first find its prompt in the prefix cache.
            streams: list[GenerationStream] = []
            try:
                for choice, part in zip(choices, tickets, strict=True):
                    streams.append(self.remote.submit(inputs, choice, part, grammar))
            except BaseException:
                for sent in streams:
                    sent.close()
                raise
        elif self.engine is None:
            raise APIError(503, "model_loading", "The model is still loading; retry shortly.", retry_after=10)
        else:
            streams = self.engine.submit_choices(inputs, choices, tickets, constraint)
        self.admission.submitted(ticket)
        for stream in streams:
            stream.image_tokens = visual
        name = model_name(loaded.model_id, params.adapter)
        return Submitted(streams[0], name, sizes, visual, prepared_at, tuple(streams[1:]))

    def _check_prompt_tokens(
        self, tokens: int, loaded: LoadedModel, params: GenerationParams, param: str
    ) -> None:
        """Refuse a prompt (after the chat template, image tokens included) that leaves no room to answer."""
        room = loaded.context_tokens - params.max_new_tokens
        limit = min(self.settings.max_prompt_tokens or room, room)
        if tokens > limit:
            where = "messages" if param == "messages" else "prompt"
            message = (
                f"The prompt is {tokens} tokens (after the chat template, images included); at most "
                f"{limit} are accepted with max_tokens {params.max_new_tokens} "
                f"(the model's context is {loaded.context_tokens} tokens)."
            )
            raise APIError(400, "prompt_too_long", message, where)
