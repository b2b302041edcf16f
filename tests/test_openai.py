"""POST /v1/chat/completions and /v1/models through the official `openai` client, on real gunicorn."""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from flask import Flask
from helpers import LiveServer, apart_from_reuse, image_b64, live_server, server_env, wait_for

from glmvision.web.state import app_state

DEMO_ID = "glm-4.6v-flash-demo"
ALIAS = "gpt-4o-mini-alias"
CHAT = "/v1/chat/completions"
HTTP_TIMEOUT = 60.0
PROMPT = "Tell me a story about a red bicycle."
MAX_IMAGES = 3
TOKEN_CAP = 2048  # GLMVISION_MAX_NEW_TOKENS' default
# An answer far longer than HTTP_TIMEOUT takes to generate here (the demo makes ~450 tokens/s).
RUNAWAY = 50_000
CANCELLED = re.compile(r"generation cancelled after (\d+) tokens")
# The error `type` each HTTP status carries.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
# Characters a stop string may safely be made of: printable ASCII, no whitespace.
STOP_SAFE = frozenset(string.ascii_letters + string.digits + string.punctuation)


# --- Servers, clients and requests ---------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A live server and the API key it accepts ("" when keys are off)."""

    server: LiveServer
    key: str = ""

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        """An official client for this server: no retries, so every refusal surfaces."""
        key = (self.key or "unused") if api_key is None else api_key
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def headers(self) -> dict[str, str]:
        """Headers for raw `requests` calls."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post_chat(self, body: dict[str, Any], **kwargs: Any) -> requests.Response:
        """POST a raw chat completion body."""
        return requests.post(
            self.server.url + CHAT, json=body, headers=self.headers(), timeout=HTTP_TIMEOUT, **kwargs
        )


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[Served]:
    """The module's main server: an API key, a model alias and at most three images a request."""
    key = secrets.token_hex(16)
    env = server_env(
        demo_model_dir,
        runtime_dir,
        API_KEYS=key,
        MODEL_ALIASES=ALIAS,
        MAX_IMAGES=str(MAX_IMAGES),
    )
    with live_server(tmp_path_factory.mktemp("openai"), env, ready_path="/readyz") as server:
        yield Served(server, key)


@pytest.fixture(scope="module")
def oai(shared: Served) -> Iterator[openai.OpenAI]:
    """The official client, holding the shared server's key."""
    with shared.client() as client:
        yield client


@pytest.fixture(scope="module")
def single_thread(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[Served]:
    """A one-thread server (requests one after another, each logged before the next); long answers allowed."""
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS=str(RUNAWAY))
    with live_server(tmp_path_factory.mktemp("one-thread"), env, ready_path="/readyz") as server:
        yield Served(server)


def image_url(width: int = 64, height: int = 48) -> str:
    """A PNG as a data URL."""
    return "data:image/png;base64," + image_b64(width, height)


