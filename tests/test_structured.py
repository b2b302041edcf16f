"""Structured outputs: a grammar masks the logits, so even the random-weight demo model answers JSON
that validates against the request's schema, streamed or not, under either scheduler."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
import torch
from flask import Flask
from helpers import LiveServer, image_b64, live_server, server_env
from pydantic import BaseModel, Field
from test_continuous import tokens
from test_upstream import Scripted, chunk, scripted  # noqa: F401 - the fixture, a canned upstream

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import Job
from glmvision.backends.local.grammar import TAG_FREE_CHARACTER, GrammarBook, json_safe, tag_free
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.sampling import RowSampling, choose_tokens
from glmvision.backends.local.static import StaticEngine
from glmvision.core.backend import Admission
from glmvision.core.config import load_settings
from glmvision.core.constraints import json_constraint
from glmvision.core.generation import Constraint, GenerationParams
from glmvision.web.app import create_app

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
    },
    "required": ["name", "age"],
}
NESTED = {
    "type": "object",
    "properties": {
        "invoice": {
            "type": "object",
            "properties": {
                "number": {"type": "string", "minLength": 3},
                "total": {"type": "number", "minimum": 0, "maximum": 10000},
                "paid": {"type": "boolean"},
            },
            "required": ["number", "total", "paid"],
        },
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"item": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["item", "qty"],
            },
        },
    },
    "required": ["invoice", "lines"],
}
ENUMS = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 2},
        "score": {"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 1},
        "note": {"type": ["string", "null"]},
    },
    "required": ["colour", "tags", "score", "note"],
}
GAUGE = {  # seed 003's example: reading an industrial gauge into fields
    "type": "object",
    "properties": {
        "reading": {"type": "number"},
        "unit": {"enum": ["bar", "psi", "kPa"]},
        "in_range": {"type": "boolean"},
    },
    "required": ["reading", "unit", "in_range"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "enums": ENUMS, "gauge": GAUGE}


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


@pytest.fixture(scope="module", params=["continuous", "static"])
def app(request: pytest.FixtureRequest, demo_model_dir: Path) -> Flask:
    return create_app(
        {
            "GLMVISION_MODEL": str(demo_model_dir),
            "GLMVISION_DEVICE": "cpu",
            "GLMVISION_SCHEDULER": request.param,
        }
    )


def chat(schema: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(96, 64)}}
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "Read the form as JSON."}]}
        ],
        "max_tokens": 160,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}}
    body.update(fields)
    return body


def streamed_text(app: Flask, body: dict[str, Any]) -> tuple[str, str]:
    """The content and finish reason of a streamed chat completion."""
    response = app.test_client().post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200
    content, finish = "", ""
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            content += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return content, finish


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_answer_validates_against_its_schema(app: Flask, name: str, temperature: float) -> None:
    """Whole and streamed, greedy and sampled: the demo model's answer parses and validates."""
    schema = SCHEMAS[name]
    body = chat(schema, temperature=temperature)
    response = app.test_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_json()
    choice = response.get_json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert choice["finish_reason"] == "stop"
    content, finish = streamed_text(app, body)
    jsonschema.validate(json.loads(content), schema)
    assert finish == "stop"


def test_json_object_gives_an_object_and_text_gives_free_text(app: Flask) -> None:
    client = app.test_client()
    answer = client.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
    assert isinstance(json.loads(answer.get_json()["choices"][0]["message"]["content"]), dict)
    free = client.post("/v1/chat/completions", json=chat(response_format={"type": "text"}, temperature=0))
    plain = client.post("/v1/chat/completions", json=chat(temperature=0))
    assert free.get_json()["choices"][0]["message"] == plain.get_json()["choices"][0]["message"]


def test_the_native_endpoint_takes_a_json_schema(app: Flask) -> None:
    response = app.test_client().post(
        "/v1/chat/vision",
        json={"image": image_b64(), "prompt": "Read the gauge.", "json_schema": GAUGE, "max_new_tokens": 60},
    )
    assert response.status_code == 200, response.get_json()
    jsonschema.validate(json.loads(response.get_json()["result"]), GAUGE)


