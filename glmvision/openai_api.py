"""POST /v1/chat/completions: OpenAI's Chat Completions contract, streaming included."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, jsonify, request
from flask.wrappers import Response

from . import pipeline
from .config import Settings
from .errors import APIError, api_error_object, bad_request, error_object
from .generation import GenerationParams
from .lora import adapter_of_model
from .ops.record import current_record
from .pipeline import (
    Answer,
    ChatInput,
    ImageRef,
    Turn,
    check_prompt_length,
    generation_params,
    new_request_id,
    usage,
)
from .responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    FinishReason,
    ResponseModel,
)
from .schemas import ChatCompletionRequest, ChatMessage, parse_body
from .service import admit, service

log = logging.getLogger("glmvision")
bp = Blueprint("openai", __name__)


def _turns(messages: list[ChatMessage], settings: Settings) -> list[Turn]:
    turns: list[Turn] = []
    characters = 0
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
                elif role != "user":
                    raise bad_request("invalid_value", "Only user messages may carry images.", where)
                else:
                    parts.append(ImageRef(part.image_url.url, f"{where}.{number}.image_url.url"))
        characters += sum(len(part) for part in parts if isinstance(part, str))
        turns.append(Turn(role, parts))
    if turns[-1].role != "user":
        raise bad_request("invalid_value", "The last message must come from the user.", "messages")
    last = turns[-1].parts
    if not any(isinstance(part, ImageRef) or part.strip() for part in last):
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
        adapter=adapter,
    )
    return _turns(body.messages, settings), params


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    """Answer a conversation, whole or as Server-Sent Events."""
    state = service()
    settings = state.settings
    ticket = admit()
    body = parse_body(request, ChatCompletionRequest)
    turns, params = parse_chat(body, settings, state.backend.model_names(), state.backend.adapters())
    chat, answer = pipeline.answer(state, ticket, turns, params, "messages", streamed=body.stream)
    record = current_record()
    meta: dict[str, Any] = {
        "id": new_request_id("chatcmpl"),
        "created": int(time.time()),
        "model": body.model or answer.model_id,
    }
    if record is not None and record.degraded:
        meta["degraded"] = True
    if body.stream:
        if record is not None:
            record.stream = True
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(answer, chat, meta, include_usage, settings)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(events, mimetype="text/event-stream", headers=headers)
    result = answer.finish(settings, pipeline.client_gone_check(request.environ))
    boxes = pipeline.boxes_of(chat, result.text) or None
    message = AssistantMessage(content=result.text, reasoning_content=result.reasoning, boxes=boxes)
    choice = Choice(message=message, finish_reason=result.finish_reason)
    return jsonify(ChatCompletion(**meta, choices=[choice], usage=usage(result)).to_json())


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

    try:
        yield chunk(Delta(role="assistant", content=""))
        try:
            for delta in answer.deltas(settings):
                yield chunk(Delta(reasoning_content=delta.reasoning or None, content=delta.content or None))
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
        yield chunk(Delta(boxes=pipeline.boxes_of(chat, result.text) or None), result.finish_reason)
        if include_usage:
            yield _sse(ChatCompletionChunk(**meta, choices=[], usage=usage(result)))
        yield "data: [DONE]\n\n"
    finally:
        answer.stream.close()  # the client went away (or we are done): free the model now