def user(text: str, *images: tuple[int, int]) -> dict[str, Any]:
    """A user message: text, then images of the given sizes."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": image_url(w, h)}} for w, h in images]
    return {"role": "user", "content": parts}


def fixed(tokens: int) -> dict[str, Any]:
    """Client arguments for a greedy, seeded answer of exactly `tokens` tokens (vLLM's min_tokens)."""
    return {"max_tokens": tokens, "temperature": 0, "seed": 7, "extra_body": {"min_tokens": tokens}}


def raw_fixed(tokens: int, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A raw request body for a greedy answer of exactly `tokens` tokens."""
    body = {"messages": messages, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "seed": 7}
    body.update(fields)
    return body


def sse_payloads(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Decode `data:` lines into JSON payloads, ending at `data: [DONE]`."""
    for line in lines:
        if not line:
            continue
        text = line.decode("utf-8")
        assert text.startswith("data: "), text
        if text == "data: [DONE]":
            return
        yield json.loads(text[len("data: ") :])


def content_of(payload: dict[str, Any]) -> str:
    """The content delta of a chunk payload ("" if none)."""
    choices = payload["choices"]
    return (choices[0]["delta"].get("content") or "") if choices else ""


def chat_posts(server: LiveServer) -> int:
    """How many POST /v1/chat/completions request lines (JSON) the server has written."""
    lines = (json.loads(line) for line in server.log().splitlines() if line.startswith('{"time"'))
    return sum(line.get("method") == "POST" and line.get("route") == CHAT for line in lines)


def generated(server: LiveServer, completion_tokens: int) -> int:
    """How many request log lines (JSON) report exactly `completion_tokens` generated tokens."""
    pattern = rf'^\{{"time".*"completion_tokens": {completion_tokens}[,}}]'
    return len(re.findall(pattern, server.log(), flags=re.MULTILINE))


def settle(served: Served) -> None:
    """On a one-thread server, once this answers every earlier request has been logged."""
    assert requests.get(served.server.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200


def middle_piece(content: str, size: int = 3) -> str | None:
    """A stop string cut from the middle of `content`, with real answer text before its first use."""
    middle = (len(content) - size) // 2
    for start in sorted(range(len(content) - size + 1), key=lambda at: abs(at - middle)):
        piece = content[start : start + size]
        first = content.find(piece)
        if set(piece) <= STOP_SAFE and first > 0 and content[:first].strip():
            return piece
    return None


# --- 1. A plain completion and the model list ----------------------------------------------------


def test_models_list_names_the_served_model(oai: openai.OpenAI) -> None:
    """GET /v1/models through the client: exactly the served id, owned by glmvision."""
    models = list(oai.models.list())
    assert [model.id for model in models] == [DEMO_ID]
    assert models[0].object == "model"
    assert models[0].owned_by == "glmvision"
    assert isinstance(models[0].created, int)


def test_plain_completion_has_the_openai_shape(oai: openai.OpenAI) -> None:
    """A text + image request answers a chat.completion that echoes the requested name, alias too."""
    served = next(iter(oai.models.list())).id
    ids: set[str] = set()
    for name in (served, ALIAS):
        completion = oai.chat.completions.create(
            model=name, messages=[user("What is in this picture?", (64, 48))], max_tokens=8
        )
        assert completion.object == "chat.completion"
        assert completion.id.startswith("chatcmpl-")
        assert completion.model == name
        assert isinstance(completion.created, int)
        assert len(completion.choices) == 1
        choice = completion.choices[0]
        assert choice.index == 0
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in {"stop", "length"}
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens > 0
        assert 0 < usage.completion_tokens <= 8
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if choice.finish_reason == "length":
            assert usage.completion_tokens == 8
        ids.add(completion.id)
    assert len(ids) == 2


# --- 2. Streaming --------------------------------------------------------------------------------


def test_stream_chunks_add_up_to_the_whole_answer(shared: Served, oai: openai.OpenAI) -> None:
    """Chunks: role first, one id, one finish reason last, then usage; text and usage as non-streamed."""
    args: dict[str, Any] = {"model": DEMO_ID, "messages": [user(PROMPT, (64, 48))], **fixed(40)}
    whole = oai.chat.completions.create(**args)
    assert whole.usage is not None and whole.usage.completion_tokens == 40
    with oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:] if chunk.choices)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].id != whole.id
    assert {chunk.model for chunk in chunks} == {DEMO_ID}
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices == chunks[:-1]
    finished = [at for at, chunk in enumerate(with_choices) if chunk.choices[0].finish_reason is not None]
    assert finished == [len(with_choices) - 1]
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in with_choices)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 40
    assert apart_from_reuse(final.usage) == apart_from_reuse(whole.usage)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
    assert streamed == whole.choices[0].message.content

    # The wire itself: text/event-stream, `data:` lines only, ending with exactly `data: [DONE]`.
    body = raw_fixed(40, [user(PROMPT, (64, 48))], model=DEMO_ID, stream=True)
    with shared.post_chat(body, stream=True) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    assert lines.count(b"data: [DONE]") == 1
    payloads = list(sse_payloads(iter(lines)))
    assert len(payloads) == len(lines) - 1
    assert all("usage" not in payload for payload in payloads)  # not asked for
    assert "".join(content_of(payload) for payload in payloads) == whole.choices[0].message.content


def test_tokens_are_sent_as_they_are_generated(single_thread: Served) -> None:
    """The first content delta arrives while the 1500-token answer is still being generated."""
    server = single_thread.server
    settle(single_thread)
    posts, done = chat_posts(server), generated(server, 1500)
    body = raw_fixed(1500, [user(PROMPT, (64, 48))], stream=True)
    with single_thread.post_chat(body, stream=True) as response:
        assert response.status_code == 200, response.text
        payloads = sse_payloads(response.iter_lines())
        first = next((content_of(p) for p in payloads if content_of(p)), "")
        assert first, "the stream ended without content"
        # Not finished yet: gunicorn logs the request only once the response is complete.
        log = server.log()
        assert chat_posts(server) == posts, log
        assert generated(server, 1500) == done, log
        rest = list(payloads)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    # Both lines are written once gunicorn has sent the last byte and closed the response.
    assert wait_for(lambda: generated(server, 1500) == done + 1), server.log()
    assert wait_for(lambda: chat_posts(server) == posts + 1), server.log()


