"""POST /v1/chat/completions: OpenAI's Chat Completions contract, streaming included."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from flask import Blueprint, jsonify, request
from flask.wrappers import Response

from glmvision.core.config import Settings
from glmvision.core.errors import APIError, api_error_object, bad_request, error_object
from glmvision.core.generation import Generation, GenerationParams, TokenLogprob, ToolCall
from glmvision.core.jsontext import parse_json_text
from glmvision.core.lora import adapter_of_model
from glmvision.core.responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ErrorResponse,
    FinishReason,
    FunctionDelta,
    ResponseModel,
    TokenLogprobEntry,
    ToolCallDelta,
    ToolCallObject,
    Usage,
)
from glmvision.postprocess.pipeline import Piece, reply_pipeline
from glmvision.serving import pipeline
from glmvision.serving.context import admit, new_context
from glmvision.serving.pipeline import (
    Answer,
    ChatInput,
    ImageRef,
    Turn,
    VideoRef,
    new_request_id,
    usage,
)
from glmvision.web.openai.protocol import ChatCompletionRequest, ChatMessage
from glmvision.web.protocol import parse_body
from glmvision.web.route_table import route
from glmvision.web.state import service

log = logging.getLogger("glmvision")
bp = Blueprint("openai", __name__)


def _tool_calls(message: ChatMessage, index: int, max_depth: int) -> tuple[dict[str, Any], ...]:
    """An assistant message's tool calls, their arguments parsed (the chat template walks them)."""
    if not message.tool_calls:  # only an assistant's: the model checks
        return ()
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


def _turns(messages: list[ChatMessage], settings: Settings) -> list[Turn]:
    """The conversation as turns (the model has checked the rules across messages)."""
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}.content"
        role = "system" if message.role == "developer" else message.role
        content = message.content
        parts: list[Any] = []
        if isinstance(content, str):
            parts.append(content)
        elif content is not None:
            for number, part in enumerate(content):
                if part.type == "text":
                    parts.append(part.text)
                elif part.type == "video_url":
                    parts.append(VideoRef(part.video_url.url, f"{where}.{number}.video_url.url"))
                else:
                    image, at = part.image_url, f"{where}.{number}.image_url"
                    parts.append(ImageRef(image.url, f"{at}.url", image.budget(at)))
        call_id = message.tool_call_id if role == "tool" else None
        turns.append(Turn(role, parts, _tool_calls(message, index, settings.max_json_depth), call_id))
    return turns


def parse_chat(
    body: ChatCompletionRequest,
    settings: Settings,
    model_names: tuple[str, ...],
    adapters: tuple[str, ...] | None = (),
) -> tuple[list[Turn], GenerationParams]:
    """Translate a validated chat completion request into the shared pipeline's input."""
    params = body.to_generation_params(settings, adapter_of_model(body.model, model_names, adapters))
    return _turns(body.messages, settings), params


@route(bp, "openai.chat_completions")
def chat_completions() -> Response:
    """Answer a conversation, whole or as Server-Sent Events; n choices of it when asked."""
    context = new_context(service())
    state, settings = context.service, context.settings
    admit(context)
    body = parse_body(request, ChatCompletionRequest, settings.max_json_depth)
    capabilities = state.backend.capabilities()
    turns, params = parse_chat(body, settings, capabilities.model_names, capabilities.adapters)
    chat, answer = pipeline.answer(context, turns, params, "messages", streamed=body.stream, n=body.n)
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
    try:
        results = [choice.finish(settings, context.client_gone) for choice in answer.choices]
    finally:
        for choice in answer.choices:
            choice.stream.close()  # one choice failed: the others stop too
    choices = []
    for index, result in enumerate(results):
        reply = reply_pipeline(chat.params, pipeline.box_stage(chat)).whole(_piece(result))
        text, calls = reply.content, list(reply.calls)
        message = AssistantMessage(
            content=text if text or not calls else None,
            reasoning_content=result.reasoning,
            tool_calls=[ToolCallObject.model_validate(call.to_json()) for call in calls] or None,
            boxes=list(reply.boxes) or None,
        )
        logprobs = None if result.logprobs is None else _logprobs(result.logprobs)
        choices.append(
            Choice(
                index=index, message=message, logprobs=logprobs, finish_reason=_finish_reason(result, calls)
            )
        )
    return jsonify(ChatCompletion(**meta, choices=choices, usage=_usage(results)).to_json())


