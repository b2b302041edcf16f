"""POST /v1/chat/completions: OpenAI's Chat Completions contract, streaming included."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from flask import Blueprint, jsonify, request
from flask.wrappers import Response

from glmvision.core.config import Settings
from glmvision.core.errors import APIError, api_error_object, bad_request, error_object
from glmvision.core.generation import Constraint, Generation, GenerationParams, ToolCall, ToolChoice
from glmvision.core.jsontext import parse_json_text
from glmvision.core.lora import adapter_of_model
from glmvision.core.responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    FinishReason,
    FunctionDelta,
    ResponseModel,
    ToolCallDelta,
    ToolCallObject,
)
from glmvision.postprocess.tools import ToolCallStream, allowed_tools, parse_tool_calls
from glmvision.serving import pipeline
from glmvision.serving.context import admit, new_context
from glmvision.serving.pipeline import (
    Answer,
    ChatInput,
    ImageRef,
    Turn,
    check_prompt_length,
    generation_params,
    json_constraint,
    new_request_id,
    tool_constraint,
    usage,
)
from glmvision.web.protocol import ChatCompletionRequest, ChatMessage, parse_body
from glmvision.web.state import service

log = logging.getLogger("glmvision")
bp = Blueprint("openai", __name__)


def _tool_calls(message: ChatMessage, index: int, max_depth: int) -> tuple[dict[str, Any], ...]:
    """An assistant message's tool calls, their arguments parsed (the chat template walks them)."""
    if not message.tool_calls:
        return ()
    if message.role != "assistant":
        raise bad_request(
            "invalid_value", "Only assistant messages may carry tool_calls.", f"messages.{index}.tool_calls"
        )
    calls: list[dict[str, Any]] = []
    for number, call in enumerate(message.tool_calls):
        where = f"messages.{index}.tool_calls.{number}.function.arguments"
        try:
            arguments = parse_json_text(call.function.arguments or "{}", max_depth - 1)
        except ValueError as exc:
            message = f"Field {where!r} must be a JSON object's text ({exc})."
            raise bad_request("invalid_value", message, where) from None
        if not isinstance(arguments, dict):
            raise bad_request("invalid_value", f"Field {where!r} must be a JSON object's text.", where)
        function = {"name": call.function.name, "arguments": arguments}
        calls.append({"id": call.id, "type": "function", "function": function})
    return tuple(calls)


def _turns(messages: list[ChatMessage], settings: Settings, characters: int = 0) -> list[Turn]:
    """The conversation as turns; `characters`: the prompt's text outside the messages (the tools)."""
    if len(messages) > settings.max_messages:
        refusal = f"The request has {len(messages)} messages; at most {settings.max_messages} are accepted."
        raise bad_request("too_many_messages", refusal, "messages")
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}.content"
        role = "system" if message.role == "developer" else message.role
        if role == "tool" and message.tool_call_id is None:
            where = f"messages.{index}.tool_call_id"
            raise bad_request("missing_field", f"Field {where!r} is required in a tool message.", where)
        content = message.content
        parts: list[Any] = []
        if isinstance(content, str):
            parts.append(content)
        elif content is not None:
            for number, part in enumerate(content):
                if part.type == "text":
                    parts.append(part.text)
                elif role != "user":
                    raise bad_request("invalid_value", "Only user messages may carry images.", where)
                else:
                    parts.append(ImageRef(part.image_url.url, f"{where}.{number}.image_url.url"))
        characters += sum(len(part) for part in parts if isinstance(part, str))
        characters += sum(len(call.function.arguments) for call in message.tool_calls or ())
        call_id = message.tool_call_id if role == "tool" else None
        turns.append(Turn(role, parts, _tool_calls(message, index, settings.max_json_depth), call_id))
    if turns[-1].role not in ("user", "tool"):
        raise bad_request("invalid_value", "The last message must come from the user or a tool.", "messages")
    last = turns[-1].parts
    if turns[-1].role == "user" and not any(isinstance(part, ImageRef) or part.strip() for part in last):
        raise bad_request(
            "invalid_value", "The last user message is empty.", f"messages.{len(turns) - 1}.content"
        )
    check_prompt_length(characters, settings, "messages")
    return turns


def parse_chat(
    body: ChatCompletionRequest,
    settings: Settings,
    model_names: tuple[str, ...],
    adapters: tuple[str, ...] | None = (),
) -> tuple[list[Turn], GenerationParams]:
    """Translate a validated chat completion request into the shared pipeline's input."""
    adapter = adapter_of_model(body.model, model_names, adapters)
    limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = generation_params(
        settings,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        enable_thinking=body.enable_thinking,
        stop=body.stop_strings,
        min_new_tokens=body.min_tokens,
        param=limit_param,
        constraint=_constraint(body, settings),
        adapter=adapter,
    )
    tools, choice = _tools(body)
    if tools:
        params = replace(params, tools=tools, tool_choice=choice)
    if choice is not None and choice.forces_call:  # a call, whatever response_format says of text
        allowed = allowed_tools(tools, choice)
        params = replace(params, constraint=tool_constraint(allowed, settings))
    return _turns(body.messages, settings, sum(len(json.dumps(tool)) for tool in tools)), params


