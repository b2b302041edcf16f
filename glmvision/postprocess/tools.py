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
from typing import Any

from glmvision.core.generation import ToolCall

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# The tags of a call, which the model's output must keep for the parser (special tokens in the demo).
TOOL_TAGS = (CALL_OPEN, CALL_CLOSE, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def control_token_key(value: Any, tokens: tuple[str, ...], path: str) -> tuple[str, str] | None:
    """(where, key) for the first dict key inside `value` that holds one of `tokens`, else None.

    The chat template writes keys (argument names, schema properties) into the prompt as they
    are; transformers' control-token sanitising only covers values, so keys are checked here.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if any(token in str(key) for token in tokens):
                return path, str(key)
            found = control_token_key(item, tokens, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = control_token_key(item, tokens, f"{path}.{index}")
            if found is not None:
                return found
    return None


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
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def new_call_id() -> str:
    """A fresh tool call id, in OpenAI's style."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """Answer text in pieces -> (text to send now, calls completed): from `<tool_call>` on, text waits.

    What it sends adds up to `parse_tool_calls(whole text)[0]`, and its calls are that call list:
    a call that closes and parses is taken out, one that does not is text, and an unclosed one at
    the end (`finish`) is text too.
    """

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self._known = argument_types(tools)
        self._text = ""
        self._at = 0  # the text before this is settled: in `_kept`, or a call taken out
        self._kept = ""
        self._sent = 0

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        """Add answer text; return what can be sent now and the calls it completed."""
        self._text += piece
        calls: list[ToolCall] = []
        while (start := self._text.find(CALL_OPEN, self._at)) >= 0:
            end = self._text.find(CALL_CLOSE, start + len(CALL_OPEN))
            if end < 0:
                break
            self._kept += self._text[self._at : start]
            call = _parse_call(self._text[start + len(CALL_OPEN) : end], self._known)
            if call is None:
                self._kept += self._text[start : end + len(CALL_CLOSE)]
            else:
                calls.append(call)
            self._at = end + len(CALL_CLOSE)
        tail = self._text[self._at :]
        opened = tail.find(CALL_OPEN)
        if opened >= 0:
            tail = tail[:opened]
        else:
            tail = tail[: len(tail) - _opening_suffix(tail)]
        # Whitespace at the ends is dropped from the whole answer: inner whitespace waits for text.
        return self._send((self._kept + tail).strip()), calls

    def finish(self) -> str:
        """The text still to send once the answer is whole (an unclosed call is text)."""
        return self._send((self._kept + self._text[self._at :]).strip())

    def _send(self, visible: str) -> str:
        delta = visible[self._sent :]
        self._sent = max(self._sent, len(visible))
        return delta


def _opening_suffix(text: str) -> int:
    """Length of the longest end of `text` that could be the start of `<tool_call>`."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:size]):
            return size
    return 0