def test_disconnect_mid_stream_frees_the_worker(single_thread: Served) -> None:
    """Closing the connection cancels generation early: the next request gets the thread and the model."""
    server = single_thread.server
    settle(single_thread)
    cancelled = len(CANCELLED.findall(server.log()))
    body = raw_fixed(RUNAWAY, [user(PROMPT, (64, 48))], stream=True)
    with single_thread.post_chat(body, stream=True) as response:
        assert response.status_code == 200, response.text
        assert any(content_of(payload) for payload in sse_payloads(response.iter_lines()))
    # Leaving the block closed the connection with the answer unread.
    assert wait_for(lambda: len(CANCELLED.findall(server.log())) > cancelled), server.log()
    tokens = int(CANCELLED.findall(server.log())[cancelled])
    assert 0 < tokens < RUNAWAY

    # One thread, one model lock: this is answered only once the long generation really stopped
    # (left running, it would hold the lock far past HTTP_TIMEOUT and this would time out).
    after = single_thread.post_chat({"messages": [user("Hi", (64, 48))], "max_tokens": 4})
    assert after.status_code == 200, after.text
    assert after.json()["usage"]["completion_tokens"] <= 4
    assert generated(server, RUNAWAY) == 0, server.log()


# --- 3. Images and conversations -----------------------------------------------------------------


def test_two_images_in_one_message(oai: openai.OpenAI) -> None:
    """Two images of different sizes are both read: the prompt is longer than with one."""
    one = oai.chat.completions.create(model=DEMO_ID, messages=[user("Compare", (64, 48))], max_tokens=2)
    two = oai.chat.completions.create(
        model=DEMO_ID, messages=[user("Compare", (64, 48), (96, 128))], max_tokens=2
    )
    assert one.usage is not None and two.usage is not None
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    assert isinstance(two.choices[0].message.content, str)


def test_multi_turn_conversation_keeps_the_first_image(oai: openai.OpenAI) -> None:
    """System, user with image, assistant, user: all of it is in the prompt; assistant-last is refused."""
    first_question = "What is in this picture?"
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You describe pictures."},
        user(first_question, (64, 48)),
        {"role": "assistant", "content": "A blue square with yellow stripes."},
    ]
    question = {"role": "user", "content": "And what colour are the stripes?"}
    full = oai.chat.completions.create(model=DEMO_ID, messages=[*history, question], max_tokens=4)
    assert full.choices[0].message.role == "assistant"
    assert isinstance(full.choices[0].message.content, str)
    imageless = [history[0], user(first_question), history[2], question]
    no_image = oai.chat.completions.create(model=DEMO_ID, messages=imageless, max_tokens=4)
    alone = oai.chat.completions.create(model=DEMO_ID, messages=[question], max_tokens=4)
    assert full.usage is not None and no_image.usage is not None and alone.usage is not None
    assert full.usage.prompt_tokens > no_image.usage.prompt_tokens > alone.usage.prompt_tokens

    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=DEMO_ID, messages=history, max_tokens=4)
    check_error(caught.value, 400, "invalid_value", "messages")


# --- 4. Errors -----------------------------------------------------------------------------------


def check_error(exc: openai.APIStatusError, status: int, code: str, param: str | None) -> None:
    """The client saw our error object: status, code, param and a message."""
    assert exc.status_code == status
    assert isinstance(exc.body, dict)
    assert set(exc.body) == {"message", "type", "code", "param", "errors"}
    assert exc.body["errors"][0] == {"code": code, "param": param, "message": exc.body["message"]}
    assert exc.body["message"]
    assert exc.body["type"] == ERROR_TYPES[status]
    assert (exc.code, exc.param) == (code, param), exc.body
    assert "Traceback" not in exc.response.text


def junk_image_message() -> dict[str, Any]:
    """A user message whose image is a data URL with junk base64."""
    junk = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not*base64??"}}
    return {"role": "user", "content": [{"type": "text", "text": "What is this?"}, junk]}


