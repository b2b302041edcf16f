"""No single request can stall or kill the engine: sampling is safe for every value the API accepts,
and one row's failure ends only that row's request (issue 19, findings 1 and 2)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask
from helpers import LiveServer, image_b64, live_server, server_env, vision_body, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_continuous import ADMISSION, alone, inputs, run_cycles, tokens

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import Job, QueueEngine
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.sampling import RowSampling, choose_tokens, ordered_logits, warped_probabilities
from glmvision.backends.local.static import StaticEngine, sampling_group
from glmvision.core.config import load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import GREEDY_BELOW, GenerationParams
from glmvision.postprocess.stream import GenerationStream
from glmvision.serving.pipeline import cacheable
from glmvision.web.state import app_state

# Inside the accepted range 0..2, and each once killed the model thread.
TINY = [1e-300, 5e-324, 1e-45]
VOCAB = 8


def completion(**fields: Any) -> dict[str, Any]:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}}
    content = [image, {"type": "text", "text": "What is in this picture?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **fields}


# Sampling numerics: every value the schemas accept, and any logits the model may put out.

temperatures = st.sampled_from(
    [0.0, 5e-324, 1e-320, 1e-300, 1e-45, 1e-38, 9.99e-6, 1e-5, 0.7, 2.0]
) | st.floats(0.0, 2.0)
top_ps = st.sampled_from([None, 5e-324, 1e-300, 1e-45, 0.5, 1.0]) | st.floats(0.0, 1.0, exclude_min=True)
logit = st.sampled_from([math.inf, -math.inf, math.nan, 3.4e38, -3.4e38, 1e30, 0.0]) | st.floats(width=32)
row_logits = st.lists(logit, min_size=VOCAB, max_size=VOCAB) | logit.map(lambda value: [value] * VOCAB)
rows = st.lists(
    st.tuples(row_logits, temperatures, top_ps, st.none() | st.integers(0, 2**63 - 1)), min_size=1, max_size=4
)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_choose_tokens_never_raises_and_is_greedy_below_the_floor(
    batch: list[tuple[list[float], float, float | None, int | None]],
) -> None:
    logits = torch.tensor([values for values, *_ in batch], dtype=torch.float32)
    params = [GenerationParams(4, temperature=t, top_p=p, seed=seed) for _, t, p, seed in batch]
    sampling = [RowSampling.for_params(one, "cpu") for one in params]
    chosen = choose_tokens(logits, sampling, [0] * len(batch), torch.tensor([VOCAB - 1]))
    ordered = ordered_logits(logits)
    for i, (token, one, (_, temperature, *_)) in enumerate(zip(chosen, params, batch, strict=True)):
        assert isinstance(token, int) and 0 <= token < VOCAB
        assert (one.temperature == 0) == (not temperature >= GREEDY_BELOW)
        if one.temperature == 0:
            assert token == int(ordered[i].argmax())
        # A token no logit allows (-inf, or NaN) is taken only when no token is allowed.
        assert ordered[i, token] > -math.inf or bool((ordered[i] == -math.inf).all())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(row_logits, st.floats(0.0, 2.0), st.floats(0.0, 1.0)), min_size=1, max_size=4))
def test_warped_probabilities_can_always_be_drawn_from(batch: list[tuple[list[float], float, float]]) -> None:
    """Even with a temperature under the floor handed straight to it: what multinomial takes."""
    logits = torch.tensor([values for values, *_ in batch], dtype=torch.float32)
    temperature = torch.tensor([t for _, t, _ in batch])
    probs = warped_probabilities(logits, temperature, torch.tensor([p for *_, p in batch]))
    assert bool(probs.isfinite().all()) and bool((probs >= 0).all()) and bool((probs.sum(dim=-1) > 0).all())
    torch.multinomial(probs, 1)


def test_a_row_whose_draw_fails_gets_its_error_and_the_others_their_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    broken = RowSampling(1.0, 1.0, 0, generator=object())  # multinomial refuses it
    rows = [RowSampling(0.0, 1.0, 0), broken, RowSampling(1.0, 1e-9, 0)]
    greedy, failed, sampled = choose_tokens(logits, rows, [0, 0, 0], torch.tensor([2]))
    assert greedy == 1 and isinstance(failed, TypeError) and sampled == 0


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


@pytest.mark.parametrize("temperature", TINY)
def test_a_tiny_temperature_is_greedy_under_both_schedulers(model: LoadedModel, temperature: float) -> None:
    """The floor applies before either scheduler sees the request: generate() gets do_sample off, the
    static batch groups it with greedy rows and the cache may answer it."""
    prompt = inputs(model, [(64, 48)], "what is this")
    greedy = GenerationParams(6, temperature=0, min_new_tokens=6)
    tiny = GenerationParams(6, temperature=temperature, top_p=5e-324, min_new_tokens=6)
    assert tiny.temperature == 0 and cacheable(tiny)
    expected = alone(model, (prompt, greedy))
    static = StaticEngine(model, load_settings({}))
    one = static._job(prompt, tiny, ADMISSION.admit())
    assert sampling_group(one) == sampling_group(static._job(prompt, greedy, ADMISSION.admit()))
    static._serve_alone(one)
    assert tokens(one.stream) == expected
    continuous = ContinuousEngine(model, load_settings({}))
    row = continuous._job(prompt, tiny, ADMISSION.admit())
    continuous._serve_alone(row)
    assert tokens(row.stream) == expected


def test_at_the_floor_itself_both_schedulers_sample_safely(model: LoadedModel) -> None:
    """The coldest temperature that still samples, with the smallest top_p: transformers' own warpers
    (static) and ours (continuous) both draw, from the most likely token alone: the greedy answer."""
    prompt = inputs(model, [(64, 48)], "what is this")
    cold = GenerationParams(6, temperature=GREEDY_BELOW, top_p=5e-324, seed=3, min_new_tokens=6)
    assert cold.temperature == GREEDY_BELOW
    expected = alone(model, (prompt, GenerationParams(6, temperature=0, min_new_tokens=6)))
    for scheduler in (StaticEngine, ContinuousEngine):
        engine = scheduler(model, load_settings({}))
        one = engine._job(prompt, cold, ADMISSION.admit())
        engine._serve_alone(one)
        assert tokens(one.stream) == expected


# One row's failure fails only that row.


@dataclass
class FailingGrammar:
    """A grammar that leaves the logits alone until `method` raises once `at` tokens are generated."""

    method: str
    at: int
    generated: int = 0
    active: bool = True

    def _maybe_fail(self, method: str) -> None:
        if method == self.method and self.generated >= self.at:
            raise RuntimeError(f"{method} failed (injected)")

    def constrain(self, logits: Any, generated: int) -> int | None:
        self.generated = generated
        self._maybe_fail("constrain")
        return None

    def near_end(self, generated: int) -> bool:
        return False

    def vet(self, token_id: int, generated: int) -> int:
        return token_id

    def accept(self, token_id: int) -> None:
        self._maybe_fail("accept")


@dataclass(frozen=True)
class FailingConstraint:
    """A compiled constraint stand-in whose rows fail in `method` (start: when the row's grammar starts)."""

    method: str
    at: int = 0

    def start(self, budget: int, after_thinking: bool) -> FailingGrammar:
        if self.method == "start":
            raise RuntimeError("start failed (injected)")
        return FailingGrammar(self.method, self.at)


def fail_put_at(job: Job, at: int) -> None:
    """Handing this job its `at`-th token raises (in the model thread)."""
    real, count = job.stream.put, [0]

    def put(token_ids: list[int]) -> None:
        count[0] += 1
        if count[0] >= at:
            raise RuntimeError("put failed (injected)")
        real(token_ids)

    job.stream.put = put  # type: ignore[method-assign]


PROMPTS = ["what is this", "describe it", "the colours", "any text", "read it", "how many", "where"]


@pytest.mark.parametrize("scheduler", [StaticEngine, ContinuousEngine])
def test_a_failing_row_fails_alone_and_the_others_equal_their_solo_runs(
    model: LoadedModel, scheduler: type[QueueEngine]
) -> None:
    """Through the model thread: failures in a grammar's start, constrain and accept and in handing a
    token over, each in its own row of one batch; the healthy rows are exact and the engine serves on."""
    params = GenerationParams(8, temperature=0, min_new_tokens=8)
    requests_ = [(inputs(model, [(40 + 8 * n, 48)], prompt), params) for n, prompt in enumerate(PROMPTS)]
    expected = {i: alone(model, requests_[i]) for i in (0, 2, 4)}
    engine = scheduler(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": "8"}))
    held = ADMISSION.active
    jobs = [engine._job(prompt, one, ADMISSION.admit()) for prompt, one in requests_]
    jobs[1].constraint = FailingConstraint("constrain", at=3)  # type: ignore[assignment]
    jobs[3].constraint = FailingConstraint("start")  # type: ignore[assignment]
    jobs[5].constraint = FailingConstraint("accept", at=2)  # type: ignore[assignment]
    fail_put_at(jobs[6], 2)
    with engine._cond:
        engine._queue.extend(jobs)
        engine._ensure_thread()
        engine._cond.notify()
    for i, want in expected.items():
        assert tokens(jobs[i].stream) == want
    for i in (1, 3, 5, 6):
        with pytest.raises(APIError) as caught:
            tokens(jobs[i].stream)
        error = caught.value
        assert (error.code, error.error_code, error.headers["Retry-After"]) == (503, "row_failed", "1")
    assert engine.stats.batches == 1  # they all shared one batch (a row whose start failed never joined)
    assert len(jobs[1].stream.token_ids) == 3  # it ran until its grammar failed
    assert wait_for(lambda: ADMISSION.active == held)  # every place was given back
    after = engine.submit(*requests_[0], ADMISSION.admit())
    assert tokens(after) == expected[0] and engine.failed is None


@pytest.mark.parametrize("failing", [FailingConstraint("start"), FailingConstraint("constrain", at=0)])
def test_a_long_prompt_whose_row_fails_after_its_chunked_prefill_fails_alone(
    model: LoadedModel, failing: FailingConstraint
) -> None:
    """Its sampling is made, and its first token chosen, once its last chunk is in: a failure there is
    its own; the row already running stays exact."""
    short = (inputs(model, [(40, 40)], "hi"), GenerationParams(12, temperature=0, min_new_tokens=12))
    long = (inputs(model, [(160, 160)], "describe " * 20), GenerationParams(6, temperature=0))
    expected = alone(model, short)
    engine = ContinuousEngine(model, load_settings({"GLMVISION_MAX_PREFILL_TOKENS": "32"}))
    first, second = (engine._job(*request, ADMISSION.admit()) for request in (short, long))
    second.constraint = failing  # type: ignore[assignment]
    engine._join([first])
    run_cycles(engine, {0: [second]})
    assert second.prompt_tokens > 32 and engine.stats.steps >= 2  # chunked while the short row ran
    assert tokens(first.stream) == expected
    with pytest.raises(APIError) as caught:
        tokens(second.stream)
    assert caught.value.error_code == "row_failed" and engine._chunked is None and not engine._rows


def break_detokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turning tokens into text fails (in the request thread) after the first text went out."""

    class Broken:
        def __init__(self, decoder: Any) -> None:
            self._pushed = 0

        def push(self, token_ids: list[int]) -> str:
            self._pushed += 1
            if self._pushed > 1:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return "x"

        def flush(self) -> str:  # an answer that is only its stop token still gets here
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    monkeypatch.setattr(GenerationStream, "detokenizer", Broken)


def test_a_failing_detokenizer_gives_that_request_a_clean_503(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    client = app.test_client()
    assert client.post("/v1/chat/vision", json=vision_body()).status_code == 200  # loaded and warmed up
    break_detokenizer(monkeypatch)
    for path, body in (
        ("/v1/chat/completions", completion()),
        ("/v1/chat/vision", vision_body(temperature=0)),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "row_failed" and response.headers["Retry-After"] == "1"
    # Streamed, the headers (200) are out with the first text: the error comes as an event.
    streamed = client.post("/v1/chat/completions", json=completion(stream=True, min_tokens=4))
    assert streamed.status_code == 200, streamed.get_data(as_text=True)
    events = [line[len("data: ") :] for line in streamed.get_data(as_text=True).splitlines() if line]
    assert json.loads(events[-2])["error"]["code"] == "row_failed" and events[-1] == "[DONE]"
    assert app_state(app).service.backend.engine.failed is None


# The regression on real gunicorn.


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS="8")
    with live_server(tmp_path_factory.mktemp("row-safety"), env, ready_path="/readyz") as live:
        yield live


def test_tiny_temperatures_are_answered_and_the_worker_lives(server: LiveServer) -> None:
    workers = server.worker_pids()
    assert len(workers) == 1
    for temperature in TINY:
        for path, body in (
            ("/v1/chat/completions", completion(temperature=temperature)),
            ("/v1/chat/vision", vision_body(temperature=temperature)),
            ("/v1/chat/completions", completion(temperature=temperature, top_p=5e-324, stream=True)),
        ):
            response = requests.post(server.url + path, json=body, timeout=60)
            assert response.status_code == 200, (path, temperature, response.text)
            if body.get("stream"):  # an error mid-stream still comes with 200
                events = [line for line in response.text.splitlines() if line.startswith("data: {")]
                assert not any("error" in json.loads(line[len("data: ") :]) for line in events)
    assert server.worker_pids() == workers
    ready = requests.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_warm_up_that_cannot_detokenize_fails_the_load(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a row's failure but the model's: the load fails (and backs off), as before."""
    break_detokenizer(monkeypatch)
    response = make_app().test_client().post("/v1/chat/vision", json=vision_body())
    assert (response.status_code, response.get_json()["error"]["code"]) == (503, "model_unavailable")
