"""Both schedulers on the real tiny model: equality with one-by-one, per-row limits, backpressure.

Tests taking `scheduler` run on each; the rest pin what one scheduler does (tests/test_continuous.py
holds the continuous scheduler's own)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from helpers import image_b64, live_server, wait_for
from PIL import Image

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import Job, QueueEngine
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.static import RowStreamer, StaticEngine
from glmvision.core.backend import Admission, Ticket
from glmvision.core.config import load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.stream import GenerationStream

GREEDY = {"temperature": 0.0}
SCHEDULERS = {"continuous": ContinuousEngine, "static": StaticEngine}


@pytest.fixture(params=sorted(SCHEDULERS))
def scheduler(request: pytest.FixtureRequest) -> str:
    """Each scheduler in turn."""
    return request.param


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    """One loaded tiny model shared by this module's engines."""
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


class Harness:
    """An engine plus a count of requests 'still being preprocessed', so tests can shape batches."""

    def __init__(self, model: LoadedModel, scheduler: str = "static", **overrides: Any) -> None:
        settings = load_settings({f"GLMVISION_{k.upper()}": v for k, v in overrides.items()})
        self.pending = 0
        self.engine: QueueEngine = SCHEDULERS[scheduler](model, settings, arriving=lambda: self.pending)
        self.admission = Admission(settings.admission_capacity, settings.request_timeout, lambda: 0.0)
        self.model = model

    def ticket(self, age: float = 0.0) -> Ticket:
        """An admitted request that arrived `age` seconds ago."""
        ticket = self.admission.admit()
        ticket.arrived -= age
        ticket.deadline -= age
        return ticket

    def submit(self, inputs: Any, params: GenerationParams, age: float = 0.0) -> GenerationStream:
        return self.engine.submit(inputs, params, self.ticket(age))

    def inputs(self, size: tuple[int, int] = (64, 48), prompt: str = "What is this?") -> Any:
        image = Image.new("RGB", size, (size[0] % 256, 90, size[1] % 256))
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}
        ]
        return self.model.prepare(messages, enable_thinking=False)

    def submit_together(self, jobs: list[tuple[Any, GenerationParams]]) -> list[GenerationStream]:
        """Submit all jobs while announcing the rest as arriving, so they can form one batch."""
        self.pending = len(jobs)
        streams = []
        for inputs, params in jobs:
            streams.append(self.submit(inputs, params))
            self.pending -= 1
        return streams


def finish(stream: GenerationStream) -> GenerationStream:
    for _ in stream:
        pass
    return stream


def finish_all(streams: list[GenerationStream]) -> list[GenerationStream]:
    """Consume streams concurrently, as request threads would."""
    errors: list[BaseException] = []

    def consume(stream: GenerationStream) -> None:
        try:
            finish(stream)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return streams


VARIED = [
    ((64, 48), "What is this?"),
    ((120, 40), "Describe the colours in detail, please."),
    ((30, 90), "Hi"),
]


def test_batched_greedy_equals_one_by_one_token_for_token(model: LoadedModel, scheduler: str) -> None:
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12, **GREEDY)
    alone = Harness(model, max_batch_size=1)
    solo = [finish(alone.submit(alone.inputs(*v), params)) for v in VARIED]
    assert alone.engine.stats.largest_batch == 1

    together = Harness(model, scheduler, max_batch_size=8, batch_wait_ms=1000)
    batched = finish_all(together.submit_together([(together.inputs(*v), params) for v in VARIED]))
    assert together.engine.stats.batches == 1 and together.engine.stats.largest_batch == 3
    for one, many in zip(solo, batched, strict=True):
        assert many.token_ids == one.token_ids
        assert many.result == one.result


def test_each_row_keeps_its_own_max_new_tokens(model: LoadedModel, scheduler: str) -> None:
    harness = Harness(model, scheduler, batch_wait_ms=1000)
    limits = [3, 7, 12]
    jobs = [
        (harness.inputs(*VARIED[i]), GenerationParams(max_new_tokens=n, min_new_tokens=12, **GREEDY))
        for i, n in enumerate(limits)
    ]
    streams = finish_all(harness.submit_together(jobs))
    assert harness.engine.stats.batches == 1
    assert [s.result.completion_tokens for s in streams] == limits
    assert all(s.result.finish_reason == "length" for s in streams)