def test_thinking_ends_in_time_for_the_document(app: Flask) -> None:
    """With thinking on, the reasoning is free and the grammar starts after </think>: the answer
    part still validates, because the reasoning is closed while the budget holds the document."""
    body = chat(PERSON, temperature=0, chat_template_kwargs={"enable_thinking": True}, max_tokens=120)
    message = app.test_client().post("/v1/chat/completions", json=body).get_json()["choices"][0]["message"]
    assert message["reasoning_content"]
    jsonschema.validate(json.loads(message["content"]), PERSON)


def test_a_budget_too_small_for_the_document_ends_by_length(app: Flask) -> None:
    """Validity holds whenever the budget holds the shortest document; below that, the answer is cut,
    and its finish reason says so (as OpenAI's does)."""
    body = chat(NESTED, temperature=0, max_tokens=8)
    choice = app.test_client().post("/v1/chat/completions", json=body).get_json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize(
    ("response_format", "code", "param"),
    [
        ({"type": "json_schema"}, "missing_field", "response_format"),
        ({"type": "xml"}, "invalid_value", "response_format.type"),
        (
            {"type": "json_schema", "json_schema": {"schema": PERSON}},
            "missing_field",
            "response_format.json_schema.name",
        ),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}}, "invalid_value", None),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "invalid_type", None),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
            "invalid_schema",
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
            "invalid_schema",
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_formats_are_clear_400s(app: Flask, response_format: Any, code: str, param: str | None) -> None:
    response = app.test_client().post("/v1/chat/completions", json=chat(response_format=response_format))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in error["message"] and ".cc:" not in error["message"]


def test_a_schema_over_the_size_limit_is_refused_before_compiling(demo_model_dir: Path) -> None:
    small = create_app(
        {
            "GLMVISION_MODEL": str(demo_model_dir),
            "GLMVISION_DEVICE": "cpu",
            "GLMVISION_MAX_SCHEMA_BYTES": "200",
        }
    )
    client = small.test_client()
    fits = client.post("/v1/chat/completions", json=chat(GAUGE, max_tokens=60))
    assert fits.status_code == 200
    response = client.post("/v1/chat/completions", json=chat(NESTED))
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "schema_too_large"
    assert response.get_json()["error"]["param"] == "response_format.json_schema.schema"
    native = client.post("/v1/chat/vision", json={"image": image_b64(), "prompt": "x", "json_schema": NESTED})
    assert native.get_json()["error"] == {
        **native.get_json()["error"],
        "code": "schema_too_large",
        "param": "json_schema",
    }


def test_the_schema_is_canonical_text_keeping_its_key_order() -> None:
    settings = load_settings({})
    first = json_constraint({"b": 1, "a": {"type": "object"}}, settings, "json_schema")
    assert first.schema == '{"b":1,"a":{"type":"object"}}'
    assert first == json_constraint({"b": 1, "a": {"type": "object"}}, settings, "elsewhere")
    assert json_constraint(None, settings, "response_format") == Constraint(None)


def test_a_constraint_drops_min_tokens_wherever_params_are_made() -> None:
    """The grammar decides where the document ends, for a response_format and a forced call alike."""
    free = GenerationParams(max_new_tokens=50, min_new_tokens=20)
    assert free.min_new_tokens == 20
    assert replace(free, constraint=Constraint(None)).min_new_tokens == 0
    assert (
        GenerationParams(
            max_new_tokens=50, min_new_tokens=20, constraint=Constraint(tools="[]")
        ).min_new_tokens
        == 0
    )


# The grammar book and rows, on the demo model's tokenizer.


@pytest.mark.parametrize(
    ("token", "safe"),
    [
        (b"abc", True),
        ("é€한".encode(), True),  # U+D55C is \xed\x95\x9c: below the surrogates
        (b"\xed\x9f\xbf", True),
        (b"a\x07", False),
        (b"\n", False),
        (b"\xed\xa0\x80", False),
        (b"x\xed", False),
        (b"\xed\xbf", False),
    ],
)
def test_tokens_that_compact_json_never_holds_are_barred(token: bytes, safe: bool) -> None:
    assert json_safe(token) is safe


