"""Operations through the real app on the demo model: /metrics, the request log, the response cache,
degradation, the fallback message, redaction, the allowlist, trusted proxies and the circuit breaker.
(Under real gunicorn with several workers and Redis: tests/test_ops_gunicorn.py.)"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import image_b64, vision_body, wait_for

from glmvision.serving.cache import CachedAnswer
from glmvision.web.state import app_state

VISION = "/v1/chat/vision"
CHAT = "/v1/chat/completions"


def metric(client: FlaskClient, name: str, **labels: str) -> float:
    """The value of one series in /metrics (0 when absent)."""
    text = client.get("/metrics").get_data(as_text=True)
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        head, _, label_text = series.partition("{")
        if head != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(key) == value_ for key, value_ in labels.items()):
            total += float(value)
    return total


@pytest.fixture
def request_lines() -> Iterator[list[logging.LogRecord]]:
    """The request log's records, as its JSON formatter sees them."""
    lines: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    handler = Keep()
    logger = logging.getLogger("glmvision.request")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def model_calls(app: Flask) -> Callable[[], int]:
    """Count the model's forward calls from now on (the model is loaded first)."""
    backend = app_state(app).service.backend
    loaded = backend.holder.get(timeout=60)
    calls = [0]
    real = loaded.model.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    loaded.model.model.forward = counting
    return lambda: calls[0]


# --- Metrics ---------------------------------------------------------------------------------------