def test_stop_strings_apply_to_their_own_row_only(model: LoadedModel, scheduler: str) -> None:
    params = GenerationParams(max_new_tokens=30, min_new_tokens=30, **GREEDY)
    harness = Harness(model, scheduler, batch_wait_ms=1000)
    first, second = (harness.inputs(*VARIED[0]), harness.inputs(*VARIED[1]))
    reference = finish_all(harness.submit_together([(first, params), (second, params)]))
    text = reference[0].result.text
    candidates = [
        text[i : i + 2]
        for i in range(3, len(text) - 2)
        if text[i : i + 2].isprintable() and text[i : i + 2].strip()
    ]
    if not candidates:
        pytest.skip("the random model produced no printable text to stop on")
    stop = candidates[0]
    expected = text[: text.index(stop)].rstrip()
    stopped_params = GenerationParams(max_new_tokens=30, min_new_tokens=30, stop=(stop,), **GREEDY)
    stopped, other = finish_all(harness.submit_together([(first, stopped_params), (second, params)]))
    assert stopped.result.text == expected and stopped.result.finish_reason == "stop"
    assert stopped.result.completion_tokens < 30
    # The neighbour is untouched (the second run may reuse the first's prompts: only that differs).
    assert other.result is not None and reference[1].result is not None
    assert dataclasses.replace(other.result, cached_tokens=0) == reference[1].result


def test_static_rows_with_different_sampling_settings_run_in_separate_batches(model: LoadedModel) -> None:
    harness = Harness(model, batch_wait_ms=1000)
    greedy = GenerationParams(max_new_tokens=4, **GREEDY)
    sampled = GenerationParams(max_new_tokens=4, temperature=0.9, top_p=0.9)
    finish_all(
        harness.submit_together(
            [(harness.inputs(), greedy), (harness.inputs(), sampled), (harness.inputs(), greedy)]
        )
    )
    stats = harness.engine.stats
    assert (stats.batches, stats.rows, stats.largest_batch) == (2, 3, 2)


def test_batches_never_exceed_the_configured_size(model: LoadedModel, scheduler: str) -> None:
    harness = Harness(model, scheduler, max_batch_size=3, batch_wait_ms=1000)
    params = GenerationParams(max_new_tokens=3, **GREEDY)
    finish_all(harness.submit_together([(harness.inputs(), params) for _ in range(7)]))
    stats = harness.engine.stats
    assert stats.rows == 7 and stats.largest_batch == 3 and stats.batches >= 3


def test_the_token_budget_bounds_a_batch(model: LoadedModel, scheduler: str) -> None:
    probe = Harness(model)
    inputs = probe.inputs()
    per_row = int(inputs["input_ids"].shape[1]) + 8
    harness = Harness(model, scheduler, max_batch_tokens=2 * per_row, batch_wait_ms=1000)
    finish_all(
        harness.submit_together([(inputs, GenerationParams(max_new_tokens=8, **GREEDY)) for _ in range(5)])
    )
    assert harness.engine.stats.largest_batch == 2 and harness.engine.stats.rows == 5


def test_the_deadline_returns_what_was_generated(model: LoadedModel, scheduler: str) -> None:
    harness = Harness(model, scheduler, request_timeout=0.5)
    params = GenerationParams(max_new_tokens=100_000, min_new_tokens=100_000, **GREEDY)
    stream = finish(harness.submit(harness.inputs(), params))
    assert stream.result.finish_reason == "length"
    assert 0 < stream.result.completion_tokens < 100_000
    assert harness.engine.stats.deadline_stops == 1


def test_a_request_out_of_time_before_any_output_is_504(model: LoadedModel, scheduler: str) -> None:
    harness = Harness(model, scheduler, request_timeout=1)
    stream = harness.submit(harness.inputs(), GenerationParams(max_new_tokens=4), age=5)
    with pytest.raises(APIError) as caught:
        finish(stream)
    assert (caught.value.code, caught.value.error_code) == (504, "request_timeout")