def test_grammars_are_compiled_once_per_schema(model: LoadedModel) -> None:
    book = GrammarBook(model.processor.tokenizer, 512, model.stop_ids)
    one = Constraint(json.dumps(PERSON))
    first = book.compile(one)
    assert (book.compiled, book.hits) == (1, 0)
    assert book.compile(Constraint(json.dumps(PERSON))).grammar is first.grammar
    assert (book.compiled, book.hits) == (1, 1)
    book.compile(Constraint(json.dumps(GAUGE)))
    assert (book.compiled, book.hits) == (2, 1)


def test_control_tokens_never_appear_in_constrained_text(model: LoadedModel) -> None:
    """<|image|>, <think>, <tool_call>... are special: a string in the document can never hold one."""
    book = model.grammars()
    tokenizer = model.processor.tokenizer
    grammar = book.compile(
        Constraint('{"type":"object","properties":{"s":{"type":"string"}},"required":["s"]}')
    )
    row = grammar.start(budget=400, after_thinking=False)
    specials = sorted({*tokenizer.all_special_ids, *tokenizer.added_tokens_decoder})
    for token in tokenizer.encode('{"s": "', add_special_tokens=False):
        row.accept(token)
    logits = torch.zeros(1, 512)
    logits[0, specials] = 100.0  # the model wants nothing but control tokens
    assert row.constrain(logits, 4) is None
    assert torch.isinf(logits[0, specials]).all()
    assert int(logits.argmax()) not in specials


def test_a_token_outside_the_grammar_is_reported_and_following_it_is_quiet(
    model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    compiled = model.grammars().compile(Constraint(json.dumps(GAUGE)))
    tokenizer = model.processor.tokenizer
    row = compiled.start(budget=100, after_thinking=False)
    with caplog.at_level("WARNING", logger="glmvision"):
        for token in tokenizer.encode('{"reading": 1', add_special_tokens=False):
            row.accept(token)
        assert "outside its grammar" not in caplog.text
        (letter,) = tokenizer.encode("x", add_special_tokens=False)
        row.accept(letter)  # a number cannot go on with a letter
    assert f"a constrained row took token {letter} outside its grammar" in caplog.text


def random_walk(
    model: LoadedModel, schema: dict[str, Any], budget: int, seed: int, temperature: float
) -> list[int]:
    """Tokens a row takes under its grammar when the logits are noise."""
    compiled = model.grammars().compile(Constraint(json.dumps(schema)))
    params = GenerationParams(max_new_tokens=budget, temperature=temperature, seed=seed)
    row = RowSampling.for_params(params, "cpu", compiled)
    generator = torch.Generator().manual_seed(seed)
    stop = torch.tensor(model.stop_ids)
    taken: list[int] = []
    while len(taken) < budget:
        logits = torch.randn(1, 512, generator=generator) * 4
        (token,) = choose_tokens(logits, [row], [len(taken)], stop)
        taken.append(token)
        if token in model.stop_ids:
            break
    return taken


@pytest.mark.parametrize("name", SCHEMAS)
def test_noise_under_a_grammar_closes_within_any_budget_that_holds_the_document(
    model: LoadedModel, name: str
) -> None:
    """From the shortest document's length up, every budget ends in a valid document and a stop token."""
    schema = SCHEMAS[name]
    book = model.grammars()
    compiled = book.compile(Constraint(json.dumps(schema)))
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(1, 512)
    shortest = book.closing_length(
        xgrammar.GrammarMatcher(compiled.grammar), bitmask, compiled.closers, compiled.probe
    )
    rng = random.Random(name)
    for budget in [shortest, shortest + 1, shortest + 7, *(rng.randrange(shortest, 300) for _ in range(4))]:
        for temperature in (0.0, 1.0):
            taken = random_walk(model, schema, budget, rng.randrange(1000), temperature)
            assert len(taken) <= budget and taken[-1] in model.stop_ids, (budget, temperature)
            jsonschema.validate(json.loads(model.decode(taken[:-1])), schema)


# Constrained and free rows share batches, each row as it would be alone.

ADMISSION = Admission(10_000, 600, lambda: 0.0)


def requests_for(model: LoadedModel) -> list[tuple[Any, GenerationParams, Any, dict[str, Any] | None]]:
    def prepared(prompt: str) -> Any:
        return model.prepare(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}], enable_thinking=False
        )

    person = model.grammars().compile(Constraint(json.dumps(PERSON)))
    gauge = model.grammars().compile(Constraint(json.dumps(GAUGE)))
    greedy = GenerationParams(max_new_tokens=60, temperature=0)
    return [
        (prepared("describe the picture"), greedy, None, None),
        (prepared("read the form please"), greedy, person, PERSON),
        (prepared("what is the reading"), greedy, gauge, GAUGE),
        (prepared("and the colours"), GenerationParams(max_new_tokens=24, temperature=0), None, None),
    ]


