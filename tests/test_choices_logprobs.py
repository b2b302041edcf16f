"""Several choices from one prompt (`n`), the tokens' log-probabilities (`logprobs`, `top_logprobs`) and
vLLM's `ignore_eos`: through the official `openai` client, the native endpoint and real gunicorn."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
import torch
from flask import Flask
from helpers import LiveServer, image_b64, live_server, server_env

from glmvision.backends.engine.process import coalesce
from glmvision.backends.engine.wire import Message, Tokens, decode, encode
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams, choice_params
from glmvision.web.openai.protocol import ChatCompletionRequest

MODEL = "glm-4.6v-flash-demo"
PROMPT = "Tell me a story about a red bicycle."
TOP = 5
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def client_for(app: Flask) -> openai.OpenAI:
    transport = httpx.Client(transport=httpx.WSGITransport(app=app))
    return openai.OpenAI(base_url="http://test/v1", api_key="unused", max_retries=0, http_client=transport)


def user(text: str = PROMPT, image: bool = False) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}})
    return [{"role": "user", "content": content}]


def first_step(loaded: LoadedModel, text: str = PROMPT) -> torch.Tensor:
    """The model's log-probabilities for the first generated token, by a plain forward pass."""
    inputs = loaded.prepare([{"role": "user", "content": [{"type": "text", "text": text}]}], False)
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits[0, -1].float()
    return logits.log_softmax(-1)


def engine_counters(client: Any) -> dict[str, Any]:
    body = client.get("/readyz").get_json()
    return body["engine"]


# --- n ---------------------------------------------------------------------------------------------


def test_greedy_choices_share_one_prefill_and_equal_the_single_answer(app: Flask) -> None:
    oai = client_for(app)
    three = oai.chat.completions.create(
        model=MODEL,
        messages=user(image=True),
        n=3,
        temperature=0,
        max_tokens=8,  # type: ignore[arg-type]
    )
    with app.test_client() as flask_client:
        counters = engine_counters(flask_client)
    assert counters["shared_prefills"] == 2  # three rows, one prefill: two copies of its KV
    one = oai.chat.completions.create(
        model=MODEL,
        messages=user(image=True),
        temperature=0,
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in three.choices]
    assert texts == [one.choices[0].message.content] * 3
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_seeded_choices_differ_and_the_same_seed_gives_them_again(app: Flask) -> None:
    oai = client_for(app)

    def sample(n: int, seed: int = 7) -> list[str]:
        answer = oai.chat.completions.create(
            model=MODEL,
            messages=user(),  # type: ignore[arg-type]
            n=n,
            seed=seed,
            temperature=1.0,
            max_tokens=12,
            extra_body={"ignore_eos": True},
        )
        return [choice.message.content or "" for choice in answer.choices]

    first = sample(3)
    assert len(set(first)) == 3  # choice i draws from its own stream, seeded seed + i
    assert sample(3) == first
    assert sample(1) == first[:1]  # choice 0 is the single answer's seed
    assert sample(1, seed=8) == first[1:2]


def test_streamed_choices_interleave_by_index_and_add_up(app: Flask) -> None:
    oai = client_for(app)
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=user(),
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=10,  # type: ignore[arg-type]
    )
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, order = ["", ""], [None, None], []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert len(chunk.choices) == 1
            order.append(choice.index)
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert order[:2] == [0, 1]  # each choice's role chunk, in index order
    assert texts == [choice.message.content for choice in whole.choices]
    assert finishes == [choice.finish_reason for choice in whole.choices]
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_n_is_capped_by_the_setting(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_n="2")
    with app.test_client() as flask_client:
        body = {"messages": user(), "n": 3, "max_tokens": 2}
        response = flask_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert (error["code"], error["param"]) == ("invalid_value", "n")
        body["n"] = 2
        assert len(flask_client.post("/v1/chat/completions", json=body).get_json()["choices"]) == 2


