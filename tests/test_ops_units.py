"""Units of the operations parts: request ids, the record's log fields, the watchdog, fixed answers,
the breaker's view of outcomes, and the metrics' reasons for refusals."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask

from glmvision.core.backend import Capabilities, GpuMemory, Health, ModelDescription, Snapshot
from glmvision.core.generation import Delta, Generation
from glmvision.ops.metrics import REJECTION_REASONS, Metrics
from glmvision.ops.record import ImageStat, RequestRecord, request_id_from
from glmvision.ops.reqlog import key_id
from glmvision.ops.watchdog import Watchdog
from glmvision.postprocess.stream import FixedStream


@pytest.mark.parametrize("given", ["abc", "a" * 128, "req-1.2_3:4@x/y+z=", "0"])
def test_a_tame_request_id_is_kept(given: str) -> None:
    assert request_id_from(given) == given


@pytest.mark.parametrize("given", [None, "", "a" * 129, "has space", 'quote"', "new\nline", "ünïcode", "{x}"])
def test_anything_else_gets_a_fresh_id(given: str | None) -> None:
    fresh = request_id_from(given)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    assert fresh != request_id_from(given)  # fresh each time


def test_key_ids_are_short_stable_and_not_the_key() -> None:
    assert key_id("secret") == key_id("secret")
    assert key_id("secret") != key_id("secreT")
    assert re.fullmatch(r"[0-9a-f]{12}", key_id("secret"))
    assert "secret" not in key_id("secret")


def test_log_fields_are_named_as_documented() -> None:
    record = RequestRecord("r1", "POST", "/v1/chat/vision", "10.0.0.1", status=200, key_id="k", code="x")
    record.images.append(ImageStat(1, 1, 1, 1))
    record.prompt_tokens = record.visual_tokens = record.completion_tokens = 1
    record.finish_reason, record.cache, record.degraded, record.fallback = "stop", "hit", True, True
    record.preprocess_s = record.queue_s = record.generate_s = record.first_token_s = 0.001
    record.gpu_peak_bytes = 1
    assert list(record.log_fields(0.1)) == [
        "request_id", "method", "route", "status", "code", "key_id", "client", "stream", "images",
        "prompt_tokens", "visual_tokens", "completion_tokens", "finish_reason", "cache", "degraded",
        "fallback", "preprocess_ms", "queue_ms", "generate_ms", "first_token_ms", "total_ms",
        "gpu_peak_bytes",
    ]  # fmt: skip


def test_log_fields_leave_out_what_is_absent_and_round_milliseconds() -> None:
    record = RequestRecord("r1", "POST", "/v1/chat/vision", "10.0.0.1")
    record.status, record.queue_s, record.preprocess_s = 200, 0.0123456, None
    record.images.append(ImageStat(640, 480, 644, 476))
    fields = record.log_fields(0.5)
    assert fields["queue_ms"] == 12.35 and fields["total_ms"] == 500.0
    assert "preprocess_ms" not in fields and "code" not in fields and "degraded" not in fields
    assert fields["images"] == [{"width": 640, "height": 480, "resized_width": 644, "resized_height": 476}]
    record.degraded = True
    assert record.log_fields(0.5)["degraded"] is True


def test_a_fixed_stream_gives_one_delta_and_its_answer() -> None:
    answer = Generation("the text", "why", 10, 4, "stop")
    stream = FixedStream(answer)
    assert stream.result is None
    assert list(stream) == [Delta("why", "the text")]
    assert stream.result == answer
    assert FixedStream(answer).whole() == answer
    assert list(FixedStream(Generation("", None, 0, 0, "stop"))) == []


@dataclass
class StallingBackend:
    """A backend stand-in whose stall time the test sets."""

    stalled: float = 0.0
    stalls: list[float] = field(default_factory=list)

    def health(self, probe: bool = True) -> Health:
        return Health(True, "ready", stalled_s=self.stalled)

    def stall(self, seconds: float) -> None:
        self.stalls.append(seconds)


def test_the_watchdog_fires_once_at_the_stall_limit() -> None:
    backend = StallingBackend()
    watchdog = Watchdog(10.0, backend)  # type: ignore[arg-type]
    backend.stalled = 9.99
    assert watchdog.check() is False and backend.stalls == []
    backend.stalled = 10.0
    assert watchdog.check() is True and backend.stalls == [10.0]
    assert watchdog.check() is True and backend.stalls == [10.0]  # once only
    assert watchdog.interval == 2.5  # a quarter of the limit
    assert Watchdog(120.0, backend).interval == 5.0  # type: ignore[arg-type]
    assert Watchdog(0.2, backend).interval == 0.1  # type: ignore[arg-type]


def test_a_watchdog_at_zero_never_starts() -> None:
    watchdog = Watchdog(0.0, StallingBackend())  # type: ignore[arg-type]
    watchdog.start()
    assert watchdog._thread is None


def test_every_rejection_reason_of_the_issue_has_codes() -> None:
    reasons = set(REJECTION_REASONS.values())
    wanted = {
        "auth",
        "rate_limit",
        "overload",
        "too_large",
        "bad_image",
        "url_blocked",
        "allowlist",
        "circuit_open",
        "quota",  # a named key over its quota (the keys file's TOML form)
    }
    assert reasons == wanted


def test_metrics_count_a_record() -> None:
    metrics = Metrics()
    record = RequestRecord("r1", "POST", "/v1/chat/vision", "10.0.0.1")
    record.status, record.code = 429, "circuit_open"
    metrics.observe(record, 0.01)
    record2 = RequestRecord("r2", "POST", "/v1/chat/vision", "10.0.0.1", status=200)
    record2.prompt_tokens, record2.completion_tokens, record2.cache = 30, 5, "miss"
    record2.stream, record2.first_token_s = True, 0.2
    metrics.observe(record2, 0.3)
    value = metrics.registry.get_sample_value
    assert value("glmvision_rejections_total", {"reason": "circuit_open"}) == 1
    labels = {"route": "/v1/chat/vision", "method": "POST", "status": "200", "code": "none"}
    assert value("glmvision_requests_total", labels) == 1
    assert value("glmvision_prompt_tokens_total") == 30
    assert value("glmvision_completion_tokens_total") == 5
    assert value("glmvision_cache_misses_total") == 1 and value("glmvision_cache_hits_total") == 0
    hit = RequestRecord("r3", "POST", "/v1/chat/vision", "10.0.0.1", status=200, cache="hit")
    hit.prompt_tokens, hit.completion_tokens = 30, 5
    metrics.observe(hit, 0.001)
    assert value("glmvision_cache_hits_total") == 1
    assert value("glmvision_completion_tokens_total") == 5  # a hit's tokens were not generated again
    assert value("glmvision_time_to_first_token_seconds_count") == 1
    duration = value("glmvision_request_duration_seconds_sum", {"route": "/v1/chat/vision"})
    assert duration == pytest.approx(0.311)


def test_an_answer_streams_redacted_text_and_counts_the_matches() -> None:
    from glmvision.core.config import load_settings
    from glmvision.postprocess.redact import Redactor
    from glmvision.serving.pipeline import Answer

    card = "4111 1111 1111 1111"
    raw = Generation(f"pay with {card} now", f"the card is {card}", 9, 7, "stop")
    record = RequestRecord("r", "POST", "/v1/chat/completions", None)
    done: list[Generation] = []
    answer = Answer(
        "m", FixedStream(raw), 0.0, record=record, redactor=Redactor(["bank_card"]), on_done=done.append
    )
    deltas = list(answer.deltas(load_settings()))
    assert "".join(d.content for d in deltas) == "pay with **** **** **** 1111 now"
    assert "".join(d.reasoning for d in deltas) == "the card is **** **** **** 1111"
    assert answer.result.text == "pay with **** **** **** 1111 now"
    assert done == [raw]  # the cache keeps the answer itself; redaction is applied on the way out
    assert record.redactions == {"bank_card": 1}
    assert record.completion_tokens == 7 and record.finish_reason == "stop"


@dataclass
class GaugeBackend:
    """A backend stand-in whose snapshot the test sets (GPU memory cannot be had on CPU)."""

    snap: Snapshot
    on_batch: Any = None

    def health(self, probe: bool = True) -> Health:
        return Health(self.snap.loaded, "ready" if self.snap.loaded else "loading", gauges=self.snap)

    def capabilities(self) -> Capabilities:
        model = ModelDescription("glm-4.6v-flash", False, "cuda:0", "bfloat16")
        return Capabilities(("glm-4.6v-flash",), model, (), revision="abc123")


def test_gauges_follow_the_backend_and_empty_cache_calls_count_once() -> None:
    from glmvision.core.config import load_settings

    metrics = Metrics()
    backend = GaugeBackend(Snapshot(loaded=False, active=3))
    metrics.init_app(Flask(__name__), backend, load_settings())  # type: ignore[arg-type]
    value = metrics.registry.get_sample_value
    metrics.sample()
    assert value("glmvision_model_loaded") == 0 and value("glmvision_active_requests") == 3
    assert value("glmvision_model_info", {"model": "glm-4.6v-flash"}) is None  # not before it loads
    gpu = GpuMemory("cuda:0", allocated=5 << 30, reserved=6 << 30, total=80 << 30)
    backend.snap = Snapshot(loaded=True, queued=4, running=8, active=12, cache_empties=2, gpus=(gpu,))
    metrics.sample()
    assert value("glmvision_model_loaded") == 1
    assert (value("glmvision_queue_depth"), value("glmvision_running_requests")) == (4, 8)
    assert value("glmvision_gpu_memory_allocated_bytes", {"device": "cuda:0"}) == 5 << 30
    assert value("glmvision_gpu_memory_reserved_bytes", {"device": "cuda:0"}) == 6 << 30
    assert value("glmvision_gpu_memory_total_bytes", {"device": "cuda:0"}) == 80 << 30
    assert value("glmvision_gpu_empty_cache_total") == 2
    labels = {"model": "glm-4.6v-flash", "revision": "abc123", "device": "cuda:0", "dtype": "bfloat16"}
    assert value("glmvision_model_info", {**labels, "demo": "false"}) == 1
    metrics.sample()  # the same two calls again: not counted twice
    backend.snap = Snapshot(loaded=True, cache_empties=3)
    metrics.sample()
    assert value("glmvision_gpu_empty_cache_total") == 3
    assert backend.on_batch == metrics.batch_size.observe  # the engine reports batch sizes to it


def test_only_the_clients_own_timeouts_count_for_the_breaker() -> None:
    from glmvision.ops.breaker import CircuitBreaker
    from glmvision.serving.service import record_outcome

    breaker = CircuitBreaker(2, 60.0)
    state = type("State", (), {"breaker": breaker})()

    def outcome(code: str | None, finish: str | None = None) -> None:
        record = RequestRecord("r", "POST", "/v1/chat/vision", "10.0.0.1", code=code, finish_reason=finish)
        record.breaker_client = "ip:10.0.0.1"
        record_outcome(state, record)  # type: ignore[arg-type]

    for _ in range(5):
        outcome("queue_timeout")  # the server's overload: never held against the client
    assert breaker.retry_after("ip:10.0.0.1") is None
    outcome("request_timeout")
    outcome("request_timeout")
    assert breaker.retry_after("ip:10.0.0.1") is not None
