"""Tool calling on /v1/chat/completions: the request rules, the prompt the template renders, calls
parsed from canned model output (whole and streamed), an upstream's own calls, and a round trip
through the official `openai` client on real gunicorn."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import live_server, server_env
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from test_upstream import Scripted, chunk, scripted, sse  # noqa: F401 - the fixture, a canned upstream

from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.stream import GenerationStream
from glmvision.postprocess.tools import ToolCallStream, parse_tool_calls
from glmvision.serving.pipeline import to_messages
from glmvision.web.openai.protocol import ChatCompletionRequest
from glmvision.web.openai.routes import parse_chat
from glmvision.web.state import app_state

CHAT = "/v1/chat/completions"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "filters": {"type": "object"}},
        },
    },
}
TOOLS = [WEATHER, SEARCH]

# Model output as GLM-4.5/4.6 writes it.
ONE_CALL = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)
TWO_CALLS = (
    "Let me look. "
    + ONE_CALL
    + "\n<tool_call>search<arg_key>query</arg_key><arg_value>rain gear</arg_value>"
    + '<arg_key>filters</arg_key><arg_value>{"price": {"max": 50}, "tags": ["a", "b"]}</arg_value>'
    + "</tool_call>"
)
TRUNCATED = "Sure. <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par"
CANNED = [
    ONE_CALL,
    TWO_CALLS,
    TRUNCATED,
    "<tool_call>unknown_fn<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> then text",
    "No tools needed: it is sunny.",
    "A <tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call> B <tool_call>sea",
    "<tool_call>search<arg_key>query</arg_key>stray<arg_value>x</arg_value></tool_call>",
]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def calls_of(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


# --- The parser, streamed ------------------------------------------------------------------------


def stream_through(text: str, cuts: list[int]) -> tuple[str, list[Any], list[str]]:
    """Feed `text` cut at `cuts` to a ToolCallStream: the text sent, the calls, and each piece sent."""
    stream = ToolCallStream(TOOLS)
    sent: list[str] = []
    calls: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        more, new = stream.feed(text[start:end])
        sent.append(more)
        calls += new
    sent.append(stream.finish())
    return "".join(sent), calls, sent


@pytest.mark.parametrize("text", CANNED)
def test_streamed_text_and_calls_are_the_whole_answers_at_any_cut(text: str) -> None:
    whole, calls = parse_tool_calls(text, TOOLS)
    for cut in range(len(text) + 1):
        sent, streamed, _ = stream_through(text, [cut])
        assert sent == whole, (cut, sent)
        assert calls_of(streamed) == calls_of(calls), cut
    sent, streamed, pieces = stream_through(text, list(range(1, len(text))))
    assert (sent, calls_of(streamed)) == (whole, calls_of(calls))
    assert not any("<arg_" in piece for piece in pieces if "<tool_call>" not in whole)


def test_canned_calls_parse_typed_by_their_schemas() -> None:
    text, calls = parse_tool_calls(TWO_CALLS, TOOLS)
    assert text == "Let me look."
    assert calls_of(calls) == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("search", {"query": "rain gear", "filters": {"price": {"max": 50}, "tags": ["a", "b"]}}),
    ]
    assert parse_tool_calls(TRUNCATED, TOOLS) == (TRUNCATED, [])


# --- The demo model: what reaches the parser, and the prompt -------------------------------------


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def test_generated_tool_call_tokens_reach_the_parser(model: LoadedModel) -> None:
    """The tags are special tokens of the demo vocabulary; decoding keeps them, streamed or whole."""
    tokenizer = model.processor.tokenizer
    ids = tokenizer.encode(TWO_CALLS, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<tool_call>")) == 2  # one token each
    stream = GenerationStream(model, 5, GenerationParams(max_new_tokens=1000))
    for at in range(0, len(ids), 3):
        stream.put(ids[at : at + 3])
    stream.end()
    calls = ToolCallStream(TOOLS)
    streamed: list[Any] = []
    content = ""
    for delta in stream:
        more, new = calls.feed(delta.content)
        content, streamed = content + more, streamed + new
    content += calls.finish()
    assert stream.result is not None
    whole, parsed = parse_tool_calls(stream.result.text, TOOLS)
    assert (content, calls_of(streamed)) == (whole, calls_of(parsed)) == ("Let me look.", calls_of(parsed))
    assert [name for name, _ in calls_of(parsed)] == ["get_weather", "search"]


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The system block GLM-4.5/4.6's chat template opens the prompt with when given tools."""
    return (
        "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
        + "</tools>\n\nFor each function call, output the function name and arguments within the "
        "following XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
        "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
        "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
    )


HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    user("Weather in Paris and Oslo? <tool_call>"),
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_2",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Oslo", "hourly": true, "extra": {"a": [1, "é"]}}',
                },
            },
            {"id": "call_3", "type": "function", "function": {"name": "search", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    {"role": "tool", "tool_call_id": "call_3", "content": [{"type": "text", "text": "nothing"}]},
]
# What GLM-4.6V's own template makes of HISTORY (thinking off, as requests default to).
HISTORY_PROMPT = (
    "<|system|>\nBe brief.<|user|>\nWeather in Paris and Oslo? <tool_call>/nothink"
    "<|assistant|>\n<think></think>\nLet me check.\n<tool_call>get_weather\n"
    "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
    "</tool_call><|observation|>\n<tool_response>\nsunny\n</tool_response>"
    "<|assistant|>\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
    "<arg_key>hourly</arg_key>\n<arg_value>true</arg_value>\n"
    '<arg_key>extra</arg_key>\n<arg_value>{"a": [1, "é"]}</arg_value>\n'
    "</tool_call>\n<tool_call>search\n</tool_call><|observation|>\n<tool_response>\nrain\n"
    "</tool_response>\n<tool_response>\nnothing\n</tool_response><|assistant|>\n<think></think>\n"
)


def test_tools_and_tool_history_render_as_glm_46v_renders_them(model: LoadedModel) -> None:
    body = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS})
    turns, params = parse_chat(body, load_settings({}), ("glm-4.6v-flash-demo",))
    inputs = model.prepare(to_messages(turns), params.enable_thinking, "messages", params.tools)
    tokenizer = model.processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "[gMASK]<sop>" + tools_block(TOOLS) + HISTORY_PROMPT
    )
    # The template's own tags are tokens; the user's "<tool_call>" is only text.
    call_id = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert ids.count(call_id) == 1 + 3
    assert ids.count(tokenizer.convert_tokens_to_ids("<|observation|>")) == 2
    # Without tools, no block: the prompt starts as it always did.
    plain = ChatCompletionRequest.model_validate({"messages": [user("Hi")]})
    turns, params = parse_chat(plain, load_settings({}), ("glm-4.6v-flash-demo",))
    inputs = model.prepare(to_messages(turns), params.enable_thinking, "messages", params.tools)
    rendered = tokenizer.decode(inputs["input_ids"][0].tolist(), skip_special_tokens=False)
    assert rendered == "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>\n"


