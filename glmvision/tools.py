"""Tool calls in GLM-4.5/4.6-family output, parsed into OpenAI's `tool_calls`.

The model writes each call as `<tool_call>NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>`
pairs (any whitespace between them) and `</tool_call>`. A value is text unless the tool's schema
gives that argument another type and the text parses as JSON. What does not parse stays text, so a
malformed call reaches the client as words, never as an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def argument_types(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function's argument schemas by name, from OpenAI `tools` ({"type": "function", ...})."""
    types: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        types[function["name"]] = properties if isinstance(properties, dict) else {}
    return types


def _value(text: str, schema: dict[str, Any] | None) -> Any:
    """An argument's value: text, or JSON where its schema wants something else and the text is JSON."""
    value = text.strip()
    kind = (schema or {}).get("type", "string")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[ToolCall]]:
    """The text without its well-formed calls to the given tools, and those calls, in order.

    A call to a function that is not among `tools`, or whose body is not name-then-pairs, stays in
    the text, as does anything after an unclosed `<tool_call>`.
    """
    known = argument_types(tools)
    calls: list[ToolCall] = []
    kept: list[str] = []
    at = 0
    for match in CALL.finditer(text):
        call = _parse_call(match.group(1), known)
        if call is None:
            continue
        kept.append(text[at : match.start()])
        at = match.end()
        calls.append(call)
    kept.append(text[at:])
    return "".join(kept).strip(), calls


def _parse_call(body: str, known: dict[str, dict[str, Any]]) -> ToolCall | None:
    head, marker, tail = body.partition("<arg_key>")
    name, rest = head.strip(), marker + tail
    if name not in known:
        return None
    schemas = known[name]
    arguments: dict[str, Any] = {}
    position = 0
    for pair in PAIR.finditer(rest):
        if rest[position : pair.start()].strip():
            return None  # something between the pairs that is not one
        key = pair.group(1).strip()
        arguments[key] = _value(pair.group(2), schemas.get(key))
        position = pair.end()
    if rest[position:].strip():
        return None
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, json.dumps(arguments, ensure_ascii=False))