def job(engine: ContinuousEngine | StaticEngine, request: tuple[Any, ...]) -> Job:
    one = engine._job(request[0], request[1], ADMISSION.admit())
    one.constraint = request[2]
    return one


def test_constrained_and_free_rows_share_a_batch_under_both_schedulers(model: LoadedModel) -> None:
    requests = requests_for(model)
    settings = load_settings({"GLMVISION_MAX_BATCH_SIZE": "8"})
    alone = []
    for request in requests:
        single = StaticEngine(model, settings)
        one = job(single, request)
        single._serve_alone(one)
        alone.append(tokens(one.stream))
    static = StaticEngine(model, settings)
    batch = [job(static, request) for request in requests]
    static._run(batch)
    assert static.stats.largest_batch == len(requests)
    assert [tokens(one.stream) for one in batch] == alone
    continuous = ContinuousEngine(model, settings)
    rows = [job(continuous, request) for request in requests]
    continuous._join(rows[:2])
    continuous._step()
    continuous._join(rows[2:])  # joining a running batch mid-way
    while continuous._rows:
        continuous._step()
    assert continuous.stats.largest_batch == len(requests)
    assert [tokens(one.stream) for one in rows] == alone
    for one, (*_, schema) in zip(rows, requests, strict=True):
        if schema is not None:
            jsonschema.validate(json.loads(model.decode(one.stream.token_ids[:-1])), schema)


# Real clients against real gunicorn.


class Gauge(BaseModel):
    """A gauge read from a photo (seed 003's example)."""

    reading: float
    unit: Literal["bar", "psi", "kPa"]
    in_range: bool


class Invoice(BaseModel):
    """Fields of a photographed invoice (seed 000's forms)."""

    number: str = Field(max_length=12)
    total: float = Field(ge=0, le=10_000)
    lines: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS="200")
    with live_server(tmp_path_factory.mktemp("structured"), env, ready_path="/readyz") as live:
        yield live


def test_langchain_with_structured_output_returns_a_parsed_object(server: LiveServer) -> None:
    """LangChain's ChatOpenAI, as a user would point it at us: json_schema mode gives pydantic objects."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        model="glm-4.6v-flash-demo",
        max_tokens=150,
        temperature=0,
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(80, 60)}}
    question = [("user", [image, {"type": "text", "text": "Read the gauge."}])]
    gauge = llm.with_structured_output(Gauge, method="json_schema").invoke(question)
    assert isinstance(gauge, Gauge)
    invoices = llm.with_structured_output(Invoice, method="json_schema").batch([question, question])
    assert all(isinstance(invoice, Invoice) for invoice in invoices)
    assert invoices[0] == invoices[1]  # greedy: the same question, the same fields


def test_the_openai_clients_parse_helper_gets_its_model(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model="glm-4.6v-flash-demo",
        messages=[{"role": "user", "content": "Extract the invoice."}],
        response_format=Invoice,
        max_tokens=150,
        temperature=1.0,
    )
    assert isinstance(completion.choices[0].message.parsed, Invoice)
    with client.chat.completions.stream(
        model="glm-4.6v-flash-demo",
        messages=[{"role": "user", "content": "Extract the invoice."}],
        response_format=Invoice,
        max_tokens=150,
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Invoice)


# Forced tool calls: the same engine, over GLM's <tool_call> format.

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"enum": ["c", "f"]},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            },
            "required": ["city", "days", "units", "where"],
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query", "tags"],
        },
    },
}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, LOOKUP)}


def streamed_calls(app: Flask, body: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Tool calls accumulated from a stream's deltas, as OpenAI clients do, and the finish reason."""
    response = app.test_client().post("/v1/chat/completions", json={**body, "stream": True})
    calls: dict[int, dict[str, str]] = {}
    finish = ""
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
                call["name"] += delta.get("function", {}).get("name") or ""
                call["arguments"] += delta.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return list(calls.values()), finish


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "lookup"}),
        ({"type": "function", "function": {"name": "lookup"}}, {"lookup"}),
    ],
)
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_forced_tool_choice_gets_a_call_whose_arguments_validate(
    app: Flask, tool_choice: Any, names: set[str], temperature: float
) -> None:
    body = chat(tools=[WEATHER, LOOKUP], tool_choice=tool_choice, max_tokens=200, temperature=temperature)
    response = app.test_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_json()
    choice = response.get_json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])
    calls, finish = streamed_calls(app, body)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["name"] in names
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