def test_each_choice_has_its_own_seed() -> None:
    params = GenerationParams(max_new_tokens=4, seed=2**63 - 1)
    assert [p.seed for p in choice_params(params, 3)] == [2**63 - 1, 0, 1]
    unseeded = GenerationParams(max_new_tokens=4)
    assert choice_params(unseeded, 2) == [unseeded, unseeded]


# --- logprobs --------------------------------------------------------------------------------------


def same_tokens(one: list[Any], other: list[Any]) -> bool:
    """The same tokens with the same log-probabilities (within rounding)."""
    return [t.token for t in one] == [t.token for t in other] and all(
        abs(a.logprob - b.logprob) < TOLERANCE for a, b in zip(one, other, strict=True)
    )


def check_greedy(tokens: list[Any], expected_first: torch.Tensor) -> None:
    """Greedy: each token is its step's most likely, at most 0, and the first is the model's own."""
    assert tokens
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == TOP
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == token.logprob
        assert [top.logprob for top in token.top_logprobs] == sorted(
            (top.logprob for top in token.top_logprobs), reverse=True
        )
        assert bytes(token.bytes) == token.token.encode()
    best = expected_first.topk(TOP).values.tolist()
    got = [top.logprob for top in tokens[0].top_logprobs]
    assert max(abs(a - b) for a, b in zip(got, best, strict=True)) < TOLERANCE


def test_greedy_logprobs_are_the_models_own_whole_and_streamed(app: Flask, loaded: LoadedModel) -> None:
    oai = client_for(app)
    expected = first_step(loaded)
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=TOP,
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    check_greedy(logprobs.content, expected)
    assert "".join(token.token for token in logprobs.content) == whole.choices[0].message.content
    assert whole.usage is not None and len(logprobs.content) == whole.usage.completion_tokens
    streamed: list[Any] = []
    for chunk in oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=TOP,
        stream=True,
    ):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert same_tokens(streamed, logprobs.content)  # the second prefill reused the first's KV: ~1e-7 apart


def test_sampled_logprobs_come_from_the_distribution_drawn_from(app: Flask, loaded: LoadedModel) -> None:
    """At temperature 2 the sampler's distribution is flatter than the model's: that one is reported."""
    oai = client_for(app)
    expected = (first_step(loaded) / 2.0).log_softmax(-1)  # logits / temperature, renormalised
    answer = oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        temperature=2.0,
        seed=1,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    got = [top.logprob for top in content[0].top_logprobs]
    assert max(abs(a - b) for a, b in zip(got, expected.topk(2).values.tolist(), strict=True)) < TOLERANCE
    assert all(token.logprob <= 0 for token in content)


def test_without_logprobs_none_are_sent(client: Any) -> None:
    body = {"messages": user(), "max_tokens": 2, "temperature": 0}
    assert client.post("/v1/chat/completions", json=body).get_json()["choices"][0]["logprobs"] is None
    native = client.post("/v1/chat/vision", json={"image": image_b64(), "prompt": "Hi", "max_new_tokens": 2})
    assert "logprobs" not in native.get_json()


def test_top_logprobs_needs_logprobs_and_at_most_twenty(client: Any) -> None:
    for extra, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        response = client.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 2, **extra})
        assert response.status_code == 400
        assert response.get_json()["error"]["param"] == param


def test_the_native_endpoint_gives_logprobs_on_request(client: Any) -> None:
    body = {"image": image_b64(), "prompt": "Hi", "max_new_tokens": 4, "temperature": 0}
    answer = client.post("/v1/chat/vision", json={**body, "logprobs": True, "top_logprobs": 3}).get_json()
    tokens = answer["logprobs"]
    assert len(tokens) == answer["usage"]["completion_tokens"] - (answer["finish_reason"] == "stop")
    for token in tokens:
        assert token["logprob"] <= 0 and token["top_logprobs"][0]["token"] == token["token"]
        assert len(token["top_logprobs"]) == 3 and token["bytes"] == list(token["token"].encode())