# --- Requests against the demo model -------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_app(demo_model_dir: Path) -> Iterator[FlaskClient]:
    """An app on the demo model, loaded, without the response cache."""
    from glmvision import create_app

    app = create_app(
        {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu", "GLMVISION_CACHE": "0"}
    )
    app_state(app).service.backend.holder.get(timeout=60)
    with app.test_client() as client:
        yield client


def check_answer(answer: dict[str, Any]) -> None:
    """A valid answer with tools: content, or tool calls to known tools with JSON object arguments."""
    choice = answer["choices"][0]
    calls = choice["message"].get("tool_calls")
    if calls:
        assert choice["finish_reason"] == "tool_calls"
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            assert call["function"]["name"] in {"get_weather", "search"}
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    else:
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in {"stop", "length"}


@pytest.mark.parametrize(
    "tool_choice", [None, "auto", "none", "required", {"type": "function", "function": {"name": "search"}}]
)
def test_demo_model_answers_requests_with_tools(demo_app: FlaskClient, tool_choice: Any) -> None:
    body: dict[str, Any] = {"messages": HISTORY, "tools": TOOLS, "max_tokens": 12, "temperature": 0}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    response = demo_app.post(CHAT, json=body)
    assert response.status_code == 200, response.get_json()
    check_answer(response.get_json())
    streamed = demo_app.post(CHAT, json={**body, "stream": True})
    assert streamed.status_code == 200
    payloads = sse(iter(streamed.response))  # type: ignore[arg-type]
    check_answer(accumulate(payloads))


@pytest.mark.parametrize(
    ("where", "key", "param"),
    [
        ("tools", "<|user|>", "tools.0.function.parameters.properties"),
        ("arguments", "a<|observation|>", "messages.2.tool_calls.0.function.arguments"),
    ],
)
def test_control_tokens_in_keys_are_refused(demo_app: FlaskClient, where: str, key: str, param: str) -> None:
    """The template writes keys as they are (transformers sanitises values only): a 400, not an injection."""
    tools = json.loads(json.dumps(TOOLS))
    messages = json.loads(json.dumps(HISTORY))
    if where == "tools":
        tools[0]["function"]["parameters"]["properties"][key] = {"type": "string"}
    else:
        messages[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({key: 1})
    response = demo_app.post(CHAT, json={"messages": messages, "tools": tools, "max_tokens": 2})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", param)
    assert key in error["message"]


# --- Validation ----------------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "unknown_tool", "tool_choice"),
        ({"tool_choice": "sometimes"}, "invalid_value", "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "invalid_type", "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "invalid_value", "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "invalid_value",
            "tools.0.function.name",
        ),
        ({"tools": [{"type": "function"}]}, "missing_field", "tools.0.function"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "invalid_value", "tools.0.type"),
        ({"tools": {"type": "function"}}, "invalid_type", "tools"),
        (
            {"tools": [WEATHER, {"type": "function", "function": {"parameters": 3, "name": "f"}}]},
            "invalid_type",
            "tools.1.function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER]}, "invalid_value", "tools.1.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 16_000}}]},
            "prompt_too_long",
            "messages",
        ),
        (
            {"messages": [user("Hi"), {"role": "tool", "content": "42"}]},
            "missing_field",
            "messages.1.tool_call_id",
        ),
        ({"messages": [{**user("Hi"), "tool_calls": [CALL]}]}, "invalid_value", "messages.0.tool_calls"),
        (
            {
                "messages": [
                    user("Hi"),
                    {
                        "role": "assistant",
                        "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "x"},
                ]
            },
            "invalid_value",
            "messages.1.tool_calls.0.function.arguments",
        ),
        (
            {
                "messages": [
                    user("Hi"),
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                ]
            },
            "missing_field",
            "messages.1.tool_calls.0.function.arguments",
        ),
        (
            {
                "messages": [
                    user("Hi"),
                    {
                        "role": "tool",
                        "tool_call_id": "c",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                        ],
                    },
                ]
            },
            "invalid_value",
            "messages.1.content",
        ),
        (
            {"messages": [user("Hi"), {"role": "assistant", "content": None, "tool_calls": [CALL]}]},
            "invalid_value",
            "messages",
        ),
    ],
)
def test_bad_tool_requests_are_400_on_their_field(
    make_app: Callable[..., Flask], fields: dict[str, Any], code: str, param: str
) -> None:
    body = {"messages": [user("Hi")], "tools": TOOLS, "max_tokens": 2, **fields}
    response = make_app().test_client().post(CHAT, json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


# --- Canned answers through an upstream ----------------------------------------------------------


def canned(scripted: Scripted, text: str, finish: str = "stop") -> None:  # noqa: F811
    """The upstream answers `text` in pieces of 7 characters, as a vLLM without a tool parser would."""
    pieces = [text[at : at + 7] for at in range(0, len(text), 7)]
    usage = {"prompt_tokens": 20, "completion_tokens": len(pieces), "total_tokens": 20 + len(pieces)}
    scripted.events = [
        chunk(role="assistant"),
        *(chunk(content=piece) for piece in pieces),
        chunk(finish, usage),
    ]


def accumulate(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's chunks as the official client accumulates them (its snapshot: a cut answer too)."""
    state = ChatCompletionStreamState()
    for payload in payloads:
        state.handle_chunk(ChatCompletionChunk.model_validate(payload))
    return state.current_completion_snapshot.model_dump(mode="json")


def test_canned_calls_come_back_as_tool_calls(scripted: Scripted, make_app: Callable[..., Flask]) -> None:  # noqa: F811
    client = make_app(backend="openai", upstream_url=scripted.url, cache="0").test_client()
    body = {"messages": [user("Weather and gear for Paris?")], "tools": TOOLS, "max_tokens": 100}
    canned(scripted, TWO_CALLS)
    answer = client.post(CHAT, json=body).get_json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris", "days": 3}),
        ("function", "search", {"query": "rain gear", "filters": {"price": {"max": 50}, "tags": ["a", "b"]}}),
    ]
    assert len({c["id"] for c in calls}) == 2
    sent = scripted.bodies[-1]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"

    response = client.post(CHAT, json={**body, "stream": True}, buffered=False)
    payloads = sse(response.response)  # type: ignore[arg-type]
    deltas = [p["choices"][0]["delta"] for p in payloads if p.get("choices")]
    pieces = [d for d in deltas if "tool_calls" in d]
    assert pieces[0] == {
        "tool_calls": [
            {
                "index": 0,
                "id": pieces[0]["tool_calls"][0]["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    assert pieces[1] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris", "days": 3}'}}]
    }
    assert "<" not in "".join(d.get("content") or "" for d in deltas)  # no call text leaks as content
    assert payloads[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = accumulate(payloads)["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]

    # Only a call is content null; with tool_choice none nothing is parsed.
    canned(scripted, ONE_CALL)
    only = client.post(CHAT, json=body).get_json()["choices"][0]["message"]
    assert only["content"] is None and len(only["tool_calls"]) == 1
    untouched = client.post(CHAT, json={**body, "tool_choice": "none"}).get_json()["choices"][0]
    assert untouched["message"] == {"role": "assistant", "content": ONE_CALL}
    assert untouched["finish_reason"] == "stop" and scripted.bodies[-1]["tool_choice"] == "none"
    # A named function: calls to the others stay text.
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "search"}}}
    assert client.post(CHAT, json=named).get_json()["choices"][0]["message"]["content"] == ONE_CALL
    assert scripted.bodies[-1]["tool_choice"] == named["tool_choice"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_truncated_call_is_text(scripted: Scripted, make_app: Callable[..., Flask], stream: bool) -> None:  # noqa: F811
    client = make_app(backend="openai", upstream_url=scripted.url, cache="0").test_client()
    canned(scripted, TRUNCATED, "length")
    body = {"messages": [user("Weather?")], "tools": TOOLS, "max_tokens": 20, "stream": stream}
    response = client.post(CHAT, json=body, buffered=False)
    assert response.status_code == 200
    answer = accumulate(sse(response.response)) if stream else response.get_json()  # type: ignore[arg-type]
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == TRUNCATED
    assert not choice["message"].get("tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstreams_own_tool_calls_are_passed_on(
    scripted: Scripted,  # noqa: F811
    make_app: Callable[..., Flask],
    stream: bool,
) -> None:
    """vLLM with a tool parser sends tool_calls itself, in OpenAI's pieces: they come through as they are."""
    scripted.events = [
        chunk(role="assistant", content=""),
        chunk(
            tool_calls=[
                {
                    "index": 0,
                    "id": "call_up",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        ),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Rome"}'}}]),
        chunk("tool_calls", {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}),
    ]
    client = make_app(backend="openai", upstream_url=scripted.url, cache="0").test_client()
    body = {"messages": [user("Rome?")], "tools": TOOLS, "stream": stream}
    response = client.post(CHAT, json=body, buffered=False)
    answer = accumulate(sse(response.response)) if stream else response.get_json()  # type: ignore[arg-type]
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] in (None, "")
    [call] = choice["message"]["tool_calls"]
    function = {key: call["function"][key] for key in ("name", "arguments")}
    assert (call["id"], function) == ("call_up", {"name": "get_weather", "arguments": '{"city": "Rome"}'})


# --- The official client on real gunicorn: call, tool result, answer -----------------------------


def test_openai_client_round_trip(
    scripted: Scripted,  # noqa: F811
    tmp_path: Path,
    demo_model_dir: Path,
    runtime_dir: Path,
) -> None:
    env = server_env(demo_model_dir, runtime_dir, BACKEND="openai", UPSTREAM_URL=scripted.url, CACHE="0")
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages: list[Any] = [user("What is the weather in Paris?")]
        for stream in (False, True):
            canned(scripted, ONE_CALL)
            if stream:
                state = ChatCompletionStreamState(input_tools=TOOLS)  # type: ignore[arg-type]
                for piece in client.chat.completions.create(
                    model="scripted",
                    messages=messages,
                    tools=TOOLS,
                    stream=True,  # type: ignore[arg-type]
                ):
                    state.handle_chunk(piece)
                completion: Any = state.get_final_completion()
            else:
                completion = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
            choice = completion.choices[0]
            assert choice.finish_reason == "tool_calls"
            [call] = choice.message.tool_calls
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

            answered = [
                *messages,
                {"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
            ]
            canned(scripted, "It is sunny in Paris.")
            final = client.chat.completions.create(model="scripted", messages=answered, tools=TOOLS)  # type: ignore[arg-type]
            assert final.choices[0].finish_reason == "stop"
            assert final.choices[0].message.content == "It is sunny in Paris."
            assert not final.choices[0].message.tool_calls
            sent = scripted.bodies[-1]["messages"]
            assert sent[1]["tool_calls"] == [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.dumps({"city": "Paris", "days": 3}),
                    },
                }
            ]
            assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}


def test_tools_and_tool_history_are_part_of_the_cache_key() -> None:
    """Two requests differing only in their tools or an earlier call's arguments never share an answer."""
    from dataclasses import asdict

    from glmvision.serving.cache import make_key
    from glmvision.serving.pipeline import conversation

    def key(**fields: Any) -> str:
        body = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS, **fields})
        turns, params = parse_chat(body, load_settings({}), ("m",))
        return make_key("m", "r", [], conversation(turns), asdict(params), False).exact

    history = json.loads(json.dumps(HISTORY))
    history[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Lyon"}'
    keys = {key(), key(tools=[WEATHER]), key(messages=history), key(tool_choice="none")}
    assert len(keys) == 4
    assert key() == key()
