"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}: the official client and
LangChain, with images, whole and streamed, against the Flask app and real gunicorn."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from helpers import LiveServer, image_b64, live_server, server_env

from glmvision.core.config import SHARED_DIR_ENV
from glmvision.serving.responses_store import ResponseStore

DEMO = "glm-4.6v-flash-demo"
# Grammar-forced answers end by themselves: the response is "completed", not cut at max_output_tokens.
FLAG_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
FLAG_FORMAT = {"format": {"type": "json_schema", "name": "flag", "schema": FLAG_SCHEMA, "strict": True}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def image_url(width: int = 64, height: int = 48) -> str:
    return "data:image/png;base64," + image_b64(width, height)


def asking(text: str, *sizes: tuple[int, int], detail: str | None = None) -> list[dict[str, Any]]:
    """One user message: text, then images of the given sizes."""
    parts: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
    for width, height in sizes:
        part: dict[str, Any] = {"type": "input_image", "image_url": image_url(width, height)}
        if detail is not None:
            part["detail"] = detail
        parts.append(part)
    return [{"role": "user", "content": parts}]


def client_of(app: Flask, key: str = "unused") -> openai.OpenAI:
    transport = httpx.Client(transport=httpx.WSGITransport(app=app))
    return openai.OpenAI(base_url="http://test/v1", api_key=key, max_retries=0, http_client=transport)


@pytest.fixture
def oai(app: Flask) -> Iterator[openai.OpenAI]:
    with client_of(app) as client:
        yield client


def check_shape(response: Any) -> None:
    """What every response carries, whatever its output."""
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert response.output and all(item.id for item in response.output)


def test_an_image_answered_whole_by_the_official_client(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model=DEMO,
        input=asking("What is this?", (64, 48), detail="low"),
        max_output_tokens=5,
        temperature=0,  # greedy: sampled, the demo model may stop before its 5 tokens
        instructions="Answer briefly.",
    )
    check_shape(response)
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    assert response.usage.output_tokens == 5 and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens_details.image_tokens > 0  # type: ignore[attr-defined]
    assert response.instructions == "Answer briefly."


def test_a_string_input_and_sampling_fields_are_echoed(client: FlaskClient) -> None:
    body = {
        "input": "Hello",
        "max_output_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"a": "b"},
    }
    answer = client.post("/v1/responses", json=body).get_json()
    assert (answer["temperature"], answer["top_p"], answer["max_output_tokens"]) == (0.5, 0.9, 3)
    assert answer["metadata"] == {"a": "b"} and answer["store"] is True
    assert 1 <= answer["usage"]["output_tokens"] <= 3  # sampled: it may stop before the limit


def test_json_schema_text_format_is_enforced(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model=DEMO, input="Is it red?", text=FLAG_FORMAT, max_output_tokens=40)
    assert response.status == "completed"
    assert set(json.loads(response.output_text)) == {"ok"}


def test_the_stream_is_the_documented_event_sequence(oai: openai.OpenAI) -> None:
    with oai.responses.stream(
        model=DEMO, input=asking("Is it red?", (32, 32)), text=FLAG_FORMAT, max_output_tokens=40
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text and set(json.loads(deltas)) == {"ok"}
    check_shape(final)


def test_a_cut_stream_ends_incomplete(client: FlaskClient) -> None:
    # Greedy, so that the demo model's answer is the same every run (sampled, it may stop within 3).
    body = {"input": "Hi", "max_output_tokens": 3, "temperature": 0, "stream": True}
    sent = client.post("/v1/responses", json=body)
    events = [
        json.loads(line[6:]) for line in sent.get_data(as_text=True).splitlines() if line.startswith("data: ")
    ]
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 3


def test_a_forced_function_call_and_its_output(oai: openai.OpenAI) -> None:
    called = oai.responses.create(
        model=DEMO,
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
    )
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert set(json.loads(call.arguments)) == {"city"}
    assert called.tools[0].name == "get_weather"
    follow = oai.responses.create(
        model=DEMO,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}],
        tools=[WEATHER],  # type: ignore[list-item]  # as OpenAI's, tools are not carried over
        max_output_tokens=3,
    )
    # The earlier turns came along: the call and its output add to the prompt.
    assert follow.usage.input_tokens > called.usage.input_tokens
    assert follow.previous_response_id == called.id