def test_the_static_scheduler_refuses_logprobs(make_app: Callable[..., Flask]) -> None:
    with make_app(scheduler="static").test_client() as flask_client:
        body = {"messages": user(), "max_tokens": 2, "logprobs": True}
        response = flask_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert (error["code"], error["param"]) == ("unsupported_parameter", "logprobs")
        del body["logprobs"]
        assert flask_client.post("/v1/chat/completions", json={**body, "n": 2}).status_code == 200


def test_logprobs_travel_on_the_wire_and_join_when_coalesced() -> None:
    first = Tokens("a", (1,), logprobs=((-0.5, ((1, -0.5), (2, -1.5))),))
    second = Tokens("a", (2,), logprobs=((-0.25, ()),))
    assert decode(encode(first)) == first
    outbox: queue.SimpleQueue[tuple[bytes, Message]] = queue.SimpleQueue()
    outbox.put((b"w", first))
    outbox.put((b"w", second))
    [(_, joined)] = coalesce(outbox)
    assert isinstance(joined, Tokens)
    assert joined.token_ids == (1, 2) and joined.logprobs == first.logprobs + second.logprobs
    assert Tokens("b", (3,)).logprobs == ()  # nothing asked: nothing sent


# --- ignore_eos ------------------------------------------------------------------------------------


def test_ignore_eos_generates_exactly_max_tokens(app: Flask) -> None:
    oai = client_for(app)

    def sample(**extra: Any) -> Any:
        return oai.chat.completions.create(
            model=MODEL,
            messages=user(),  # type: ignore[arg-type]
            n=8,
            seed=11,
            temperature=2.0,
            max_tokens=40,
            **extra,
        )

    free = sample()
    assert "stop" in [choice.finish_reason for choice in free.choices]  # some choice drew a stop token
    held = sample(extra_body={"ignore_eos": True})
    assert [choice.finish_reason for choice in held.choices] == ["length"] * 8
    assert held.usage is not None and held.usage.completion_tokens == 8 * 40


def test_ignore_eos_maps_to_min_tokens() -> None:
    settings = load_settings({})
    body = ChatCompletionRequest.model_validate(
        {"messages": user(), "max_tokens": 17, "ignore_eos": True}, strict=False
    )
    assert body.to_generation_params(settings).min_new_tokens == 17


# --- Real gunicorn, the engine process -------------------------------------------------------------


@pytest.fixture(scope="module")
def process_server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process")
    with live_server(tmp_path_factory.mktemp("choices"), env, ready_path="/readyz", timeout=180) as server:
        yield server


def test_choices_and_logprobs_through_the_engine_process(
    process_server: LiveServer, loaded: LoadedModel
) -> None:
    oai = openai.OpenAI(base_url=process_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = first_step(loaded)
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        n=2,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=TOP,
    )
    assert [choice.index for choice in whole.choices] == [0, 1]
    contents = [choice.logprobs.content for choice in whole.choices]  # type: ignore[union-attr]
    for content in contents:
        assert content is not None
        check_greedy(content, expected)
    assert whole.choices[0].message.content == whole.choices[1].message.content
    streamed: dict[int, list[Any]] = {0: [], 1: []}
    for chunk in oai.chat.completions.create(
        model=MODEL,
        messages=user(),  # type: ignore[arg-type]
        n=2,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=TOP,
        stream=True,
    ):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed[choice.index].extend(choice.logprobs.content)
    for index in (0, 1):
        assert same_tokens(streamed[index], contents[index] or [])
    seeded = requests.post(
        process_server.url + "/v1/chat/completions",
        json={"messages": user(), "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True},
        timeout=60,
    ).json()
    again = requests.post(
        process_server.url + "/v1/chat/completions",
        json={"messages": user(), "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True},
        timeout=60,
    ).json()
    texts = [choice["message"]["content"] for choice in seeded["choices"]]
    assert texts == [choice["message"]["content"] for choice in again["choices"]]
    assert texts[0] != texts[1]
    assert seeded["usage"]["completion_tokens"] == 16