class TestMetrics:
    def test_a_request_is_counted_with_its_tokens_images_and_stages(self, client: FlaskClient) -> None:
        answer = client.post(VISION, json=vision_body(temperature=0.5))  # not cacheable: the model runs
        assert answer.status_code == 200
        usage = answer.get_json()["usage"]
        assert metric(client, "glmvision_requests_total", route=VISION, status="200", code="none") == 1
        assert metric(client, "glmvision_prompt_tokens_total") == usage["prompt_tokens"]
        assert metric(client, "glmvision_completion_tokens_total") == usage["completion_tokens"]
        assert 0 < metric(client, "glmvision_visual_tokens_total") < usage["prompt_tokens"]
        width, height = answer.get_json()["image"]["resized_to"]
        assert metric(client, "glmvision_image_pixels_sum", stage="input") == 64 * 48
        assert metric(client, "glmvision_image_pixels_count", stage="resized") == 1
        assert metric(client, "glmvision_image_pixels_sum", stage="resized") <= 64 * 48
        for stage in ("queue_wait", "preprocess", "generation"):
            assert metric(client, f"glmvision_{stage}_seconds_count") == 1, stage
        assert metric(client, "glmvision_time_to_first_token_seconds_count") == 0  # not a stream
        # One observation per model call; the last call's lands just after its token answered the request.
        tokens = usage["completion_tokens"]
        assert wait_for(lambda: metric(client, "glmvision_batch_size_count") >= tokens, timeout=5)
        assert metric(client, "glmvision_model_loaded") == 1
        assert metric(client, "glmvision_model_info", model="glm-4.6v-flash-demo", device="cpu") == 1
        assert metric(client, "glmvision_request_duration_seconds_count", route=VISION) == 1
        assert width * height > 0

    def test_streams_count_their_time_to_first_token(self, client: FlaskClient) -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
        response = client.post(CHAT, json=body)
        assert b"[DONE]" in response.get_data()
        response.close()  # the server closing the body finishes the request's record
        assert metric(client, "glmvision_time_to_first_token_seconds_count") == 1
        assert metric(client, "glmvision_requests_total", route=CHAT, status="200") == 1

    def test_rejections_are_counted_by_reason(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(api_keys="k1").test_client()
        key = {"Authorization": "Bearer k1"}
        assert client.post(VISION, json=vision_body()).status_code == 401
        assert client.post(VISION, json=vision_body(image="bm90IGFuIGltYWdl"), headers=key).status_code == 400
        assert client.post(VISION, json=vision_body(prompt="x" * 20_000), headers=key).status_code == 400
        assert metric(client, "glmvision_rejections_total", reason="auth") == 1
        assert metric(client, "glmvision_rejections_total", reason="bad_image") == 1
        assert metric(client, "glmvision_rejections_total", reason="too_large") == 1
        errors = metric(client, "glmvision_requests_total", status="400")
        assert errors == 2
        # /metrics itself needs no API key and is not rate limited.
        assert client.get("/metrics").status_code == 200

    def test_the_metrics_key_guards_metrics_only(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(metrics_key="scrape-secret").test_client()
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.get_json()["error"]["code"] == "invalid_api_key"
        right = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert right.status_code == 200
        assert right.headers["Content-Type"].startswith("text/plain")
        assert "glmvision_requests_total" in right.get_data(as_text=True)
        assert client.get("/healthz").status_code == 200

    def test_a_not_ready_readyz_is_counted_with_a_real_code(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(warmup=False).test_client()
        assert client.get("/readyz").status_code == 503  # nothing has loaded the model yet
        assert (
            metric(client, "glmvision_requests_total", route="/readyz", status="503", code="model_loading")
            == 1
        )
        assert metric(client, "glmvision_requests_total", route="/readyz", code="none") == 0

    def test_metrics_can_be_turned_off(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(metrics=False).test_client()
        assert client.get("/metrics").status_code == 404


# --- The request log -------------------------------------------------------------------------------


class TestRequestLog:
    def test_one_json_line_per_request_with_ids_sizes_tokens_and_times(
        self, make_app: Callable[..., Flask], request_lines: list[logging.LogRecord]
    ) -> None:
        client = make_app(api_keys="the-key").test_client()
        headers = {"Authorization": "Bearer the-key", "X-Request-ID": "abc-123"}
        response = client.post(VISION, json=vision_body(temperature=0.5), headers=headers)
        assert response.headers["X-Request-ID"] == "abc-123"
        (line,) = request_lines
        fields = vars(line)
        assert fields["request_id"] == "abc-123"
        assert fields["route"] == VISION and fields["status"] == 200 and fields["method"] == "POST"
        assert re.fullmatch(r"[0-9a-f]{12}", fields["key_id"])
        assert fields["client"] == "127.0.0.1"
        (image,) = fields["images"]
        assert (image["width"], image["height"]) == (64, 48)
        assert 0 < image["resized_width"] * image["resized_height"] <= 64 * 48
        usage = response.get_json()["usage"]
        assert fields["prompt_tokens"] == usage["prompt_tokens"]
        assert fields["completion_tokens"] == usage["completion_tokens"]
        for name in ("queue_ms", "preprocess_ms", "generate_ms", "total_ms"):
            assert fields[name] >= 0, name
        assert fields["total_ms"] >= fields["generate_ms"]
        assert "the-key" not in repr(fields) and "What is in this picture" not in repr(fields)

    def test_an_unsafe_request_id_is_replaced(
        self, client: FlaskClient, request_lines: list[logging.LogRecord]
    ) -> None:
        response = client.get("/v1/models", headers={"X-Request-ID": 'evil" {injected} ' + "x" * 200})
        given = response.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", given)
        assert vars(request_lines[0])["request_id"] == given

    def test_health_probes_and_scrapes_are_not_logged_at_info(
        self, client: FlaskClient, request_lines: list[logging.LogRecord]
    ) -> None:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            client.get(path)
        assert [vars(line)["route"] for line in request_lines] == ["/v1/models"]
        logger = logging.getLogger("glmvision.request")
        logger.setLevel(logging.DEBUG)  # one who wants them sees them
        try:
            client.get("/healthz")
        finally:
            logger.setLevel(logging.INFO)
        assert [(vars(line)["route"], line.levelno) for line in request_lines[1:]] == [
            ("/healthz", logging.DEBUG)
        ]

    def test_an_unknown_path_is_logged_as_unmatched(
        self, client: FlaskClient, request_lines: list[logging.LogRecord]
    ) -> None:
        client.get("/no/such/thing")
        (line,) = request_lines
        assert line.getMessage() == "request"
        assert vars(line)["route"] == "unmatched" and vars(line)["status"] == 404

    def test_an_error_line_carries_its_code(
        self, client: FlaskClient, request_lines: list[logging.LogRecord]
    ) -> None:
        client.post(VISION, json={"prompt": "no image"})
        assert vars(request_lines[0])["status"] == 400
        assert vars(request_lines[0])["code"] == "missing_field"

    def test_the_log_is_json_on_its_own_handler(self) -> None:
        from glmvision.ops.reqlog import request_logger

        logger = request_logger()
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "request", (), None)
        record.request_id = "r1"
        line = logger.handlers[0].format(record)
        assert json.loads(line)["request_id"] == "r1"
        assert logger.propagate is False


# --- The response cache ----------------------------------------------------------------------------


class TestCache:
    def test_a_repeated_greedy_request_is_a_hit_without_the_model(self, app: Flask) -> None:
        client = app.test_client()
        calls = model_calls(app)  # loads the model: images are decoded to its size from the first request
        body = vision_body(temperature=0, max_new_tokens=6)
        first = client.post(VISION, json=body)
        assert first.headers["X-Cache"] == "miss"
        made = calls()
        assert made > 0
        second = client.post(VISION, json=body)
        assert second.headers["X-Cache"] == "hit"
        assert calls() == made
        a, b = first.get_json(), second.get_json()
        assert a["result"] == b["result"] and a["usage"] == b["usage"] and a["image"] == b["image"]
        assert metric(client, "glmvision_cache_hits_total") == 1
        assert metric(client, "glmvision_cache_misses_total") == 1

    def test_any_change_is_a_miss_and_sampling_is_never_cached(self, app: Flask) -> None:
        client = app.test_client()
        model_calls(app)
        base = vision_body(temperature=0, max_new_tokens=4)
        client.post(VISION, json=base)
        for changed in (
            {**base, "prompt": "Something else?"},
            {**base, "max_new_tokens": 5},
            {**base, "image": image_b64(65, 48)},
            {**base, "enable_thinking": True},
        ):
            assert client.post(VISION, json=changed).headers["X-Cache"] == "miss"
        sampled = {**base, "temperature": 0.7}
        assert "X-Cache" not in client.post(VISION, json=sampled).headers
        assert "X-Cache" not in client.post(VISION, json=sampled).headers
        seeded = {**sampled, "seed": 7}
        assert client.post(VISION, json=seeded).headers["X-Cache"] == "miss"
        assert client.post(VISION, json=seeded).headers["X-Cache"] == "hit"

    def test_the_same_pixels_sent_otherwise_hit_too(self, app: Flask) -> None:
        client = app.test_client()
        calls = model_calls(app)
        png = image_b64(96, 64)
        first = client.post(VISION, json=vision_body(temperature=0, image=png))
        made = calls()
        # The bytes differ (BMP, or base64 with line breaks): the decoded pixels are the same.
        for same in (image_b64(96, 64, "BMP"), "\n".join(png[i : i + 76] for i in range(0, len(png), 76))):
            again = client.post(VISION, json=vision_body(temperature=0, image=same))
            assert again.headers["X-Cache"] == "hit"
            assert again.get_json()["result"] == first.get_json()["result"]
            assert again.get_json()["image"] == first.get_json()["image"]
        assert calls() == made

    def test_an_exact_repeat_is_found_without_decoding(
        self, app: Flask, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        client = app.test_client()
        model_calls(app)
        body = vision_body(temperature=0)
        first = client.post(VISION, json=body).get_json()
        import glmvision.serving.pipeline

        def no_decoding(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("decoded an image the cache knew by its bytes")

        monkeypatch.setattr(glmvision.serving.pipeline, "decode_image", no_decoding)
        again = client.post(VISION, json=body)
        assert again.headers["X-Cache"] == "hit"
        assert again.get_json()["image"] == first["image"] and again.get_json()["result"] == first["result"]

    def test_a_stream_is_served_from_the_cache_as_one_chunk(self, app: Flask) -> None:
        client = app.test_client()
        calls = model_calls(app)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
        whole = client.post(CHAT, json=body).get_json()["choices"][0]["message"]["content"]
        made = calls()
        response = client.post(CHAT, json={**body, "stream": True})
        assert response.headers["X-Cache"] == "hit"
        events = [
            line[6:] for line in response.get_data(as_text=True).splitlines() if line.startswith("data: ")
        ]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"][0]["delta"]]
        assert [text for text in contents if text] == ([whole] if whole else [])
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert calls() == made

    def test_the_cache_can_be_turned_off(self, make_app: Callable[..., Flask]) -> None:
        app = make_app(cache=False)
        client = app.test_client()
        calls = model_calls(app)
        body = vision_body(temperature=0)
        client.post(VISION, json=body)
        made = calls()
        assert "X-Cache" not in client.post(VISION, json=body).headers
        assert calls() == 2 * made

    def test_a_perceptual_match_is_opt_in(self, make_app: Callable[..., Flask]) -> None:
        base = vision_body(temperature=0, image=image_b64(128, 96))
        nearly = {**base, "image": image_b64(128, 96, "JPEG", quality=90)}
        exact_app, perceptual_app = make_app(), make_app(cache_phash_distance=8)
        model_calls(exact_app), model_calls(perceptual_app)
        exact = exact_app.test_client()
        assert exact.post(VISION, json=base).headers["X-Cache"] == "miss"
        assert exact.post(VISION, json=nearly).headers["X-Cache"] == "miss"
        perceptual = perceptual_app.test_client()
        perceptual.post(VISION, json=base)
        assert perceptual.post(VISION, json=nearly).headers["X-Cache"] == "hit"


# --- Degradation and the fallback ------------------------------------------------------------------


class TestDegradation:
    def test_a_deep_queue_shrinks_images_and_answers(self, make_app: Callable[..., Flask]) -> None:
        # Any share in use counts as deep here: this one request already holds 1/72 of the places.
        client = make_app(degrade="shrink", degrade_queue_fraction=0.01, degrade_max_new_tokens=2,
                          degrade_image_side=32, cache=False).test_client()  # fmt: skip
        answer = client.post(VISION, json=vision_body(max_new_tokens=10, image=image_b64(256, 192)))
        body = answer.get_json()
        assert body["degraded"] is True
        assert body["usage"]["completion_tokens"] <= 2
        chat = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9})
        assert chat.get_json()["degraded"] is True
        assert chat.get_json()["usage"]["completion_tokens"] <= 2
        assert metric(client, "glmvision_degraded_total") == 2
        assert metric(client, "glmvision_image_pixels_sum", stage="resized") <= 32 * 32

    def test_off_by_default(self, client: FlaskClient) -> None:
        body = client.post(VISION, json=vision_body()).get_json()
        assert "degraded" not in body

    def test_the_fraction_is_reached_at_equality(self, make_app: Callable[..., Flask]) -> None:
        # Two places in all: this one request holds exactly half of them.
        settings = {"degrade": "shrink", "max_batch_size": 1, "max_queue": 1, "cache": False}
        at_half = make_app(**settings, degrade_queue_fraction=0.5).test_client()
        assert at_half.post(VISION, json=vision_body()).get_json()["degraded"] is True
        above = make_app(**settings, degrade_queue_fraction=0.51).test_client()
        assert "degraded" not in above.post(VISION, json=vision_body()).get_json()


class TestFallback:
    @pytest.fixture
    def broken_model(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import glmvision.backends.local.backend

        def fail(settings: Any) -> Any:
            raise RuntimeError("weights are missing")

        monkeypatch.setattr(glmvision.backends.local.backend, "load_model", fail)

    @pytest.mark.usefixtures("broken_model")
    def test_a_polite_answer_instead_of_503(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(fallback_message="We are busy; a person will answer.", warmup=False).test_client()
        answer = client.post(VISION, json=vision_body())
        assert answer.status_code == 200
        assert answer.get_json()["result"] == "We are busy; a person will answer."
        assert answer.get_json()["finish_reason"] == "fallback"
        chat = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}]})
        assert chat.get_json()["choices"][0]["finish_reason"] == "fallback"
        # Bad input is still bad input.
        assert client.post(VISION, json=vision_body(image="bm90IGFuIGltYWdl")).status_code == 400
        assert metric(client, "glmvision_fallbacks_total") == 2

    def test_a_failed_engine_answers_with_the_fallback_at_admission(
        self, make_app: Callable[..., Flask]
    ) -> None:
        app = make_app(fallback_message="Later, please.")
        backend = app_state(app).service.backend
        backend.holder.get(timeout=60)
        backend.engine.failed = "RuntimeError"  # as the model thread leaves it when it dies
        answer = app.test_client().post(VISION, json=vision_body())
        assert answer.status_code == 200
        assert answer.get_json()["finish_reason"] == "fallback"
        assert answer.get_json()["result"] == "Later, please."
        without = make_app()
        app_state(without).service.backend.holder.get(timeout=60)
        app_state(without).service.backend.engine.failed = "RuntimeError"
        refused = without.test_client().post(VISION, json=vision_body())
        assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "engine_failed"

    @pytest.mark.usefixtures("broken_model")
    def test_without_a_message_it_is_503(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(warmup=False).test_client()
        answer = client.post(VISION, json=vision_body())
        assert answer.status_code == 503
        assert answer.get_json()["error"]["code"] == "model_unavailable"


# --- Redaction -------------------------------------------------------------------------------------


CARD = "4111 1111 1111 1111"
ID = "11010519491231002X"


class TestRedaction:
    def _app_with_answer(self, make_app: Callable[..., Flask], text: str, **settings: Any) -> FlaskClient:
        """An app whose cache answers the greedy test body with `text`."""
        import glmvision.serving.pipeline as pipeline

        app = make_app(**settings)
        client = app.test_client()
        state = app_state(app).service
        state.backend.holder.get(timeout=60)
        keys: list[Any] = []
        real_pixels, real_source = pipeline._cache_key, pipeline._source_key

        def remembering(real: Callable[..., Any]) -> Callable[..., Any]:
            def remember(*args: Any) -> Any:
                keys.append(real(*args))
                return keys[-1]

            return remember

        pipeline._cache_key = remembering(real_pixels)  # type: ignore[assignment]
        pipeline._source_key = remembering(real_source)  # type: ignore[assignment]
        try:
            client.post(VISION, json=vision_body(temperature=0))
        finally:
            pipeline._cache_key, pipeline._source_key = real_pixels, real_source  # type: ignore[assignment]
        planted = CachedAnswer(text, None, 10, 5, "stop", ((64, 48, 64, 48),))
        for key in {key.exact: key for key in keys if key is not None}.values():
            state.cache.put(key, planted)
        return client

    def test_answers_are_masked_but_the_last_four(self, make_app: Callable[..., Flask]) -> None:
        text = f"Card {CARD}, ID {ID}, mail zhang.san@example.com."
        client = self._app_with_answer(make_app, text, redact="bank_card,cn_id,email")
        result = client.post(VISION, json=vision_body(temperature=0)).get_json()["result"]
        assert result == "Card **** **** **** 1111, ID **************002X, mail *****************.com."
        assert metric(client, "glmvision_redactions_total", kind="bank_card") == 1

    def test_off_by_default(self, make_app: Callable[..., Flask]) -> None:
        client = self._app_with_answer(make_app, f"Card {CARD}")
        assert client.post(VISION, json=vision_body(temperature=0)).get_json()["result"] == f"Card {CARD}"


# --- Allowlist and proxies -------------------------------------------------------------------------


class TestAllowlist:
    def test_others_get_403_on_every_route_but_healthz(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(allowed_ips="10.0.0.0/8,2001:db8::/32").test_client()
        for path in ("/readyz", "/v1/models", "/metrics", "/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 403, path
            assert refused.get_json()["error"]["code"] == "ip_not_allowed"
        assert client.post(VISION, json=vision_body()).status_code == 403
        assert client.get("/healthz").status_code == 200
        inside = client.get("/v1/models", environ_base={"REMOTE_ADDR": "10.1.2.3"})
        assert inside.status_code == 200
        assert client.get("/v1/models", environ_base={"REMOTE_ADDR": "2001:db8::7"}).status_code == 200
        assert metric(client, "glmvision_rejections_total", reason="allowlist") == 0  # /metrics refused us

    def test_forwarded_for_counts_only_behind_trusted_proxies(self, make_app: Callable[..., Flask]) -> None:
        forwarded = {"X-Forwarded-For": "10.9.9.9"}
        direct = make_app(allowed_ips="10.0.0.0/8").test_client()
        assert direct.get("/v1/models", headers=forwarded).status_code == 403  # never trusted by default
        behind = make_app(allowed_ips="10.0.0.0/8", trusted_proxies="1").test_client()
        assert behind.get("/v1/models", headers=forwarded).status_code == 200
        cidr = make_app(allowed_ips="10.0.0.0/8", trusted_proxies="127.0.0.0/8").test_client()
        assert cidr.get("/v1/models", headers=forwarded).status_code == 200
        spoofed = {"X-Forwarded-For": "10.9.9.9"}
        outside = cidr.get("/v1/models", headers=spoofed, environ_base={"REMOTE_ADDR": "192.0.2.1"})
        assert outside.status_code == 403  # not from the trusted proxy: its header is ignored


# --- The circuit breaker ---------------------------------------------------------------------------


class TestCircuitBreaker:
    def test_timeouts_in_a_row_open_the_circuit_for_that_client(self, make_app: Callable[..., Flask]) -> None:
        app = make_app(api_keys="slow,other", breaker_timeouts=2, breaker_cooldown=120, request_timeout=0.001)
        client = app.test_client()
        slow = {"Authorization": "Bearer slow"}
        for _ in range(2):
            assert client.post(VISION, json=vision_body(), headers=slow).status_code == 504
        refused = client.post(VISION, json=vision_body(), headers=slow)
        assert refused.status_code == 429
        assert refused.get_json()["error"]["code"] == "circuit_open"
        assert 1 <= int(refused.headers["Retry-After"]) <= 120
        message = refused.get_json()["error"]["message"]
        assert " 2 times in a row" in message and f"retry in {refused.headers['Retry-After']} s" in message
        other = client.post(VISION, json=vision_body(), headers={"Authorization": "Bearer other"})
        assert other.status_code == 504  # its own count: one timeout, still closed
        assert metric(client, "glmvision_circuit_trips_total") == 1
        assert metric(client, "glmvision_rejections_total", reason="circuit_open") == 1

    def test_an_answer_resets_the_count(self, make_app: Callable[..., Flask]) -> None:
        app = make_app(breaker_timeouts=2)
        breaker = app_state(app).service.breaker
        client = app.test_client()
        breaker.record("ip:127.0.0.1", True)
        assert client.post(VISION, json=vision_body(temperature=0.5)).status_code == 200
        assert breaker.record("ip:127.0.0.1", True) is False  # one in a row again, not two
        assert client.post(VISION, json=vision_body(temperature=0.5)).status_code == 200

    def test_cache_hits_and_bad_requests_neither_count_nor_reset(
        self, make_app: Callable[..., Flask]
    ) -> None:
        app = make_app(breaker_timeouts=2)
        breaker = app_state(app).service.breaker
        client = app.test_client()
        model_calls(app)
        body = vision_body(temperature=0)
        client.post(VISION, json=body)  # answered by the model: a fresh count
        breaker.record("ip:127.0.0.1", True)
        assert client.post(VISION, json=body).headers["X-Cache"] == "hit"
        assert client.post(VISION, json={"prompt": "no image"}).status_code == 400
        assert breaker.record("ip:127.0.0.1", True) is True  # still two in a row: it opens

    def test_off_at_zero(self, make_app: Callable[..., Flask]) -> None:
        app = make_app(breaker_timeouts=0, request_timeout=0.001)
        assert app_state(app).service.breaker is None
        client = app.test_client()
        for _ in range(6):
            assert client.post(VISION, json=vision_body()).status_code == 504  # never 429