def test_function_call_items_may_be_sent_back_as_input(client: FlaskClient) -> None:
    body = {
        "input": [
            {"role": "user", "content": "Weather?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"X"}',
            },
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": [{"type": "input_text", "text": "Hot"}],
            },
        ],
        "tools": [WEATHER],
        "max_output_tokens": 2,
    }
    assert client.post("/v1/responses", json=body).status_code == 200
    body["input"][1]["arguments"] = "not json"
    bad = client.post("/v1/responses", json=body).get_json()["error"]
    assert (bad["code"], bad["param"]) == ("invalid_value", "input.1.arguments")


def test_reasoning_comes_as_its_own_item_first(client: FlaskClient) -> None:
    body = {"input": "Think.", "reasoning": {"effort": "low"}, "max_output_tokens": 4}
    answer = client.post("/v1/responses", json=body).get_json()
    assert [item["type"] for item in answer["output"]] == ["reasoning", "message"]
    assert answer["output"][0]["content"][0]["type"] == "reasoning_text"
    plain = client.post("/v1/responses", json={"input": "Think.", "max_output_tokens": 4}).get_json()
    assert [item["type"] for item in plain["output"]] == ["message"]
    streamed = client.post("/v1/responses", json={**body, "stream": True}).get_data(as_text=True)
    added = [
        json.loads(line[6:])["item"]["type"]
        for line in streamed.splitlines()
        if '"response.output_item.added"' in line
    ]
    assert added == ["reasoning", "message"]


def test_previous_response_id_carries_the_image(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=DEMO, input=asking("Look.", (64, 48)), max_output_tokens=2)
    follow = oai.responses.create(
        model=DEMO, previous_response_id=first.id, input="And now?", max_output_tokens=2
    )
    alone = oai.responses.create(model=DEMO, input="And now?", max_output_tokens=2)
    assert follow.usage.input_tokens_details.image_tokens == first.usage.input_tokens_details.image_tokens  # type: ignore[attr-defined]
    assert follow.usage.input_tokens > first.usage.input_tokens > alone.usage.input_tokens


def test_stored_responses_are_read_deleted_and_scoped_to_their_key(make_app: Callable[..., Flask]) -> None:
    app = make_app(api_keys="key-one,key-two")
    with client_of(app, "key-one") as one, client_of(app, "key-two") as two:
        made = one.responses.create(model=DEMO, input="Hi", max_output_tokens=2)
        assert one.responses.retrieve(made.id).output_text == made.output_text
        with pytest.raises(openai.NotFoundError):
            two.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError) as caught:
            two.responses.create(model=DEMO, input="Hi", previous_response_id=made.id)
        assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
        one.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError) as caught:
            one.responses.retrieve(made.id)
        assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
        unstored = one.responses.create(model=DEMO, input="Hi", max_output_tokens=2, store=False)
        with pytest.raises(openai.NotFoundError):
            one.responses.retrieve(unstored.id)


def test_the_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = ResponseStore(2, 10.0, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put("key:x", name, {"response": name})
    assert store.get("key:x", "a") is None  # the oldest went out
    assert store.get("key:x", "c") == {"response": "c"}
    assert store.get("key:y", "c") is None
    now[0] = 11.0
    assert store.get("key:x", "c") is None
    assert not ResponseStore(0, 10.0).enabled


def test_workers_of_one_server_share_the_stored_responses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under glmvision's gunicorn config every worker opens one SQLite file: what one stores, another
    finds; it stays bounded, expires, and keeps each key's responses to that key."""
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    now = [1000.0]
    one, other = (ResponseStore(2, 10.0) for _ in range(2))
    for store in (one, other):
        assert store._file is not None
        store._file.clock = lambda: now[0]
    for name in ("a", "b", "c"):
        one.put("key:x", name, {"response": name})
    assert other.get("key:x", "a") is None  # the oldest went out
    assert other.get("key:x", "c") == {"response": "c"} and other.get("key:y", "c") is None
    assert other.delete("key:x", "b") and one.get("key:x", "b") is None
    now[0] = 1011.0
    assert one.get("key:x", "c") is None and not other.delete("key:x", "c")


def test_a_broken_store_file_loses_the_response_not_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "responses.sqlite").write_bytes(b"not a database" * 100)
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    store = ResponseStore(5, 10.0)
    store.put("key:x", "a", {"response": "a"})
    assert store.get("key:x", "a") is None and not store.delete("key:x", "a")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.0.type"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"include": ["file_search_call.results"]}, "include.0"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.0.content.0.type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input.0.content.0.file_id",
        ),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(
    client: FlaskClient, fields: dict[str, Any], param: str
) -> None:
    sent = client.post("/v1/responses", json={"input": "Hi", **fields})
    assert sent.status_code == 400
    error = sent.get_json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "unsupported_parameter",
        param,
        "invalid_request_error",
    )


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"input": asking("x")[0:0]}, "invalid_value", "input"),
        ({"max_output_tokens": 0}, "invalid_value", "max_output_tokens"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "data:image/png;base64,xx"}],
                    }
                ]
            },
            "invalid_base64",
            "input.0.content.0.image_url",
        ),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": image_url(), "detail": "huge"}],
                    }
                ]
            },
            "invalid_value",
            "input.0.content.0.detail",
        ),
        (
            {
                "input": [
                    {"role": "system", "content": [{"type": "input_image", "image_url": image_url()}]},
                    {"role": "user", "content": "x"},
                ]
            },
            "invalid_value",
            "input.0.content",
        ),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]},
            "unknown_tool",
            "tool_choice",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "bad name!", "schema": {}}}},
            "invalid_value",
            "text.format.name",
        ),
        ({"model": "gpt-4o"}, "model_not_found", "model"),
        ({"previous_response_id": "resp_missing"}, "response_not_found", "previous_response_id"),
    ],
)
def test_errors_name_the_responses_fields(
    client: FlaskClient, fields: dict[str, Any], code: str, param: str
) -> None:
    sent = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2, **fields})
    error = sent.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert "success" not in sent.get_json()


