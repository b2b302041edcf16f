"""The GLM-4.5/4.6 tool-call parser, fed canned model outputs: several calls, typed and nested values,
unknown functions, malformed and truncated calls (those stay text)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from glmvision.postprocess.tools import argument_types, parse_tool_calls

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": ["string", "null"]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "crop",
            "parameters": {
                "type": "object",
                "properties": {
                    "box": {"type": "array"},
                    "options": {"type": "object"},
                    "sharpen": {"type": "boolean"},
                },
            },
        },
    },
]


def arguments(call: Any) -> dict[str, Any]:
    return json.loads(call.arguments)


def test_several_calls_with_typed_and_nested_values() -> None:
    text = (
        "Let me check.\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
        "<tool_call>crop<arg_key>box</arg_key><arg_value>[10, 20, 30, 40]</arg_value>"
        '<arg_key>options</arg_key><arg_value>{"pad": {"x": 2, "y": [1, 2]}, "mode": "edge"}</arg_value>'
        "<arg_key>sharpen</arg_key><arg_value>true</arg_value></tool_call>"
    )
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check."
    assert [call.name for call in calls] == ["get_weather", "crop"]
    assert arguments(calls[0]) == {"city": "Beijing", "days": 3}
    assert arguments(calls[1]) == {
        "box": [10, 20, 30, 40],
        "options": {"pad": {"x": 2, "y": [1, 2]}, "mode": "edge"},
        "sharpen": True,
    }
    assert len({call.id for call in calls}) == 2 and all(call.id.startswith("call_") for call in calls)
    assert calls[0].to_json()["type"] == "function"


def test_strings_stay_strings_even_when_they_look_like_json() -> None:
    text = (
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>1234</arg_value>"
        "<arg_key>units</arg_key><arg_value>null</arg_value></tool_call>"
    )
    _, (call,) = parse_tool_calls(text, TOOLS)
    assert arguments(call) == {"city": "1234", "units": "null"}  # their schemas allow strings


def test_a_value_that_is_not_json_for_its_type_is_kept_as_text() -> None:
    text = "<tool_call>get_weather<arg_key>days</arg_key><arg_value>three</arg_value></tool_call>"
    _, (call,) = parse_tool_calls(text, TOOLS)
    assert arguments(call) == {"days": "three"}


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Bei",  # cut off mid-call
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value>",  # never closed
        "<tool_call>delete_all<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>",  # no such tool
        "<tool_call>get_weather<arg_key>city</arg_key>Beijing</tool_call>",  # a key without a value
        "<tool_call>get_weather junk <arg_key>city</arg_key><arg_value>B</arg_value></tool_call>",  # bad name
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>B</arg_value> x</tool_call>",  # stray text
    ],
)
def test_what_does_not_parse_stays_text(text: str) -> None:
    content, calls = parse_tool_calls(text, TOOLS)
    assert calls == [] and content == text.strip()


def test_a_good_call_after_a_bad_one_is_still_taken() -> None:
    bad = "<tool_call>nope</tool_call>"
    good = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
    content, calls = parse_tool_calls(f"{bad} then {good}", TOOLS)
    assert content == f"{bad} then" and [arguments(c) for c in calls] == [{"city": "Oslo"}]


def test_argument_types_ignore_malformed_tools() -> None:
    tools: list[Any] = [{"type": "function"}, "junk", {"function": {"name": "bare"}}, *TOOLS]
    types = argument_types(tools)
    assert set(types) == {"bare", "get_weather", "crop"} and types["bare"] == {}
    _, (call,) = parse_tool_calls("<tool_call>bare</tool_call>", tools)
    assert call.name == "bare" and arguments(call) == {}


def test_untyped_and_union_arguments_and_the_call_shape() -> None:
    tools: list[dict[str, Any]] = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"properties": {"free": {}, "maybe": {"type": ["integer", "null"]}}},
            },
        }
    ]
    text = (
        "<tool_call>f<arg_key>free</arg_key><arg_value>123</arg_value>"
        "<arg_key>maybe</arg_key><arg_value>5</arg_value><arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
    )
    _, (call,) = parse_tool_calls(text, tools)
    assert arguments(call) == {"free": "123", "maybe": 5, "city": "北京"}  # no type given: text
    assert "北京" in call.arguments  # as written, not \\u-escaped
    assert len(call.id) == len("call_") + 24
    assert call.to_json() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "f", "arguments": call.arguments},
    }