def _tools(body: ChatCompletionRequest) -> tuple[tuple[dict[str, Any], ...], ToolChoice | None]:
    """The request's tools as the template renders them, and its tool choice checked against them."""
    tools = tuple(tool.to_json() for tool in body.tools or ())
    names = [tool["function"]["name"] for tool in tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            where = f"tools.{index}.function.name"
            raise bad_request("invalid_value", f"Two tools are named {name!r}.", where)
    choice = body.tool_choice
    if choice is not None and choice.forces_call and not tools:
        raise bad_request("invalid_value", f"tool_choice {choice.mode!r} needs 'tools'.", "tool_choice")
    if choice is not None and choice.mode == "function" and choice.name not in names:
        raise bad_request(
            "unknown_tool", f"tool_choice names {choice.name!r}, which is not in 'tools'.", "tool_choice"
        )
    return tools, (choice or ToolChoice("auto")) if tools else None


def _constraint(body: ChatCompletionRequest, settings: Settings) -> Constraint | None:
    """response_format as a decoding constraint (none for text)."""
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object" or form.json_schema is None:
        return json_constraint(None, settings, "response_format")
    return json_constraint(form.json_schema.schema_, settings, "response_format.json_schema.schema")


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    """Answer a conversation, whole or as Server-Sent Events."""
    context = new_context(service())
    state, settings = context.service, context.settings
    admit(context)
    body = parse_body(request, ChatCompletionRequest, settings.max_json_depth)
    turns, params = parse_chat(body, settings, state.backend.model_names(), state.backend.adapters())
    chat, answer = pipeline.answer(context, turns, params, "messages", streamed=body.stream)
    meta: dict[str, Any] = {
        "id": new_request_id("chatcmpl"),
        "created": int(time.time()),
        "model": body.model or answer.model_id,
    }
    if context.degraded:
        meta["degraded"] = True
    if body.stream:
        context.record.stream = True
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(answer, chat, meta, include_usage, settings)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(events, mimetype="text/event-stream", headers=headers)
    result = answer.finish(settings, context.client_gone)
    text, calls = _answer_calls(result, chat.params)
    boxes = pipeline.boxes_of(chat, text) or None
    message = AssistantMessage(
        content=text if text or not calls else None,
        reasoning_content=result.reasoning,
        tool_calls=[ToolCallObject.model_validate(call.to_json()) for call in calls] or None,
        boxes=boxes,
    )
    choice = Choice(message=message, finish_reason=_finish_reason(result, calls))
    return jsonify(ChatCompletion(**meta, choices=[choice], usage=usage(result)).to_json())


def _answer_calls(result: Generation, params: GenerationParams) -> tuple[str, list[ToolCall]]:
    """The answer's text without its tool calls, and the calls (an upstream's own last, as streamed)."""
    allowed = allowed_tools(params.tools, params.tool_choice)
    text, calls = parse_tool_calls(result.text, allowed) if allowed else (result.text, [])
    return text, [*calls, *result.tool_calls]


def _finish_reason(result: Generation, calls: list[ToolCall]) -> FinishReason:
    # As vLLM does: an answer that called a tool says so, even one cut short after its call.
    return "tool_calls" if calls else result.finish_reason  # type: ignore[return-value]


def _sse(payload: ResponseModel, **dump: Any) -> str:
    text = json.dumps(payload.to_json(**dump), ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _events(
    answer: Answer, chat: ChatInput, meta: dict[str, Any], include_usage: bool, settings: Settings
) -> Iterator[str]:
    """Chunks as tokens arrive: role first, then deltas, the finish reason, usage if asked, [DONE]."""
    # Without include_usage the chunks carry no `usage` key at all; with it, null until the last.
    dump: dict[str, Any] = {} if include_usage else {"exclude": {"usage"}}

    def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return _sse(ChatCompletionChunk(**meta, choices=[choice]), **dump)

    params = chat.params
    allowed = allowed_tools(params.tools, params.tool_choice)
    calls = ToolCallStream(allowed) if allowed else None
    sent: list[ToolCall] = []

    def call_chunks(new: list[ToolCall]) -> Iterator[str]:
        """A call as OpenAI streams one: id, type and name first, then its arguments whole."""
        for call in new:
            index = len(sent)
            sent.append(call)
            named = FunctionDelta(name=call.name, arguments="")
            yield chunk(
                Delta(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function", function=named)])
            )
            arguments = FunctionDelta(arguments=call.arguments)
            yield chunk(Delta(tool_calls=[ToolCallDelta(index=index, function=arguments)]))

    try:
        yield chunk(Delta(role="assistant", content=""))
        try:
            for delta in answer.deltas(settings):
                content, new = calls.feed(delta.content) if calls is not None else (delta.content, [])
                if delta.reasoning or content:
                    yield chunk(Delta(reasoning_content=delta.reasoning or None, content=content or None))
                yield from call_chunks(new)
        except APIError as exc:
            # Headers are gone already: report the failure in the stream, as OpenAI-style servers do.
            yield _sse(ErrorResponse(error=api_error_object(exc)))
            yield "data: [DONE]\n\n"
            return
        except Exception:
            log.exception("generation failed mid-stream")
            yield _sse(ErrorResponse(error=error_object(500, "internal_error", "Generation failed.", None)))
            yield "data: [DONE]\n\n"
            return
        result = answer.result
        if calls is not None and (rest := calls.finish()):
            yield chunk(Delta(content=rest))
        yield from call_chunks(list(result.tool_calls))
        text, _ = _answer_calls(result, params)
        finish = "tool_calls" if sent else result.finish_reason
        yield chunk(Delta(boxes=pipeline.boxes_of(chat, text) or None), finish)  # type: ignore[arg-type]
        if include_usage:
            yield _sse(ChatCompletionChunk(**meta, choices=[], usage=usage(result)))
        yield "data: [DONE]\n\n"
    finally:
        answer.stream.close()  # the client went away (or we are done): free the model now