# --- Real clients against real gunicorn ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[tuple[LiveServer, str]]:
    key = secrets.token_hex(16)
    env = server_env(demo_model_dir, runtime_dir, API_KEYS=key, WORKERS="3")
    with live_server(tmp_path_factory.mktemp("responses"), env, ready_path="/readyz") as server:
        yield server, key


def test_any_worker_finds_a_stored_response(served: tuple[LiveServer, str]) -> None:
    """Three workers, a new connection per request (gunicorn hands each to any worker): every stored
    response is found and every follow-up by previous_response_id carries its turns."""
    server, key = served
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
    ids = []
    for index in range(6):
        body = {"model": DEMO, "input": f"Question {index}", "max_output_tokens": 2}
        created = requests.post(server.url + "/v1/responses", json=body, headers=headers, timeout=60)
        assert created.status_code == 200, created.text
        ids.append(created.json()["id"])
    for response_id in ids:
        found = requests.get(f"{server.url}/v1/responses/{response_id}", headers=headers, timeout=60)
        assert found.status_code == 200 and found.json()["id"] == response_id, found.text
        body = {"model": DEMO, "previous_response_id": response_id, "input": "And?", "max_output_tokens": 2}
        follow = requests.post(server.url + "/v1/responses", json=body, headers=headers, timeout=60)
        assert follow.status_code == 200, follow.text


def test_the_official_client_through_gunicorn(served: tuple[LiveServer, str]) -> None:
    server, key = served
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60) as oai:
        whole = oai.responses.create(
            model=DEMO, input=asking("What?", (64, 48)), max_output_tokens=4, temperature=0
        )
        check_shape(whole)
        assert whole.usage.output_tokens == 4
        with oai.responses.stream(
            model=DEMO, input=asking("Red?", (48, 64)), text=FLAG_FORMAT, max_output_tokens=40
        ) as stream:
            final = stream.get_final_response()
        check_shape(final)
        assert set(json.loads(final.output_text)) == {"ok"}
        assert oai.responses.retrieve(final.id).output_text == final.output_text
        follow = oai.responses.create(
            model=DEMO, previous_response_id=whole.id, input="More?", max_output_tokens=2
        )
        assert follow.usage.input_tokens > whole.usage.input_tokens
        assert oai.models.retrieve(DEMO).id == DEMO
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    missing = requests.get(
        server.url + "/v1/responses/resp_nope", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"


def test_langchain_responses_api_with_an_image(served: tuple[LiveServer, str]) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    server, key = served
    llm = ChatOpenAI(
        model=DEMO,
        base_url=server.url + "/v1",
        api_key=key,
        use_responses_api=True,
        max_tokens=4,
        temperature=0,  # greedy: the 4 tokens below are then every run's
        max_retries=0,
    )  # type: ignore[call-arg]
    message = HumanMessage(
        content=[
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": image_url()}},
        ]
    )
    whole = llm.invoke([message])
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 4
    assert isinstance(whole.text, str) and whole.response_metadata["id"].startswith("resp_")
    chunks = list(llm.stream([message]))
    assert chunks
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 4
    assert isinstance(total.text, str)