ERRORS = [
    pytest.param({"n": 9}, openai.BadRequestError, 400, "invalid_value", "n", id="n-over-max"),
    pytest.param(
        {"messages": [junk_image_message()]},
        openai.BadRequestError,
        400,
        "invalid_base64",
        "messages.0.content.1.image_url.url",
        id="junk-base64-image",
    ),
    pytest.param(
        {"model": "no-such-model"}, openai.NotFoundError, 404, "model_not_found", "model", id="unknown-model"
    ),
    pytest.param(
        {"messages": [user("Compare", *[(64, 48)] * (MAX_IMAGES + 1))]},
        openai.BadRequestError,
        400,
        "too_many_images",
        "messages",
        id="too-many-images",
    ),
    pytest.param(
        {"max_tokens": TOKEN_CAP + 1},
        openai.BadRequestError,
        400,
        "invalid_value",
        "max_tokens",
        id="max_tokens",
    ),
    pytest.param(
        {"max_completion_tokens": TOKEN_CAP + 1, "max_tokens": 4},
        openai.BadRequestError,
        400,
        "invalid_value",
        "max_completion_tokens",
        id="max_completion_tokens",
    ),
    pytest.param(
        {
            "messages": [
                user("Hi"),
                {"role": "tool", "content": "42"},
                user("And?"),
            ]
        },
        openai.BadRequestError,
        400,
        "missing_field",
        "messages.1.tool_call_id",
        id="tool-without-call-id",
    ),
    pytest.param(
        {"messages": [user("Hi"), {"role": "function", "content": "42"}]},
        openai.BadRequestError,
        400,
        "invalid_value",
        "messages.1.role",
        id="function-role",
    ),
    pytest.param(
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": "yes"}}},
        openai.BadRequestError,
        400,
        "invalid_type",
        "chat_template_kwargs.enable_thinking",
        id="enable_thinking-str",
    ),
]


@pytest.mark.parametrize(("changes", "error", "status", "code", "param"), ERRORS)
def test_errors_raise_the_matching_client_exception(
    oai: openai.OpenAI,
    changes: dict[str, Any],
    error: type[openai.APIStatusError],
    status: int,
    code: str,
    param: str | None,
) -> None:
    """Each refusal maps to the right openai exception class, carrying our code and param."""
    args: dict[str, Any] = {"model": DEMO_ID, "messages": [user("Hi", (64, 48))], "max_tokens": 4}
    args.update(changes)
    with pytest.raises(error) as caught:
        oai.chat.completions.create(**args)
    check_error(caught.value, status, code, param)


def test_wrong_or_missing_key_is_an_authentication_error(shared: Served) -> None:
    """A wrong key raises AuthenticationError; no key at all is refused as missing."""
    with shared.client(api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=DEMO_ID, messages=[user("Hi")], max_tokens=4)
        check_error(caught.value, 401, "invalid_api_key", None)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    response = requests.post(
        shared.server.url + CHAT, json={"messages": [user("Hi")], "max_tokens": 4}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("missing_api_key", "authentication_error", None)


def test_max_completion_tokens_takes_precedence(oai: openai.OpenAI) -> None:
    """With both limits given, max_completion_tokens decides the length, either way round."""
    messages = [user(PROMPT, (64, 48))]
    short = oai.chat.completions.create(
        model=DEMO_ID,
        messages=messages,
        max_tokens=20,
        max_completion_tokens=5,
        temperature=0,
        extra_body={"min_tokens": 20},
    )
    assert short.usage is not None and short.usage.completion_tokens <= 5
    assert short.usage.completion_tokens == 5  # min_tokens is capped by the limit that applies
    longer = oai.chat.completions.create(
        model=DEMO_ID,
        messages=messages,
        max_tokens=5,
        max_completion_tokens=20,
        temperature=0,
        extra_body={"min_tokens": 20},
    )
    assert longer.usage is not None and longer.usage.completion_tokens == 20


def test_unknown_fields_are_ignored(oai: openai.OpenAI) -> None:
    """Fields the server does not know (top level and extensions) do not fail the request."""
    completion = oai.chat.completions.create(
        model=DEMO_ID,
        messages=[user("Hi", (64, 48))],
        max_tokens=4,
        extra_body={"frequency_penalty_x": 1, "logit_bias_foo": {}, "repetition_penalty_typo": "x"},
    )
    assert completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)


