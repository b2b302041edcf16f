"""Prometheus metrics: `GET /metrics`, right across gunicorn workers (prometheus-client's multiprocess mode).

Under gunicorn, deploy/gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
any worker starts: each worker writes its values there and a scrape of any worker sums them all.
Gauges that only a worker knows (its queue, its GPU memory) are sampled by each worker every few
seconds, and by the scraped worker at the scrape itself.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Flask, Response, request

from glmvision.core.backend import Backend
from glmvision.core.config import Settings
from glmvision.core.errors import ERRORS, APIError
from glmvision.ops.record import RequestRecord

log = logging.getLogger("glmvision")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL = 5.0  # seconds between a worker's gauge samples
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PIXELS = (1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 8e6, 1.6e7, 5e7)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# Why a request was refused, from its error code (every other 4xx/5xx is not a refusal).
REJECTION_REASONS: dict[str, str] = {code: spec.rejection for code, spec in ERRORS.items() if spec.rejection}


class Metrics:
    """The service's metric objects and the /metrics rendering (an extension: `init_app`)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # A registry per app, so that tests building many apps never register a name twice.
        self.registry = CollectorRegistry(auto_describe=True)
        reg = {"registry": self.registry}
        self.requests = Counter(
            "glmvision_requests", "Requests answered.", ["route", "method", "status", "code"], **reg
        )
        self.duration = Histogram(
            "glmvision_request_duration_seconds",
            "Time from arrival to the last byte.",
            ["route"],
            buckets=_LATENCY,
            **reg,
        )
        self.queue_wait = Histogram(
            "glmvision_queue_wait_seconds",
            "Time queued for the model (submit to first model call).",
            buckets=_LATENCY,
            **reg,
        )
        self.preprocess = Histogram(
            "glmvision_preprocess_seconds",
            "Image decoding and the processor, per request.",
            buckets=_LATENCY,
            **reg,
        )
        self.generation = Histogram(
            "glmvision_generation_seconds",
            "First model call to the last token, per request.",
            buckets=_LATENCY,
            **reg,
        )
        self.first_token = Histogram(
            "glmvision_time_to_first_token_seconds",
            "Arrival to the first token, streamed requests.",
            buckets=_LATENCY,
            **reg,
        )
        self.batch_size = Histogram(
            "glmvision_batch_size", "Rows in each model call (prefill or decode step).", buckets=_BATCH, **reg
        )
        self.prompt_tokens = Counter("glmvision_prompt_tokens", "Prompt tokens, images included.", **reg)
        self.visual_tokens = Counter("glmvision_visual_tokens", "Prompt tokens that stand for images.", **reg)
        self.completion_tokens = Counter("glmvision_completion_tokens", "Generated tokens.", **reg)
        self.image_pixels = Histogram(
            "glmvision_image_pixels",
            "Pixels per image as sent (input) and after resizing (resized).",
            ["stage"],
            buckets=_PIXELS,
            **reg,
        )
        self.rejections = Counter("glmvision_rejections", "Requests refused, by reason.", ["reason"], **reg)
        self.cache_hits = Counter("glmvision_cache_hits", "Answers served from the response cache.", **reg)
        self.cache_misses = Counter("glmvision_cache_misses", "Cacheable requests not in the cache.", **reg)
        self.degraded = Counter("glmvision_degraded", "Requests served degraded (deep queue).", **reg)
        self.fallbacks = Counter("glmvision_fallbacks", "Fallback messages sent instead of a 503.", **reg)
        self.circuit_trips = Counter("glmvision_circuit_trips", "Client circuits opened.", **reg)
        self.model_cache_lookups = Counter(
            "glmvision_model_cache_lookups",
            "Lookups in the prefix cache (a cached prompt start), the encoder cache (an image's "
            "embeddings) and each worker's image cache (the processor's output).",
            ["cache", "result"],
            **reg,
        )
        self.model_cache_evictions = Counter(
            "glmvision_model_cache_evictions", "Entries a model cache dropped for room.", ["cache"], **reg
        )
        self.prefix_reused_tokens = Counter(
            "glmvision_prefix_cache_reused_tokens",
            "Prompt tokens whose KV came from the prefix cache.",
            **reg,
        )
        self.redactions = Counter("glmvision_redactions", "Masked matches in answers.", ["kind"], **reg)
        self.empty_cache = Counter("glmvision_gpu_empty_cache", "torch.cuda.empty_cache() calls.", **reg)
        self.moderation_checks = Counter(
            "glmvision_moderation_checks", "Content moderation checks made.", ["stage"], **reg
        )
        self.moderation_flags = Counter(
            "glmvision_moderation_flags", "Content moderation checks that flagged the text.", ["stage"], **reg
        )
        self.moderation_failures = Counter(
            "glmvision_moderation_failures",
            "Content moderation checks that failed (timeout, refused, bad reply).",
            ["stage"],
            **reg,
        )
        self.upstream_failures = Counter(
            "glmvision_upstream_failures",
            "Requests the upstream engine failed or refused, by our error code (GLMVISION_BACKEND=openai).",
            ["code"],
            **reg,
        )
        # Named keys only (a TOML keys file), by name: a plain key is never a label.
        self.key_requests = Counter(
            "glmvision_key_requests",
            "Requests per named API key, by status class.",
            ["key", "outcome"],
            **reg,
        )
        self.key_tokens = Counter(
            "glmvision_key_tokens",
            "Tokens per named API key: prompt, completion and image (prompt tokens standing for images).",
            ["key", "kind"],
            **reg,
        )
        self._declare_gauges(reg)
        self._empties_seen = 0
        self._failures_seen: dict[str, int] = {}
        self._cache_events_seen: dict[str, int] = {}
        self._info_labels: tuple[str, ...] | None = None
        self._sample_lock = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def _declare_gauges(self, reg: dict[str, Any]) -> None:
        """The sampled gauges: per worker while it lives (model, GPU), or summed over workers (load)."""
        from prometheus_client import Gauge

        live: dict[str, Any] = {"multiprocess_mode": "liveall", **reg}
        total: dict[str, Any] = {"multiprocess_mode": "livesum", **reg}
        self.model_loaded = Gauge("glmvision_model_loaded", "1 once this worker's model is loaded.", **live)
        self.model_info = Gauge(
            "glmvision_model_info",
            "The served model (value 1).",
            ["model", "revision", "device", "dtype", "demo"],
            **live,
        )
        self.gpu_allocated = Gauge(
            "glmvision_gpu_memory_allocated_bytes", "GPU memory allocated by tensors.", ["device"], **live
        )
        self.gpu_reserved = Gauge(
            "glmvision_gpu_memory_reserved_bytes", "GPU memory held by torch's allocator.", ["device"], **live
        )
        self.gpu_total = Gauge("glmvision_gpu_memory_total_bytes", "GPU memory in all.", ["device"], **live)
        # Every worker reports the same engine processes' caches: the largest report is their total.
        self.model_cache_bytes = Gauge(
            "glmvision_model_cache_bytes",
            "Bytes a model cache holds (with GLMVISION_ENGINE=thread, the fullest worker's).",
            ["cache"],
            multiprocess_mode="livemax",
            **reg,
        )
        self.image_cache_bytes = Gauge(
            "glmvision_image_cache_bytes", "Bytes the workers' image caches hold.", **total
        )
        self.queue_depth = Gauge("glmvision_queue_depth", "Requests waiting for the model.", **total)
        self.running = Gauge("glmvision_running_requests", "Requests being generated for.", **total)
        self.active = Gauge(
            "glmvision_active_requests", "Requests admitted (preparing, queued, running).", **total
        )

    def init_app(self, app: Flask, backend: Backend, settings: Settings) -> None:
        """Serve /metrics, count every request, sample gauges; the backend reports its batch sizes."""
        self._backend = backend
        self._key = settings.metrics_key.get_secret_value()
        backend.on_batch = self.batch_size.observe
        ops = Blueprint("ops", __name__)  # one per app: its view serves this instance, found by no lookup
        ops.add_url_rule("/metrics", "metrics", self.serve, methods=["GET"])
        app.register_blueprint(ops)

    def serve(self) -> Response:
        """Prometheus text format; with GLMVISION_METRICS_KEY set, only for that bearer key."""
        _check_metrics_key(self._key)
        started = time.perf_counter()
        self.sample()
        body = self.render()
        log.debug("metrics rendered in %.1f ms", (time.perf_counter() - started) * 1000)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(body, mimetype=None, content_type=CONTENT_TYPE_LATEST)

    # Per request.

    def _observe_key(self, key: str, record: RequestRecord) -> None:
        self.key_requests.labels(key, "error" if record.status >= 400 else "ok").inc()
        for kind, value in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("image", record.visual_tokens),
        ):
            if value:
                self.key_tokens.labels(key, kind).inc(value)

    def observe(self, record: RequestRecord, total_s: float) -> None:
        """Count one finished request from its record."""
        code = record.code or "none"
        self.requests.labels(record.route, record.method, str(record.status), code).inc()
        self.duration.labels(record.route).observe(total_s)
        reason = REJECTION_REASONS.get(record.code or "")
        if reason is not None:
            self.rejections.labels(reason).inc()
        for value, histogram in (
            (record.queue_s, self.queue_wait),
            (record.preprocess_s, self.preprocess),
            (record.generate_s, self.generation),
        ):
            if value is not None:
                histogram.observe(value)
        if record.stream and record.first_token_s is not None:
            self.first_token.observe(record.first_token_s)
        modelled = record.cache != "hit" and not record.fallback  # tokens the model itself processed
        for value, counter in (
            (record.prompt_tokens, self.prompt_tokens),
            (record.visual_tokens, self.visual_tokens),
            (record.completion_tokens, self.completion_tokens),
        ):
            if value and modelled:
                counter.inc(value)
        for image in record.images:
            self.image_pixels.labels("input").observe(image.width * image.height)
            self.image_pixels.labels("resized").observe(image.resized_width * image.resized_height)
        if record.cache == "hit":
            self.cache_hits.inc()
        elif record.cache == "miss":
            self.cache_misses.inc()
        if record.degraded:
            self.degraded.inc()
        if record.fallback:
            self.fallbacks.inc()
        if record.key_name is not None:
            self._observe_key(record.key_name, record)
        for kind, count in record.redactions.items():
            self.redactions.labels(kind).inc(count)
        if record.circuit_tripped:
            self.circuit_trips.inc()
        for stage, outcome in record.moderation:
            self.moderation_checks.labels(stage).inc()
            if outcome == "flagged":
                self.moderation_flags.labels(stage).inc()
            elif outcome == "failed":
                self.moderation_failures.labels(stage).inc()

    # Gauges.

    def sample(self) -> None:
        """Read the backend's gauges into this worker's series."""
        with self._sample_lock:
            snap = self._backend.health().gauges
            self.model_loaded.set(1 if snap.loaded else 0)
            self.queue_depth.set(snap.queued)
            self.running.set(snap.running)
            self.active.set(snap.active)
            if snap.cache_empties > self._empties_seen:
                self.empty_cache.inc(snap.cache_empties - self._empties_seen)
                self._empties_seen = snap.cache_empties
            for code, count in snap.upstream_failures:
                seen = self._failures_seen.get(code, 0)
                if count > seen:
                    self.upstream_failures.labels(code).inc(count - seen)
                    self._failures_seen[code] = count
            for name, count in snap.cache_events:
                seen = self._cache_events_seen.get(name, 0)
                if count > seen:
                    self._count_cache_event(name, count - seen)
                    self._cache_events_seen[name] = count
            for cache, size in snap.cache_bytes:
                if cache == "image":  # each worker's own
                    self.image_cache_bytes.set(size)
                else:
                    self.model_cache_bytes.labels(cache).set(size)
            for gpu in snap.gpus:
                self.gpu_allocated.labels(gpu.device).set(gpu.allocated)
                self.gpu_reserved.labels(gpu.device).set(gpu.reserved)
                self.gpu_total.labels(gpu.device).set(gpu.total)
            if snap.loaded and self._info_labels is None:
                capabilities = self._backend.capabilities()
                card = capabilities.model
                labels = (
                    str(card.id),
                    str(capabilities.revision or ""),
                    str(card.device),
                    str(card.dtype),
                    "true" if card.demo else "false",
                )
                self.model_info.labels(*labels).set(1)
                self._info_labels = labels

    def _count_cache_event(self, name: str, count: int) -> None:
        cache, _, event = name.partition("_")
        if event == "hits":
            self.model_cache_lookups.labels(cache, "hit").inc(count)
        elif event == "misses":
            self.model_cache_lookups.labels(cache, "miss").inc(count)
        elif event == "evictions":
            self.model_cache_evictions.labels(cache).inc(count)
        elif name == "prefix_reused_tokens":
            self.prefix_reused_tokens.inc(count)

    def start_sampler(self) -> None:
        """Sample gauges every few seconds in a daemon thread (once per worker)."""
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_loop, name="glmvision-metrics", daemon=True)
            self._sampler.start()

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                self.sample()
            except Exception:  # a failed sample must not end the sampling
                log.exception("sampling metrics failed")

    def render(self) -> bytes:
        """The exposition text: every worker's series in multiprocess mode, else this app's."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def names(self) -> Iterable[str]:
        """Every series name this app can export, with their suffixes (for the dashboard's test)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        for family in self.registry.collect():
            for suffix in suffixes.get(family.type, ("",)):
                yield family.name + suffix


def _check_metrics_key(key: str) -> None:
    if not key:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing_api_key", "GET /metrics needs its key (Authorization: Bearer <key>).")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid_api_key", "The metrics key is not valid.")
