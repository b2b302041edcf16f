"""Schemas are vetted before they compile: limits, keywords the grammar would drop, schemas with no
finite document, and real dates and times. Each refusal is a 400 naming the field; what passes
compiles to a grammar whose answers validate."""

from __future__ import annotations

import calendar
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar
from flask import Flask
from helpers import image_b64
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string

from glmvision.core.config import load_settings
from glmvision.core.constraints import json_constraint
from glmvision.core.errors import APIError
from glmvision.core.schemacheck import (
    FORMAT_PATTERNS,
    SchemaLimits,
    SchemaRefused,
    grammar_pattern,
    pattern_repeat,
    vet_schema,
)
from glmvision.web.app import create_app

RECURSIVE = {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}  # 73 bytes
LIMITS = SchemaLimits()


def deep_arrays(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def refused(schema: Any, limits: SchemaLimits = LIMITS) -> SchemaRefused:
    with pytest.raises(SchemaRefused) as caught:
        vet_schema(schema, limits)
    return caught.value


def string(**keywords: Any) -> dict[str, Any]:
    return {"type": "string", **keywords}


def obj(properties: dict[str, Any], *required: str, **keywords: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), **keywords}


# Every rule, with a schema it refuses: (schema, code, words the message has).
REFUSALS = [
    (RECURSIVE, "schema_unsupported", "#/properties/x"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "schema_unsupported", "#/$defs/a refers"),
    ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "schema_unsupported", "refers to itself"),
    (
        {"$defs": {"a": {"allOf": [{"$ref": "#"}]}}, "oneOf": [{"$ref": "#/$defs/a"}]},
        "schema_unsupported",
        "loop",
    ),
    (
        obj({"a": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}, "a"),
        "schema_unsupported",
        "finite",
    ),
    ({"anyOf": [RECURSIVE, {"$ref": "#/anyOf/0"}]}, "schema_unsupported", "finite"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "schema_unsupported", "hold no number"),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "schema_unsupported", "no number"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "schema_unsupported", "no number"),
    (string(minLength=3, maxLength=2), "schema_unsupported", "minLength > maxLength"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "schema_unsupported", "minItems > maxItems"),
    ({"type": "object", "minProperties": 3, "maxProperties": 2}, "schema_unsupported", "minProperties"),
    (obj({"a": {}, "b": {}}, "a", "b", maxProperties=1), "schema_unsupported", "maxProperties"),
    ({"enum": []}, "schema_unsupported", "'enum' value"),
    ({"type": "string", "enum": [1, 2]}, "schema_unsupported", "'enum' value"),
    ({"type": "integer", "const": "x"}, "schema_unsupported", "'const' value"),
    ({"type": []}, "schema_unsupported", "'type'"),
    (obj({"a": {}}, "b", additionalProperties=False), "schema_unsupported", "'b'"),
    (obj({"a": {}}, "b"), "schema_unsupported", "'b'"),
    ({"not": {"type": "string"}}, "schema_unsupported", "'not' at #"),
    (obj({"a": {"type": "string", "if": {}, "then": {}}}), "schema_unsupported", "'if' at #/properties/a"),
    ({"type": "number", "multipleOf": 0.5}, "schema_unsupported", "'multipleOf'"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, "schema_unsupported", "'multipleOf'"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "schema_unsupported", "'patternProperties'"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "schema_unsupported", "'propertyNames'"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "schema_unsupported", "'dependentRequired'"),
    ({"type": "array", "uniqueItems": True}, "schema_unsupported", "'uniqueItems'"),
    ({"type": "array", "contains": {"const": 1}}, "schema_unsupported", "'contains'"),
    ({"type": "object", "unevaluatedProperties": False}, "schema_unsupported", "'unevaluatedProperties'"),
    (string(format="color"), "schema_unsupported", "'format' 'color'"),
    (string(format="date", pattern="^2"), "schema_unsupported", "'pattern' beside 'format'"),
    (string(format="email", maxLength=9), "schema_unsupported", "'maxLength' beside 'format'"),
    (string(pattern="^a+$", maxLength=3), "schema_unsupported", "'maxLength' beside 'pattern'"),
    ({"minLength": 3}, "schema_unsupported", "needs a 'type'"),
    ({"required": ["a"]}, "schema_unsupported", "needs a 'type'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "schema_unsupported", "'allOf'"),
    ({"$defs": {"a": {}}, "$ref": "#/$defs/a", "type": "integer"}, "schema_unsupported", "beside '$ref'"),
    ({"type": "string", "anyOf": [{"type": "integer"}]}, "schema_unsupported", "beside 'anyOf'"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "schema_unsupported", "beside 'enum'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "schema_unsupported", "'oneOf'"),
    (
        {"oneOf": [obj({"k": {"const": 1}}, "k"), obj({"k": {"enum": [1, 2]}}, "k")]},
        "schema_unsupported",
        "'oneOf'",
    ),
    ({"oneOf": [{"const": 1}, {"const": 1.0}]}, "schema_unsupported", "'oneOf'"),
    (
        {"oneOf": [{**obj({"k": {"const": "a"}}, "k"), "type": ["object", "null"]}, {"type": "null"}]},
        "schema_unsupported",
        "'oneOf'",
    ),
    ({"oneOf": [{"type": "integer", "minimum": i} for i in range(65)]}, "schema_unsupported", "65 schemas"),
    ({"$ref": "https://example.com/s.json"}, "schema_unsupported", "'$ref'"),
    ({"properties": {"a": {"$id": "x", "type": "string"}}}, "schema_unsupported", "'$id'"),
    ({"$ref": "#/nowhere"}, "invalid_schema", "points nowhere"),
    ({"type": "objectx"}, "invalid_schema", "'type'"),
    ({"type": "object", "properties": []}, "invalid_schema", "'properties'"),
    ({"type": "array", "items": [{}]}, "invalid_schema", "'prefixItems'"),
    ({"type": "string", "minLength": -1}, "invalid_schema", "'minLength'"),
    ([], "invalid_schema", "neither"),
    (False, "schema_unsupported", "finite"),
    ({"type": "object", "additionalProperties": None}, "invalid_schema", "'additionalProperties'"),
    (string(format=None), "schema_unsupported", "'format' None"),
    # The limits, each naming its setting.
    (deep_arrays(33), "schema_too_complex", "GLMVISION_SCHEMA_MAX_DEPTH"),
    (string(pattern="^a{1001}$"), "schema_too_complex", "GLMVISION_SCHEMA_MAX_REPEAT"),
    (string(pattern="^(a{10}){101}$"), "schema_too_complex", "is 1010; at most 1000"),
    (string(maxLength=1001), "schema_too_complex", "maxLength at # is 1001"),
    ({"type": "array", "minItems": 5000}, "schema_too_complex", "GLMVISION_SCHEMA_MAX_REPEAT"),
    ({"type": "object", "maxProperties": 5000}, "schema_too_complex", "GLMVISION_SCHEMA_MAX_REPEAT"),
    (obj({f"p{i}": {"type": "integer"} for i in range(1001)}), "schema_too_complex", "PROPERTIES"),
    (
        {
            "$defs": {
                **{
                    f"d{i}": obj({"l": {"$ref": f"#/$defs/d{i + 1}"}, "r": {"$ref": f"#/$defs/d{i + 1}"}})
                    for i in range(12)
                },
                "d12": {"type": "null"},
            },
            "$ref": "#/$defs/d0",
        },
        "schema_too_complex",
        "GLMVISION_SCHEMA_MAX_REFS",
    ),
    (
        {
            "type": "array",
            "minItems": 200,
            "items": {"type": "array", "minItems": 200, "items": {"type": "null"}},
        },
        "schema_too_complex",
        "GLMVISION_SCHEMA_MAX_SHORTEST",
    ),
]


@pytest.mark.parametrize(("schema", "code", "words"), REFUSALS, ids=lambda v: str(v)[:60])
def test_each_rule_refuses_with_its_code_and_reason(schema: Any, code: str, words: str) -> None:
    problem = refused(schema)
    assert problem.code == code
    assert words in problem.message, problem.message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"$ref": "#"}}},  # recursion with a way out
        {
            "$defs": {"t": obj({"kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "kids")},
            "$ref": "#/$defs/t",
        },
        {"type": "integer", "multipleOf": 3},
        {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
        {"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
        {
            "oneOf": [
                obj({"k": {"const": "a"}}, "k"),
                obj({"k": {"const": "b"}, "v": {"type": "integer"}}, "k"),
            ]
        },
        {"oneOf": [{"const": 1}, {"enum": [2, 3]}]},
        {"oneOf": [{"const": i} for i in range(2000)]},
        {
            "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(900)} | {"d900": {}},
            "$ref": "#/$defs/d0",
        },
        {"anyOf": [{"type": "string", "title": "S"}, {"type": "null"}], "default": None, "description": "d"},
        {"allOf": [{"$ref": "#/definitions/a"}], "definitions": {"a": {"type": "boolean"}}},
        {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 1},
        {"type": ["string", "null"], "maxLength": 3, "x-vendor": 1, "nullable": True},
        {"type": "string", "pattern": "^a{1000}$"},
        deep_arrays(31),
        {"type": "array", "uniqueItems": False, "items": string(format="uuid")},
    ],
    ids=lambda v: str(v)[:60],
)
def test_schemas_the_grammar_enforces_pass_unchanged(schema: Any) -> None:
    assert vet_schema(schema, LIMITS) is schema


def test_limits_are_the_settings() -> None:
    tight = SchemaLimits(max_depth=2, max_repeat=5, max_properties=2, max_refs=1, max_shortest=3)
    assert refused(deep_arrays(3), tight).message.endswith("at most 2 (GLMVISION_SCHEMA_MAX_DEPTH).")
    assert refused(string(pattern="^a{6}$"), tight).code == "schema_too_complex"
    assert refused(obj({"a": {}, "b": {}, "c": {}}), tight).code == "schema_too_complex"
    assert refused(
        {"$defs": {"a": {}}, "anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/a"}]}, tight
    ).code == ("schema_too_complex")
    assert refused({"type": "array", "minItems": 3}, tight).code == "schema_too_complex"  # 4 values
    assert vet_schema({"type": "array", "minItems": 2}, tight)
    settings = load_settings(
        {
            "GLMVISION_SCHEMA_MAX_DEPTH": "2",
            "GLMVISION_SCHEMA_MAX_REPEAT": "5",
            "GLMVISION_SCHEMA_MAX_PROPERTIES": "2",
            "GLMVISION_SCHEMA_MAX_REFS": "1",
            "GLMVISION_SCHEMA_MAX_SHORTEST": "3",
        }
    )
    with pytest.raises(APIError, match="GLMVISION_SCHEMA_MAX_REPEAT") as caught:
        json_constraint(string(pattern="^a{6}$"), settings, "json_schema")
    assert caught.value.error_code == "schema_too_complex" and caught.value.param == "json_schema"


@pytest.mark.parametrize(
    ("pattern", "repeat"),
    [
        ("^a{5}$", 5),
        ("^a{2,7}b{3,}$", 7),
        ("^(a{10}){20}$", 200),
        ("((a{2}){3}b{4}){5}", 30),
        (r"^\{99}[{]{3}$", 3),
        ("^[a-z]+(x|y)*$", 0),
        ("^a{,5}$", 0),  # not a quantifier: literal text
    ],
)
def test_pattern_repetition_counts_multiply_when_nested(pattern: str, repeat: int) -> None:
    assert pattern_repeat(pattern) == repeat


@pytest.mark.parametrize(
    ("pattern", "grammar"),
    [
        ("^(ab+)?$", "^(ab+){0,1}$"),
        ("^x(a(b+c)?)??$", "^x(a(b+c){0,1}){0,1}$"),
        (r"^\(a\)?[)?]?(?:a+b)?$", r"^\(a\)?[)?]?(?:a+b){0,1}$"),
        ("^(a|b)*c?$", "^(a|b)*c?$"),
    ],
)
def test_optional_groups_are_spelled_the_way_xgrammar_reads_right(pattern: str, grammar: str) -> None:
    assert grammar_pattern(pattern) == grammar
    schema = string(pattern=pattern)
    assert vet_schema(schema, LIMITS) == (schema if grammar == pattern else string(pattern=grammar))


def test_rewrites_go_to_the_grammar_and_leave_the_request_alone() -> None:
    schema = obj(
        {"day": string(format="date"), "at": {"type": ["string", "null"], "format": "date-time"}}, "day"
    )
    schema["properties"]["kind"] = {"type": "string", "enum": ["a", 1, "b"]}
    grammar = vet_schema(schema, LIMITS)
    assert grammar["properties"]["day"] == {"type": "string", "pattern": FORMAT_PATTERNS["date"]}
    assert grammar["properties"]["at"] == {
        "type": ["string", "null"],
        "pattern": FORMAT_PATTERNS["date-time"],
    }
    assert grammar["properties"]["kind"] == {"type": "string", "enum": ["a", "b"]}
    assert schema["properties"]["day"] == string(format="date")  # the request's own is untouched
    assert json_constraint(schema, load_settings({}), "json_schema").schema == json.dumps(
        grammar, separators=(",", ":")
    )


def real_date(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return len(text) == 10


@pytest.mark.parametrize("year", [1, 4, 100, 400, 1900, 1999, 2000, 2023, 2024, 2100, 9999])
def test_the_date_pattern_admits_exactly_the_real_dates(year: int) -> None:
    date = re.compile(FORMAT_PATTERNS["date"])
    for month in range(0, 14):
        for day in range(0, 33):
            text = f"{year:04d}-{month:02d}-{day:02d}"
            assert bool(date.fullmatch(text)) == real_date(text), text
    assert calendar.isleap(year) == bool(date.fullmatch(f"{year:04d}-02-29"))
    assert not date.fullmatch("0000-01-01")  # no year 0 in the Gregorian calendar Python knows


RFC3339_TIME = re.compile(r"(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-](\d\d):(\d\d))")


def real_time(text: str) -> bool:
    """RFC 3339 full-time, without leap seconds (what Python's datetime can hold)."""
    match = RFC3339_TIME.fullmatch(text)
    if match is None:
        return False
    hour, minute, second = (int(match.group(i)) for i in (1, 2, 3))
    offset = (int(match.group(6) or 0), int(match.group(7) or 0))
    return hour < 24 and minute < 60 and second < 60 and offset[0] < 24 and offset[1] < 60


def real_date_time(text: str) -> bool:
    day, t, rest = text.partition("T")
    return bool(t) and real_date(day) and real_time(rest)


@pytest.mark.parametrize(
    ("text", "real"),
    [
        ("00:00:00Z", True),
        ("23:59:59.123456789+05:30", True),
        ("23:59:59.1234567890Z", False),  # nanoseconds at most: a closing walk must end a fraction
        ("12:00:00-00:00", True),
        ("23:59:60Z", False),
        ("24:00:00Z", False),
        ("12:60:00Z", False),
        ("12:00:00", False),
        ("12:00:00+24:00", False),
        ("12:00:00.Z", False),
    ],
)
def test_the_time_pattern_admits_exactly_the_real_times(text: str, real: bool) -> None:
    assert bool(re.fullmatch(FORMAT_PATTERNS["time"], text)) is real
    assert real_time(text) is real or text.endswith("890Z")
    assert bool(re.fullmatch(FORMAT_PATTERNS["date-time"], "2024-02-29T" + text)) is real


# What xgrammar 0.2.9 does with each of these: it lets through a document that does not validate.
# Vetting refuses the schema, or rewrites it so that the grammar refuses the document.
DROPPED = [
    (string(format="date"), '"2023-02-30"'),
    (string(format="time"), '"23:59:60Z"'),
    (string(format="date-time"), '"2024-04-31T10:00:00Z"'),
    (string(format="ipv4"), '"01.2.3.4"'),
    ({"type": "string", "enum": ["a", 1]}, "1"),
    ({"not": {"type": "integer"}}, "1"),
    ({"type": "number", "multipleOf": 0.5}, "0.3"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, "4"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, '"x"'),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1"),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 5}, "1"),
    ({"type": "string", "anyOf": [{"type": "integer"}]}, "1"),
    (string(pattern="^a+$", maxLength=2), '"aaaa"'),
    (string(pattern="^(ab+)?$"), '"bb"'),
    (string(pattern="^x(a(b+c)?)?$"), '"xab"'),
    (string(format="email", maxLength=5), '"aaaaaa@b.com"'),
    (string(format="date", pattern="^x$"), '"2020-01-01"'),
    ({"minLength": 3}, '"a"'),
    (obj({"a": {"type": "integer"}}, "b", additionalProperties=True), '{"a": 1}'),
]


def admits(schema: Any, document: str) -> bool:
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    return _is_grammar_accept_string(grammar, document)


@pytest.mark.parametrize(("schema", "document"), DROPPED, ids=lambda v: str(v)[:50])
def test_what_xgrammar_would_let_through_is_refused_or_rewritten(schema: Any, document: str) -> None:
    assert admits(schema, document)
    assert not jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER).is_valid(
        json.loads(document)
    )
    try:
        grammar = vet_schema(schema, LIMITS)
    except SchemaRefused as problem:
        assert problem.code == "schema_unsupported"
        return
    assert not admits(grammar, document)


KEYWORDS = st.sampled_from(
    [
        "type",
        "properties",
        "required",
        "items",
        "prefixItems",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "enum",
        "const",
        "format",
        "pattern",
        "minLength",
        "maxItems",
        "minimum",
        "multipleOf",
        "additionalProperties",
        "$defs",
        "not",
        "uniqueItems",
        "a",
        "title",
    ]
)
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 2000),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.sampled_from(["string", "object", "array", "integer", "#", "#/$defs/a", "date", "^(a+b)?$"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYWORDS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=JSON)
def test_any_json_is_vetted_or_refused_never_an_error(schema: Any) -> None:
    try:
        vetted = vet_schema(schema, LIMITS)
    except SchemaRefused as problem:
        assert problem.code in {"schema_unsupported", "schema_too_complex", "invalid_schema"}
        return
    json.dumps(vetted)


def test_vetting_is_fast_on_the_largest_schemas() -> None:
    wide = obj({f"p{i}": {"$ref": "#/$defs/leaf"} for i in range(500)}, *(f"p{i}" for i in range(500)))
    wide["$defs"] = {
        "leaf": {"anyOf": [string(maxLength=1000), {"type": "array", "minItems": 8, "maxItems": 9}]}
    }
    started = time.perf_counter()
    vet_schema(wide, LIMITS)
    refused(deep_arrays(100_000))
    assert time.perf_counter() - started < 20  # bounded work: a recursive walk would never end


# Through the app, on the demo model.


@pytest.fixture(scope="module")
def app(demo_model_dir: Path) -> Flask:
    return create_app({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"})


def chat(schema: Any, **fields: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Fill in the form."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
        "max_tokens": 96,
        **fields,
    }


def error_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.get_json()
    return response.get_json()["error"]


def test_the_73_byte_recursion_is_refused_quickly_on_every_route(app: Flask) -> None:
    assert len(json.dumps(RECURSIVE)) == 73
    client = app.test_client()
    started = time.perf_counter()
    chat_error = error_of(client.post("/v1/chat/completions", json=chat(RECURSIVE)))
    assert (chat_error["code"], chat_error["param"]) == (
        "schema_unsupported",
        "response_format.json_schema.schema",
    )
    assert "#/properties/x" in chat_error["message"]
    native = {"image": image_b64(), "prompt": "Read it.", "json_schema": RECURSIVE}
    native_error = error_of(client.post("/v1/chat/vision", json=native))
    assert (native_error["code"], native_error["param"]) == ("schema_unsupported", "json_schema")
    tool = {"type": "function", "function": {"name": "loop", "parameters": RECURSIVE}}
    forced = {
        "messages": [{"role": "user", "content": "Call it."}],
        "tools": [tool],
        "tool_choice": "required",
    }
    tool_error = error_of(client.post("/v1/chat/completions", json=forced))
    assert (tool_error["code"], tool_error["param"]) == ("schema_unsupported", "tools")
    assert "tool 'loop'" in tool_error["message"]
    assert time.perf_counter() - started < 30  # refused before it could stall the worker


@pytest.mark.parametrize(
    ("schema", "code", "setting"),
    [
        (
            {"type": "object", "properties": {"a": string(pattern="^a{1000000}$")}},
            "schema_too_complex",
            "GLMVISION_SCHEMA_MAX_REPEAT",
        ),
        (deep_arrays(40), "schema_too_complex", "GLMVISION_SCHEMA_MAX_DEPTH"),
        # 801 deep is deeper than any body may nest: refused as the body is read, before any vetting.
        (deep_arrays(801), "json_too_deep", "GLMVISION_MAX_JSON_DEPTH"),
    ],
    ids=["pattern", "deep", "deeper-than-a-body"],
)
def test_costly_schemas_are_refused_before_compiling(
    app: Flask, schema: Any, code: str, setting: str
) -> None:
    client = app.test_client()
    started = time.perf_counter()
    problem = error_of(client.post("/v1/chat/completions", json=chat(schema)))
    assert problem["code"] == code and setting in problem["message"]
    assert time.perf_counter() - started < 30  # not stalled: the unvetted pattern held a worker for minutes


def strict_format_checker() -> jsonschema.FormatChecker:
    """jsonschema's format checker, with date-time and time checked strictly here (jsonschema needs
    rfc3339-validator for them, which the project does not install)."""
    checker = jsonschema.FormatChecker()
    checker.checks("time")(lambda value: not isinstance(value, str) or real_time(value))
    checker.checks("date-time")(lambda value: not isinstance(value, str) or real_date_time(value))
    return checker


FORMAT_CHECKER = strict_format_checker()
DATES = obj(
    {"day": string(format="date"), "at": string(format="time"), "when": string(format="date-time")},
    "day",
    "at",
    "when",
)


@pytest.mark.parametrize("seed", range(6))
def test_dates_and_times_in_answers_are_real(app: Flask, seed: int) -> None:
    body = chat(DATES, temperature=1.0, seed=seed, max_tokens=120)
    response = app.test_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_json()
    choice = response.get_json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.Draft202012Validator(DATES, format_checker=FORMAT_CHECKER).validate(
        json.loads(choice["message"]["content"])
    )


def test_a_forced_call_gets_real_dates_too(app: Flask) -> None:
    tool = {"type": "function", "function": {"name": "book", "parameters": DATES}}
    body = {
        "messages": [{"role": "user", "content": "Book it."}],
        "tools": [tool],
        "tool_choice": "required",
        "max_tokens": 160,
        "temperature": 1.0,
        "seed": 3,
    }
    response = app.test_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.get_json()
    (call,) = response.get_json()["choices"][0]["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.Draft202012Validator(DATES, format_checker=FORMAT_CHECKER).validate(arguments)


# The property: whatever schema a client sends, the answer is a 400 or validates.

NAMES = st.sampled_from(["a", "b", "name", "n2"])
PATTERNS = st.sampled_from(["^[a-z]{1,4}$", "^(ab|cd)+$", "^[0-9]{3}-[0-9]{2}$", "^x{2,3}y?$"])


def scalars() -> st.SearchStrategy[dict[str, Any]]:
    bound = st.one_of(st.none(), st.integers(-50, 50))

    def numeric(kind: str, low: int | None, high: int | None, exclusive: bool) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": kind}
        if low is not None:
            schema["exclusiveMinimum" if exclusive else "minimum"] = low
        if high is not None:
            schema["maximum"] = high
        return schema

    return st.one_of(
        st.builds(string),
        st.builds(lambda n: string(maxLength=n), st.integers(0, 6)),
        st.builds(lambda lo, hi: string(minLength=lo, maxLength=hi), st.integers(0, 3), st.integers(0, 5)),
        st.builds(lambda p: string(pattern=p), PATTERNS),
        st.builds(
            lambda f: string(format=f),
            st.sampled_from(["date", "time", "date-time", "email", "uuid", "ipv4", "color"]),
        ),
        st.builds(numeric, st.sampled_from(["integer", "number"]), bound, bound, st.booleans()),
        st.builds(lambda k: {"type": k}, st.sampled_from(["boolean", "null"])),
        st.builds(
            lambda v: {"enum": v}, st.lists(st.one_of(st.integers(-3, 3), NAMES, st.none()), max_size=3)
        ),
        st.builds(lambda v: {"const": v}, st.one_of(st.integers(-3, 3), NAMES)),
        st.builds(
            lambda v: {"type": "string", "enum": v},
            st.lists(st.one_of(NAMES, st.integers(0, 2)), min_size=1, max_size=3),
        ),
    )


def scalars_and_refs() -> st.SearchStrategy[dict[str, Any]]:
    leaves = scalars()
    return st.one_of(leaves, leaves, leaves, st.sampled_from([{"$ref": "#"}, {"$ref": "#/$defs/leaf"}]))


def unsupported_keyword(schema: dict[str, Any], which: str) -> dict[str, Any]:
    extra = {
        "not": {"not": {"type": "null"}},
        "multipleOf": {"multipleOf": 0.5},
        "uniqueItems": {"uniqueItems": True},
        "patternProperties": {"patternProperties": {"^z": {"type": "integer"}}},
        "if": {"if": {"type": "string"}, "then": {"maxLength": 1}},
        "allOf": {"allOf": [{"type": "string"}, {"maxLength": 2}]},
    }[which]
    return {**schema, **extra}


def composites(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    properties = st.dictionaries(NAMES, children, min_size=1, max_size=3)
    objects = properties.flatmap(
        lambda props: st.builds(
            lambda required, closed: obj(
                props, *required, **({"additionalProperties": False} if closed else {})
            ),
            st.lists(st.sampled_from(list(props)), unique=True),
            st.booleans(),
        )
    )
    arrays = st.builds(
        lambda item, least, more: {
            "type": "array",
            "items": item,
            "minItems": least,
            "maxItems": least + more,
        },
        children,
        st.integers(0, 2),
        st.integers(-1, 2),
    )
    unsupported = st.builds(
        unsupported_keyword,
        children,
        st.sampled_from(["not", "multipleOf", "uniqueItems", "patternProperties", "if", "allOf"]),
    )
    return st.one_of(
        objects,
        objects,
        arrays,
        arrays,
        st.builds(lambda options: {"anyOf": options}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda options: {"oneOf": options}, st.lists(children, min_size=2, max_size=3)),
        unsupported,
    )


SCHEMAS = st.builds(
    lambda root, leaf: {**root, "$defs": {"leaf": leaf}},
    st.recursive(scalars_and_refs(), composites, max_leaves=6),
    scalars(),
)
OUTCOMES = {"schema_unsupported", "schema_too_complex", "invalid_schema"}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_any_schema_gets_a_400_or_an_answer_that_validates(
    app: Flask, schema: dict[str, Any], seed: int
) -> None:
    body = chat(schema, temperature=1.0, seed=seed, max_tokens=64)
    response = app.test_client().post("/v1/chat/completions", json=body)
    if response.status_code == 400:
        event(response.get_json()["error"]["code"])
        assert response.get_json()["error"]["code"] in OUTCOMES, response.get_json()
        return
    assert response.status_code == 200, response.get_json()
    choice = response.get_json()["choices"][0]
    event(choice["finish_reason"])
    if choice["finish_reason"] == "length":  # the budget is below the schema's shortest document
        return
    assert choice["finish_reason"] == "stop"
    document = json.loads(choice["message"]["content"])
    jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER).validate(document)
