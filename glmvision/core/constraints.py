"""A request's sampling settings under the server's limits: the token cap, prompt size, schema vetting.

Flask-free, so that the request models and their tests use it without an app.
"""

from __future__ import annotations

import json
from typing import Any

from glmvision.core.config import Settings
from glmvision.core.errors import bad_request
from glmvision.core.generation import DEFAULT_TEMPERATURE, Constraint, GenerationParams
from glmvision.core.schemacheck import SchemaLimits, SchemaRefused, vet_schema


def check_prompt_length(characters: int, settings: Settings, param: str) -> None:
    """Refuse prompts (all text of a request together) over GLMVISION_MAX_PROMPT_CHARS."""
    limit = settings.max_prompt_chars
    if characters > limit:
        raise bad_request(
            "prompt_too_long", f"Field {param!r} holds {characters} characters; at most {limit}.", param
        )


def generation_params(
    settings: Settings,
    *,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None = None,
    seed: int | None = None,
    enable_thinking: bool = False,
    stop: tuple[str, ...] = (),
    min_new_tokens: int = 0,
    param: str = "max_new_tokens",
    constraint: Constraint | None = None,
    adapter: str | None = None,
) -> GenerationParams:
    """Apply the server's token cap and defaults to a request's sampling settings."""
    cap = settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(settings.default_max_new_tokens, cap)
    elif max_new_tokens > cap:
        raise bad_request("invalid_value", f"Field {param!r} may be at most {cap}.", param)
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    return GenerationParams(
        max_new_tokens,
        temperature,
        top_p,
        seed,
        enable_thinking,
        stop,
        min_new_tokens,
        adapter=adapter,
        constraint=constraint,
    )


def json_constraint(schema: dict[str, Any] | None, settings: Settings, param: str) -> Constraint:
    """The constraint for JSON valid against `schema` (any JSON object when None), size-checked and vetted."""
    if schema is None:
        return Constraint(None, param=param)
    text = _schema_text(schema, settings, param)  # its size first: vetting is linear in it
    grammar = vetted(schema, settings, param)
    return Constraint(text if grammar is schema else _canonical(grammar), param=param)


def tool_constraint(tools: list[dict[str, Any]], settings: Settings) -> Constraint:
    """The constraint for one well-formed call of one of `tools`, its arguments valid for that tool."""
    text = _schema_text(tools, settings, "tools")
    checked = []
    for tool in tools:
        function = tool["function"]
        if function.get("parameters") is not None:
            where = f"tool {function['name']!r}'s parameters"
            function = {**function, "parameters": vetted(function["parameters"], settings, "tools", where)}
        checked.append({**tool, "function": function})
    return Constraint(tools=text if checked == tools else _canonical(checked), param="tools")


def vetted(schema: Any, settings: Settings, param: str, where: str = "") -> Any:
    """The schema as its grammar compiles it; a 400 on `param` when the grammar cannot take it."""
    limits = SchemaLimits(
        max_depth=settings.schema_max_depth,
        max_repeat=settings.schema_max_repeat,
        max_properties=settings.schema_max_properties,
        max_refs=settings.schema_max_refs,
        max_shortest=settings.schema_max_shortest,
    )
    try:
        return vet_schema(schema, limits)
    except SchemaRefused as refused:
        message = f"In {where}: {refused.message}" if where else refused.message
        raise bad_request(refused.code, message, param) from None


def _schema_text(schema: Any, settings: Settings, param: str) -> str:
    try:
        text = _canonical(schema)
    except ValueError:
        message = "The JSON schema holds a number JSON cannot carry."
        raise bad_request("invalid_schema", message, param) from None
    size, limit = len(text.encode()), settings.max_schema_bytes
    if size > limit:
        raise bad_request("schema_too_large", f"The JSON schema is {size} bytes; at most {limit}.", param)
    return text


def _canonical(schema: Any) -> str:
    # Keys keep their order: the answer's properties follow it.
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