def test_rate_limit_is_a_rate_limit_error(tmp_path: Path, demo_model_dir: Path, runtime_dir: Path) -> None:
    """With 2/minute the third call raises RateLimitError (the client does not retry)."""
    env = server_env(demo_model_dir, runtime_dir, WARMUP="0", RATE_LIMIT="2/minute")
    with live_server(tmp_path, env) as server, Served(server).client() as client:
        assert [model.id for model in client.models.list()] == [DEMO_ID]
        assert [model.id for model in client.models.list()] == [DEMO_ID]
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=DEMO_ID, messages=[user("Hi")], max_tokens=4)
        check_error(caught.value, 429, "rate_limit_exceeded", None)
        retry_after = caught.value.response.headers["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) > 0
        assert "model loaded" not in server.log()  # refused before any work


# --- 5. Stop strings -----------------------------------------------------------------------------


def test_stop_strings_over_http(oai: openai.OpenAI) -> None:
    """`stop` as a string and as a list: the answer is cut right before the first stop string."""
    args: dict[str, Any] = {"model": DEMO_ID, "messages": [user(PROMPT, (64, 48))], **fixed(30)}
    whole = oai.chat.completions.create(**args)
    content = whole.choices[0].message.content or ""
    piece = middle_piece(content)
    assert piece is not None, f"no usable stop string in {content!r}"
    expected = content[: content.find(piece)].rstrip()
    for stop in (piece, ["never-in-the-answer", piece]):
        stopped = oai.chat.completions.create(**args, stop=stop)
        choice = stopped.choices[0]
        assert choice.message.content == expected
        assert choice.finish_reason == "stop"
        assert stopped.usage is not None and stopped.usage.completion_tokens < 30
    for stop in ("e", ["a", "o", "\x12"]):
        answer = oai.chat.completions.create(
            model=DEMO_ID, messages=[user(PROMPT, (64, 48))], max_tokens=30, seed=3, stop=stop
        )
        text = answer.choices[0].message.content or ""
        assert all(item not in text for item in ([stop] if isinstance(stop, str) else stop))


def sse_text(chunks: list[bytes]) -> list[dict[str, Any]]:
    """Parse a whole SSE body into its JSON payloads, checking it ends with [DONE]."""
    events = [event for event in b"".join(chunks).split(b"\n\n") if event]
    assert events[-1] == b"data: [DONE]"
    return list(sse_payloads(iter(events)))


def test_stop_string_cuts_exactly_in_process(make_app: Callable[..., Flask]) -> None:
    """A stop string cut from a greedy answer ends the same answer right before it, streamed or not."""
    app = make_app()
    app_state(app).service.backend.holder.get(timeout=60)
    with app.test_client() as flask_client:

        def post(body: dict[str, Any]) -> dict[str, Any]:
            response = flask_client.post(CHAT, json=body)
            assert response.status_code == 200, response.get_data(as_text=True)
            return response.get_json()

        body: dict[str, Any] = {}
        piece: str | None = None
        for prompt in (PROMPT, "What is in this picture?", "Describe this image in one sentence."):
            body = raw_fixed(30, [user(prompt, (64, 48))])
            whole = post(body)
            content = whole["choices"][0]["message"]["content"]
            if (piece := middle_piece(content)) is not None:
                break
        assert piece is not None, "no greedy answer had a usable stop string"
        expected = content[: content.find(piece)].rstrip()

        stopped = post({**body, "stop": piece})
        assert stopped["choices"][0]["message"]["content"] == expected
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"] == 30

        streaming = {**body, "stop": [piece], "stream": True, "stream_options": {"include_usage": True}}
        response = flask_client.post(CHAT, json=streaming)
        assert response.status_code == 200
        assert response.mimetype == "text/event-stream"
        pieces = [chunk if isinstance(chunk, bytes) else chunk.encode() for chunk in response.response]
        response.close()
        payloads = sse_text(pieces)
        assert len(pieces) == len(payloads) + 1  # one chunk per event, as generated
        assert "".join(content_of(payload) for payload in payloads) == expected
        assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
        assert payloads[-1]["usage"] == stopped["usage"]


# --- 6. Thinking ---------------------------------------------------------------------------------


def test_thinking_adds_reasoning_content(oai: openai.OpenAI) -> None:
    """enable_thinking adds a reasoning_content string; without it the key is absent from the JSON."""
    messages = [user("What is in this picture?", (64, 48))]
    thinking = oai.chat.completions.create(
        model=DEMO_ID,
        messages=messages,
        max_tokens=16,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = thinking.choices[0].message
    assert isinstance((message.model_extra or {}).get("reasoning_content"), str)
    assert isinstance(message.content, str)
    assert "<think>" not in message.content and "</think>" not in message.content

    raw = oai.chat.completions.with_raw_response.create(model=DEMO_ID, messages=messages, max_tokens=16)
    assert raw.status_code == 200
    plain = json.loads(raw.text)["choices"][0]["message"]
    assert "reasoning_content" not in plain
    assert set(plain) == {"role", "content"}
    assert "reasoning_content" not in (raw.parse().choices[0].message.model_extra or {})