def _usage(results: list[Generation]) -> Usage:
    """The request's usage: the prompt once (its prefill is shared), every choice's completion tokens."""
    return usage(replace(results[0], completion_tokens=sum(result.completion_tokens for result in results)))


def _logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """Tokens' log-probabilities in OpenAI's shape."""
    return ChoiceLogprobs(content=[TokenLogprobEntry.model_validate(token.to_json()) for token in tokens])


def _piece(result: Generation) -> Piece:
    """The answer as the reply stages take it (an upstream's own tool calls after any in its text)."""
    return Piece(result.reasoning or "", result.text, result.tool_calls)


def _finish_reason(result: Generation, calls: list[ToolCall]) -> FinishReason:
    # As vLLM does: an answer that called a tool says so, even one cut short after its call.
    return "tool_calls" if calls else result.finish_reason  # type: ignore[return-value]


def _sse(payload: ResponseModel, **dump: Any) -> str:
    text = json.dumps(payload.to_json(**dump), ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _events(
    answer: Answer, chat: ChatInput, meta: dict[str, Any], include_usage: bool, settings: Settings
) -> Iterator[str]:
    """Chunks as tokens arrive, each choice's in turn (each chunk names its choice's index): role
    first, then deltas, the finish reason; then usage if asked, and [DONE]."""
    # Without include_usage the chunks carry no `usage` key at all; with it, null until the last.
    dump: dict[str, Any] = {} if include_usage else {"exclude": {"usage"}}
    choices = answer.choices
    running = [
        iter(_choice_events(choice, index, chat, meta, dump, settings))
        for index, choice in enumerate(choices)
    ]
    try:
        try:
            while running:
                for events in list(running):
                    event = next(events, None)
                    if event is None:
                        running.remove(events)
                    else:
                        yield event
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
        if include_usage:
            results = [choice.result for choice in choices]
            yield _sse(ChatCompletionChunk(**meta, choices=[], usage=_usage(results)))
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            choice.stream.close()  # the client went away (or we are done): free the model now


def _choice_events(
    answer: Answer,
    index: int,
    chat: ChatInput,
    meta: dict[str, Any],
    dump: dict[str, Any],
    settings: Settings,
) -> Iterator[str]:
    """One choice's chunks: its role, its deltas (with their tokens' logprobs when asked), its finish."""
    asked = chat.params.logprobs is not None
    waiting: list[TokenLogprob] = []  # tokens whose text the reply stages still hold back

    def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> str:
        logprobs = None
        if asked and waiting and (delta.content or delta.reasoning_content or finish_reason is not None):
            logprobs = _logprobs(waiting)
            waiting.clear()
        choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return _sse(ChatCompletionChunk(**meta, choices=[choice]), **dump)

    post = reply_pipeline(chat.params, pipeline.box_stage(chat)).stream()
    sent: list[ToolCall] = []

    def call_chunks(new: list[ToolCall]) -> Iterator[str]:
        """A call as OpenAI streams one: id, type and name first, then its arguments whole."""
        for call in new:
            number = len(sent)
            sent.append(call)
            named = FunctionDelta(name=call.name, arguments="")
            yield chunk(
                Delta(tool_calls=[ToolCallDelta(index=number, id=call.id, type="function", function=named)])
            )
            arguments = FunctionDelta(arguments=call.arguments)
            yield chunk(Delta(tool_calls=[ToolCallDelta(index=number, function=arguments)]))

    yield chunk(Delta(role="assistant", content=""))
    for delta in answer.deltas(settings):
        waiting.extend(delta.logprobs)
        shown = post.feed(Piece(delta.reasoning, delta.content))
        if shown.reasoning or shown.content:
            reasoning, content = shown.reasoning or None, shown.content or None
            yield chunk(Delta(reasoning_content=reasoning, content=content))
        yield from call_chunks(list(shown.calls))
    result = answer.result
    rest = post.finish(Piece(calls=result.tool_calls))
    if rest.content:
        yield chunk(Delta(content=rest.content))
    yield from call_chunks(list(rest.calls))
    finish = "tool_calls" if sent else result.finish_reason
    yield chunk(Delta(boxes=list(rest.boxes) or None), finish)  # type: ignore[arg-type]