@pytest.fixture
def busy(model: LoadedModel, scheduler: str) -> Iterator[tuple[Harness, GenerationStream]]:
    """An engine whose model thread is held by one long generation; cancelled afterwards."""
    harness = Harness(model, scheduler, max_queue=2, max_batch_size=1)
    long = GenerationParams(max_new_tokens=100_000, min_new_tokens=100_000, **GREEDY)
    running = harness.submit(harness.inputs(), long)
    deadline = time.monotonic() + 30
    while harness.engine.stats.batches == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the model thread has taken it
    yield harness, running
    running.close()


def test_a_full_worker_is_refused_at_once_with_retry_after(busy: tuple[Harness, GenerationStream]) -> None:
    """Admission counts the running request and the queued ones; the one too many gets 503 at once."""
    harness, running = busy
    params = GenerationParams(max_new_tokens=2, min_new_tokens=2, **GREEDY)
    capacity = harness.admission.capacity
    waiting = [harness.submit(harness.inputs(), params) for _ in range(capacity - 1)]
    assert harness.admission.active == capacity
    with pytest.raises(APIError) as caught:
        harness.admission.admit()
    assert (caught.value.code, caught.value.error_code) == (503, "overloaded")
    assert 1 <= int(caught.value.headers["Retry-After"]) <= 60
    assert harness.admission.refused == 1
    running.close()  # the long one leaves; the queued ones are served and their places given back
    assert all(finish(s).result.completion_tokens == 2 for s in waiting)
    assert wait_for(lambda: harness.admission.active == 0)


def test_a_departed_client_frees_its_row_and_the_rest_go_on(model: LoadedModel, scheduler: str) -> None:
    harness = Harness(model, scheduler, batch_wait_ms=1000)
    params = GenerationParams(max_new_tokens=400, min_new_tokens=400, **GREEDY)
    leaving, staying = harness.submit_together(
        [(harness.inputs(), params), (harness.inputs(*VARIED[1]), params)]
    )
    next(iter(leaving))  # first delta, then the client goes away
    leaving.close()
    finish(staying)
    assert harness.engine.stats.largest_batch == 2
    assert staying.result.completion_tokens == 400
    assert len(leaving.token_ids) < 400


def test_static_out_of_memory_retries_the_batch_in_halves(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = model.model.generate

    def small_batches_only(**kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", small_batches_only)
    harness = Harness(model, batch_wait_ms=1000)
    params = GenerationParams(max_new_tokens=3, min_new_tokens=3, **GREEDY)
    streams = finish_all(harness.submit_together([(harness.inputs(), params) for _ in range(4)]))
    assert [s.result.completion_tokens for s in streams] == [3, 3, 3, 3]
    assert harness.engine.stats.oom_splits == 1


def test_row_streamer_stops_feeding_a_row_at_its_end() -> None:
    class Decoder:
        stop_ids = [0]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

    streams = [GenerationStream(Decoder(), 5, GenerationParams(max_new_tokens=n)) for n in (2, 4)]
    admission = Admission(2, 1e9, lambda: 0.0)
    jobs = [Job(None, s._params, s, 5, admission.admit()) for s in streams]
    streamer = RowStreamer(jobs, {0})
    streamer.put(torch.tensor([[9, 9, 9], [9, 9, 9]]))  # the prompts
    for step in ([1, 1], [2, 0], [3, 5], [4, 6]):
        streamer.put(torch.tensor(step))
    assert [job.generated for job in jobs] == [2, 2]  # row 0 hit its limit, row 1 its stop token
    assert [finish(s).token_ids for s in streams] == [[1, 2], [1, 0]]
    assert [s.result.finish_reason for s in streams] == ["length", "stop"]


def test_overload_over_http_is_503_and_the_server_stays_healthy(tmp_path: Path, demo_model_dir: Path) -> None:
    env = {
        "GLMVISION_MODEL": str(demo_model_dir),
        "GLMVISION_DEVICE": "cpu",
        "GLMVISION_MAX_QUEUE": "1",
        "GLMVISION_MAX_BATCH_SIZE": "1",
        "GLMVISION_MAX_NEW_TOKENS": "100000",
    }
    long = {
        "model": "glm-4.6v-flash-demo",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Go on"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}},
                ],
            }
        ],
        "max_tokens": 1500,
        "min_tokens": 1500,
        "temperature": 0,
    }
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        results: list[requests.Response] = []
        lock = threading.Lock()

        def call() -> None:
            response = requests.post(server.url + "/v1/chat/completions", json=long, timeout=120)
            with lock:
                results.append(response)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        statuses = sorted(r.status_code for r in results)
        assert len(results) == 6 and 200 in statuses and 503 in statuses, statuses
        for refused in (r for r in results if r.status_code == 503):
            assert refused.json()["error"]["code"] == "overloaded"
            assert int(refused.headers["Retry-After"]) >= 1
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
        small = {**long, "max_tokens": 3, "min_tokens": 0}
        assert requests.post(server.url + "/v1/chat/completions", json=small, timeout=60).status_code == 200
        engine = requests.get(server.url + "/readyz", timeout=10).json()["engine"]
        assert engine["refused"] >= 1 and engine["largest_batch"] == 1


