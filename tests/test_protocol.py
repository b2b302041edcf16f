"""The request models on their own, without Flask: each rule across fields gives its code and param,
and `to_generation_params` turns a body into the sampling parameters the old pipeline built."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from glmvision.core.config import Settings, load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import Constraint, GenerationParams, ToolChoice, allowed_tools
from glmvision.web.native.protocol import SeedChatRequest, VisionRequest
from glmvision.web.openai.protocol import ChatCompletionRequest
from glmvision.web.protocol import RequestModel, validation_error

IMAGE = "data:image/png;base64,AAAA"
USER = {"role": "user", "content": "Hi"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
# The two tools as the chat template gets them and as canonical JSON text (what a call grammar takes).
WEATHER_TEXT = (
    '{"type":"function","function":{"name":"get_weather","description":"Weather in a city.",'
    '"parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}'
)
CLOCK_TEXT = '{"type":"function","function":{"name":"get_time"}}'


@pytest.fixture
def settings() -> Settings:
    """The defaults, spelled out where a test counts on them."""
    return load_settings(
        {
            "GLMVISION_MAX_NEW_TOKENS": "2048",
            "GLMVISION_DEFAULT_MAX_NEW_TOKENS": "512",
            "GLMVISION_MAX_PROMPT_CHARS": "16000",
            "GLMVISION_MAX_MESSAGES": "256",
            "GLMVISION_MAX_SCHEMA_BYTES": "32768",
        }
    )


def problems(model: type[RequestModel], body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(code, param) of every error the body gives, in the API's order."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [(detail.code, detail.param) for detail in validation_error(caught.value).details]


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [USER], **fields}


def refusal(call: Any) -> tuple[str, str | None]:
    """(code, param) of the APIError a settings check raises."""
    with pytest.raises(APIError) as caught:
        call()
    assert caught.value.code == 400
    return caught.value.error_code, caught.value.param


# --- Rules across fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "expected"),
    [
        (VisionRequest, {"image": IMAGE, "image_url": IMAGE, "prompt": "x"}, ("invalid_value", "image_url")),
        (VisionRequest, {"prompt": "x"}, ("missing_field", "image")),
        (VisionRequest, {"image": None, "image_url": None, "prompt": "x"}, ("missing_field", "image")),
        (VisionRequest, {"image": IMAGE, "prompt": " \n\t"}, ("invalid_value", "prompt")),
        (VisionRequest, {"image_url": IMAGE, "prompt": ""}, ("invalid_value", "prompt")),
        (SeedChatRequest, {"image_url": IMAGE, "prompt": "  "}, ("invalid_value", "prompt")),
    ],
    ids=["both-images", "no-image", "null-images", "blank-prompt", "empty-prompt", "seed-blank-prompt"],
)
def test_native_rules_give_their_code_and_param(
    model: type[RequestModel], body: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert problems(model, body) == [expected]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tools": [WEATHER, CLOCK, WEATHER]}, ("invalid_value", "tools.2.function.name")),
        ({"tool_choice": "required"}, ("invalid_value", "tool_choice")),
        ({"tools": [], "tool_choice": "required"}, ("invalid_value", "tool_choice")),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            ("invalid_value", "tool_choice"),
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            ("unknown_tool", "tool_choice"),
        ),
        (
            {"messages": [USER, {"role": "tool", "content": "42"}]},
            ("missing_field", "messages.1.tool_call_id"),
        ),
        (
            {"messages": [{**USER, "tool_calls": [CALL]}]},
            ("invalid_value", "messages.0.tool_calls"),
        ),
        (
            {"messages": [{"role": "system", "content": "Be brief.", "tool_calls": [CALL]}, USER]},
            ("invalid_value", "messages.0.tool_calls"),
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "tool",
                        "tool_call_id": "c1",
                        "content": [{"type": "image_url", "image_url": {"url": IMAGE}}],
                    },
                ]
            },
            ("invalid_value", "messages.1.content"),
        ),
        (
            {
                "messages": [
                    {"role": "developer", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]},
                    USER,
                ]
            },
            ("invalid_value", "messages.0.content"),
        ),
        ({"messages": [USER, {"role": "assistant", "content": "Hello"}]}, ("invalid_value", "messages")),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, ("invalid_value", "messages")),
        ({"messages": [USER, {"role": "user", "content": "   "}]}, ("invalid_value", "messages.1.content")),
        ({"messages": [{"role": "user", "content": []}]}, ("invalid_value", "messages.0.content")),
        ({"messages": [{"role": "user"}]}, ("invalid_value", "messages.0.content")),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
            ("invalid_value", "messages.0.content"),
        ),
        ({"response_format": {"type": "json_schema"}}, ("missing_field", "response_format")),
        ({"stop": ["a", ""]}, ("invalid_value", "stop")),
        ({"stop": ["a", 1]}, ("invalid_type", "stop")),
        ({"tool_choice": "sometimes"}, ("invalid_value", "tool_choice")),
        ({"tool_choice": {"type": "function"}}, ("invalid_type", "tool_choice")),
        (
            {"chat_template_kwargs": {"enable_thinking": 1}},
            ("invalid_type", "chat_template_kwargs.enable_thinking"),
        ),
    ],
    ids=[
        "duplicate-tools",
        "required-without-tools",
        "required-with-no-tools",
        "function-without-tools",
        "unknown-tool",
        "tool-without-call-id",
        "user-tool-calls",
        "system-tool-calls",
        "tool-image",
        "developer-image",
        "last-assistant",
        "last-system",
        "last-user-blank",
        "last-user-no-parts",
        "last-user-no-content",
        "last-user-blank-part",
        "json-schema-missing",
        "stop-empty",
        "stop-type",
        "tool-choice-mode",
        "tool-choice-shape",
        "thinking-type",
    ],
)
def test_chat_rules_give_their_code_and_param(fields: dict[str, Any], expected: tuple[str, str]) -> None:
    assert problems(ChatCompletionRequest, chat(**fields)) == [expected]


def test_rule_messages_are_the_old_ones() -> None:
    body = chat(messages=[USER, {"role": "tool", "content": "42"}])
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(caught.value)
    assert str(error.description) == "Field 'messages.1.tool_call_id' is required in a tool message."
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(
            chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}})
        )
    assert (
        str(validation_error(caught.value).description) == "tool_choice names 'x', which is not in 'tools'."
    )


def test_rules_across_fields_wait_for_valid_fields() -> None:
    """A body whose fields are wrong gets their errors only: the rules read valid fields."""
    body = chat(messages=[USER, {"role": "tool", "content": 5}], tool_choice="required")
    found = problems(ChatCompletionRequest, body)
    assert found and all(str(param).startswith("messages.1.content") for _, param in found), found


def test_the_prompt_rule_comes_after_field_errors() -> None:
    body = {"image_url": IMAGE, "prompt": " ", "seed": "1"}
    assert problems(SeedChatRequest, body) == [("invalid_type", "seed"), ("invalid_value", "prompt")]


def test_valid_bodies_pass_every_rule() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert ChatCompletionRequest.model_validate(body).tool_choice == ToolChoice("function", "get_time")
    assert VisionRequest.model_validate({"image_url": IMAGE, "prompt": "What?"}).image_source == (
        IMAGE,
        "image_url",
    )
    assert VisionRequest.model_validate({"image": IMAGE, "prompt": "What?"}).image_source == (IMAGE, "image")


# --- to_generation_params: the native bodies ----------------------------------------------------


def test_native_fields_map_to_params(settings: Settings) -> None:
    body = VisionRequest.model_validate(
        {
            "image": IMAGE,
            "prompt": "Describe it.",
            "max_new_tokens": 7,
            "temperature": 0.3,
            "top_p": 0.9,
            "seed": 11,
            "enable_thinking": True,
            "json_schema": {
                "type": "object",
                "properties": {"b": {"type": "integer"}, "a": {"type": "string"}},
            },
        }
    )
    params = body.to_generation_params(settings, "style")
    schema = '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert params == GenerationParams(
        max_new_tokens=7,
        temperature=0.3,
        top_p=0.9,
        seed=11,
        enable_thinking=True,
        adapter="style",
        constraint=Constraint(schema),
    )
    assert params.constraint is not None and params.constraint.param == "json_schema"


def test_native_defaults(settings: Settings) -> None:
    params = SeedChatRequest.model_validate({"image_url": IMAGE, "prompt": "Hi"}).to_generation_params(
        settings
    )
    assert params == GenerationParams(max_new_tokens=512, temperature=0.7)
    assert (params.top_p, params.seed, params.enable_thinking, params.stop, params.adapter) == (
        None,
        None,
        False,
        (),
        None,
    )
    capped = load_settings({"GLMVISION_MAX_NEW_TOKENS": "64", "GLMVISION_DEFAULT_MAX_NEW_TOKENS": "512"})
    body = SeedChatRequest.model_validate({"image_url": IMAGE, "prompt": "Hi", "temperature": 0})
    assert body.to_generation_params(capped) == GenerationParams(max_new_tokens=64, temperature=0.0)


def test_an_empty_json_schema_means_any_json(settings: Settings) -> None:
    body = VisionRequest.model_validate({"image": IMAGE, "prompt": "Hi", "json_schema": {}})
    constraint = body.to_generation_params(settings).constraint
    assert constraint == Constraint("{}") and constraint is not None and constraint.kind == "json_schema"


def test_native_settings_checks(settings: Settings) -> None:
    over = VisionRequest.model_validate({"image": IMAGE, "prompt": "Hi", "max_new_tokens": 2049})
    assert refusal(lambda: over.to_generation_params(settings)) == ("invalid_value", "max_new_tokens")
    at_cap = VisionRequest.model_validate({"image": IMAGE, "prompt": "Hi", "max_new_tokens": 2048})
    assert at_cap.to_generation_params(settings).max_new_tokens == 2048
    long = SeedChatRequest.model_validate({"image_url": IMAGE, "prompt": "x" * 16_001})
    assert refusal(lambda: long.to_generation_params(settings)) == ("prompt_too_long", "prompt")
    limit = SeedChatRequest.model_validate({"image_url": IMAGE, "prompt": "x" * 16_000})
    assert limit.to_generation_params(settings).max_new_tokens == 512
    big = {"type": "object", "description": "x" * 40_000}
    large = VisionRequest.model_validate({"image": IMAGE, "prompt": "Hi", "json_schema": big})
    assert refusal(lambda: large.to_generation_params(settings)) == ("schema_too_large", "json_schema")
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    nested = VisionRequest.model_validate({"image": IMAGE, "prompt": "Hi", "json_schema": deep})
    assert refusal(lambda: nested.to_generation_params(settings)) == ("schema_too_complex", "json_schema")


# --- to_generation_params: chat completions -----------------------------------------------------


def test_chat_fields_map_to_params(settings: Settings) -> None:
    body = ChatCompletionRequest.model_validate(
        chat(
            max_tokens=9,
            temperature=1.2,
            top_p=0.5,
            seed=3,
            stop=["END", "STOP"],
            min_tokens=2,
            chat_template_kwargs={"enable_thinking": True, "other": 1},
        )
    )
    assert body.to_generation_params(settings, "style") == GenerationParams(
        max_new_tokens=9,
        temperature=1.2,
        top_p=0.5,
        seed=3,
        enable_thinking=True,
        stop=("END", "STOP"),
        min_new_tokens=2,
        adapter="style",
    )


def test_chat_defaults_and_token_limits(settings: Settings) -> None:
    plain = ChatCompletionRequest.model_validate(chat(stop="END"))
    assert plain.to_generation_params(settings) == GenerationParams(max_new_tokens=512, stop=("END",))
    both = ChatCompletionRequest.model_validate(chat(max_tokens=5, max_completion_tokens=6))
    assert both.to_generation_params(settings).max_new_tokens == 6  # max_completion_tokens wins
    over = ChatCompletionRequest.model_validate(chat(max_tokens=4, max_completion_tokens=2049))
    assert refusal(lambda: over.to_generation_params(settings)) == ("invalid_value", "max_completion_tokens")
    old = ChatCompletionRequest.model_validate(chat(max_tokens=2049))
    assert refusal(lambda: old.to_generation_params(settings)) == ("invalid_value", "max_tokens")


@pytest.mark.parametrize(
    ("response_format", "expected", "param"),
    [
        (None, None, None),
        ({"type": "text"}, None, None),
        ({"type": "json_object"}, Constraint(None), "response_format"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "array", "maxItems": 2}},
            },
            Constraint('{"type":"array","maxItems":2}'),
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p"}},
            Constraint("{}"),
            "response_format.json_schema.schema",
        ),
    ],
    ids=["absent", "text", "json-object", "json-schema", "json-schema-empty"],
)
def test_response_format_maps_to_a_constraint(
    settings: Settings, response_format: Any, expected: Constraint | None, param: str | None
) -> None:
    body = ChatCompletionRequest.model_validate(chat(response_format=response_format, min_tokens=3))
    params = body.to_generation_params(settings)
    assert params.constraint == expected
    assert (params.constraint.param if params.constraint else None) == param
    # The grammar decides where a document ends: min_tokens cannot hold it open.
    assert params.min_new_tokens == (3 if expected is None else 0)


@pytest.mark.parametrize(
    ("tool_choice", "choice", "constraint_tools", "allowed"),
    [
        (None, ToolChoice("auto"), None, ["get_weather", "get_time"]),
        ("auto", ToolChoice("auto"), None, ["get_weather", "get_time"]),
        ("none", ToolChoice("none"), None, []),
        ("required", ToolChoice("required"), f"[{WEATHER_TEXT},{CLOCK_TEXT}]", ["get_weather", "get_time"]),
        (
            {"type": "function", "function": {"name": "get_time"}},
            ToolChoice("function", "get_time"),
            f"[{CLOCK_TEXT}]",
            ["get_time"],
        ),
    ],
    ids=["absent", "auto", "none", "required", "function"],
)
def test_tools_and_tool_choice_map_to_params(
    settings: Settings, tool_choice: Any, choice: ToolChoice, constraint_tools: str | None, allowed: list[str]
) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER, CLOCK], "response_format": {"type": "json_object"}}
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    params = ChatCompletionRequest.model_validate(chat(**fields)).to_generation_params(settings)
    assert params.tools == (WEATHER, CLOCK)
    assert params.tool_choice == choice
    if constraint_tools is None:  # the answer may be text: response_format holds
        assert params.constraint == Constraint(None) and params.constraint.param == "response_format"
    else:  # a call, whatever response_format says of text
        assert params.constraint == Constraint(tools=constraint_tools)
        assert params.constraint.param == "tools" and params.constraint.kind == "tool_call"
    assert [tool["function"]["name"] for tool in params.allowed_tools] == allowed


def test_without_tools_there_is_no_choice(settings: Settings) -> None:
    for fields in ({}, {"tools": []}, {"tools": [], "tool_choice": "none"}, {"tool_choice": "auto"}):
        params = ChatCompletionRequest.model_validate(chat(**fields)).to_generation_params(settings)
        assert (params.tools, params.tool_choice, params.allowed_tools) == ((), None, []), fields


def test_tool_parameters_over_the_limits_are_refused_on_tools(settings: Settings) -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    forced = ChatCompletionRequest.model_validate(chat(tools=[tool], tool_choice="required"))
    assert refusal(lambda: forced.to_generation_params(settings)) == ("schema_too_complex", "tools")
    # Only a forced call compiles the tools into a grammar.
    free = ChatCompletionRequest.model_validate(chat(tools=[tool]))
    assert free.to_generation_params(settings).constraint is None


def test_chat_size_limits(settings: Settings) -> None:
    many = ChatCompletionRequest.model_validate(chat(messages=[USER] * 257))
    assert refusal(lambda: many.to_generation_params(settings)) == ("too_many_messages", "messages")
    assert ChatCompletionRequest.model_validate(chat(messages=[USER] * 256)).to_generation_params(settings)
    # Text of every message, earlier calls' arguments and the tools' JSON count together.
    text = {"role": "user", "content": [{"type": "text", "text": "x" * 8_000}]}
    call = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "' + "y" * 7_000 + '"}'}}
    history = [
        text,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "z" * 900},
    ]
    fits = ChatCompletionRequest.model_validate(chat(messages=history))
    assert fits.to_generation_params(settings).max_new_tokens == 512
    long = ChatCompletionRequest.model_validate(chat(messages=history, tools=[WEATHER]))
    assert refusal(lambda: long.to_generation_params(settings)) == ("prompt_too_long", "messages")


def test_allowed_tools_is_one_rule() -> None:
    tools = (WEATHER, CLOCK)
    assert allowed_tools(tools, None) == [WEATHER, CLOCK]
    assert allowed_tools(tools, ToolChoice("auto")) == [WEATHER, CLOCK]
    assert allowed_tools(tools, ToolChoice("required")) == [WEATHER, CLOCK]
    assert allowed_tools(tools, ToolChoice("none")) == []
    assert allowed_tools(tools, ToolChoice("function", "get_time")) == [CLOCK]
    assert allowed_tools(tools, ToolChoice("function", "nope")) == []
    params = GenerationParams(8, tools=tools, tool_choice=ToolChoice("function", "get_weather"))
    assert params.allowed_tools == [WEATHER]