def test_langchain_function_calling_returns_an_object_from_the_demo_model(server: LiveServer) -> None:
    """with_structured_output(method="function_calling") forces a call of the model's schema."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model="glm-4.6v-flash-demo", max_tokens=150
    )
    gauge = llm.with_structured_output(Gauge, method="function_calling").invoke("Read the gauge.")
    assert isinstance(gauge, Gauge)


def test_length_bounded_strings_in_tool_schemas_become_tag_free_patterns() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 5},
            "any": {"type": ["string", "null"], "maxLength": 3},
            "code": {"type": "string", "maxLength": 4, "pattern": "^[A-Z]+$"},
            "kind": {"type": "string", "maxLength": 9, "enum": ["a", "b"]},
            "day": {"type": "string", "maxLength": 10, "format": "date"},
            "fixed": {"type": "string", "maxLength": 3, "const": "abc"},
            "free": {"type": "string"},
            "list": {"type": "array", "items": {"type": "string", "minLength": 1}},
        },
    }
    converted = tag_free(schema)["properties"]
    assert converted["name"] == {"type": "string", "pattern": f"^{TAG_FREE_CHARACTER}{{2,5}}$"}
    assert converted["any"] == {"type": ["string", "null"], "pattern": f"^{TAG_FREE_CHARACTER}{{0,3}}$"}
    assert converted["code"] == schema["properties"]["code"]  # a pattern of its own is kept as it is
    for kept in ("kind", "day", "fixed"):  # an enum, format or const says more than a pattern could
        assert converted[kept] == schema["properties"][kept]
    assert converted["free"] == {"type": "string"}
    assert converted["list"]["items"] == {"type": "string", "pattern": f"^{TAG_FREE_CHARACTER}{{1,}}$"}
    assert schema["properties"]["name"]["maxLength"] == 5  # the request's own schema is untouched
    pattern = re.compile(converted["name"]["pattern"])
    assert pattern.match("abcde") and not pattern.match("a") and not pattern.match("abcdef")
    assert not pattern.match("a<b") and not pattern.match('a"b') and not pattern.match("a\\b")


def test_the_upstream_gets_the_response_format_and_enforces_it(scripted: Scripted) -> None:  # noqa: F811
    """With GLMVISION_BACKEND=openai the engine upstream holds the grammar: the format goes to it."""
    scripted.events = [chunk(role="assistant"), chunk(content='{"total": 3}'), chunk("stop")]
    app = create_app({"GLMVISION_BACKEND": "openai", "GLMVISION_UPSTREAM_URL": scripted.url})
    client = app.test_client()
    answer = client.post("/v1/chat/completions", json=chat(GAUGE, max_tokens=40)).get_json()
    assert answer["choices"][0]["message"]["content"] == '{"total": 3}'
    assert scripted.bodies[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": GAUGE},
    }
    client.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
    assert scripted.bodies[-1]["response_format"] == {"type": "json_object"}
    client.post("/v1/chat/completions", json=chat())
    assert "response_format" not in scripted.bodies[-1]
    client.post("/v1/chat/completions", json=chat(tools=[LOOKUP], tool_choice="required"))
    assert "response_format" not in scripted.bodies[-1] and scripted.bodies[-1]["tool_choice"] == "required"