class _NoDecoder:
    """Enough of a model for a GenerationStream that never receives tokens."""

    stop_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return ""


def _queued_job(**params: Any) -> Job:
    generation = GenerationParams(max_new_tokens=4, **params)
    stream = GenerationStream(_NoDecoder(), 10, generation)
    ticket = Admission(1, 60, lambda: 0.0).admit()
    return Job({"input_ids": torch.zeros((1, 10), dtype=torch.long)}, generation, stream, 10, ticket)


def _batches_taken(jobs: list[Job]) -> list[list[int]]:
    """Queue `jobs` on an engine without a model thread; return the batches _take forms, by index."""
    engine = StaticEngine(None, load_settings({"GLMVISION_MAX_BATCH_SIZE": 8}))
    engine._queue.extend(jobs)
    batches = []
    while engine.queued():
        batches.append([jobs.index(job) for job in engine._take()])
    return batches


@pytest.mark.parametrize(
    ("settings", "batches"),
    [
        # Equal settings share a batch (so the cases below are not separate for another reason).
        ([{"temperature": 0.9, "top_p": 0.9}] * 3, [[0, 1, 2]]),
        ([{"temperature": 0.3, "top_p": 0.9}, {"temperature": 1.5, "top_p": 0.9}], [[0], [1]]),
        ([{"temperature": 0.3}, {"temperature": 1.5}, {"temperature": 0.3}], [[0, 2], [1]]),
        ([{"temperature": 0.9, "top_p": 0.5}, {"temperature": 0.9, "top_p": 0.95}], [[0], [1]]),
        ([{"temperature": 0.9, "top_p": 0.5}, {"temperature": 0.9}], [[0], [1]]),
        ([{"temperature": 0.9}, {"temperature": 0.0}, {"temperature": 0.0, "top_p": 0.5}], [[0], [1, 2]]),
        ([{"temperature": 0.0, "min_new_tokens": 2}, {"temperature": 0.0}], [[0], [1]]),
        # A seeded sample needs the RNG to itself; a seeded greedy row does not.
        ([{"temperature": 0.9, "seed": 1}, {"temperature": 0.9, "seed": 1}], [[0], [1]]),
        ([{"temperature": 0.0, "seed": 1}, {"temperature": 0.0, "seed": 2}], [[0, 1]]),
    ],
)
def test_static_only_rows_with_equal_sampling_settings_share_a_batch(
    settings: list[dict[str, Any]], batches: list[list[int]]
) -> None:
    """The first batch's settings run every row in it: a row must never borrow another's."""
    assert _batches_taken([_queued_job(**params) for params in settings]) == batches


def test_static_sampled_rows_at_different_temperatures_run_apart_on_the_model(model: LoadedModel) -> None:
    harness = Harness(model, batch_wait_ms=1000)
    cool = GenerationParams(max_new_tokens=2, min_new_tokens=2, temperature=0.3, top_p=0.9)
    hot = GenerationParams(max_new_tokens=2, min_new_tokens=2, temperature=1.5, top_p=0.9)
    streams = finish_all(harness.submit_together([(harness.inputs(), cool), (harness.inputs(), hot)]))
    assert [s.result.completion_tokens for s in streams] == [2, 2]
    stats = harness.engine.stats
    assert (stats.batches, stats.rows, stats.largest_batch) == (2, 2, 1)
