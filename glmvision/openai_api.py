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
from .errors import APIError, bad_request, error_object
from .generation import GenerationParams
from .pipeline import Answer, ImageRef, Turn, check_prompt_length, generation_params, new_request_id, usage
from .schemas import ChatCompletionRequest, ChatMessage, parse_body
from .service import service

log = logging.getLogger("glmvision")
bp = Blueprint("openai", __name__)

MAX_STOP_STRINGS = 8


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


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not item for item in stops):
        raise bad_request("invalid_value", f"'stop' takes 1 to {MAX_STOP_STRINGS} non-empty strings.", "stop")
    return tuple(stops)


def parse_chat(
    body: ChatCompletionRequest, settings: Settings, model_names: tuple[str, ...]
) -> tuple[list[Turn], GenerationParams]:
    """Translate a chat completion request into the shared pipeline's input."""
    if body.n != 1:
        raise bad_request("invalid_value", "Only n=1 is supported.", "n")
    if body.model is not None and body.model not in model_names:
        raise APIError(404, "model_not_found", f"The model {body.model!r} does not exist.", "model")
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking", False)
    if not isinstance(thinking, bool):
        raise bad_request(
            "invalid_type", "enable_thinking must be a boolean.", "chat_template_kwargs.enable_thinking"
        )
    limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = generation_params(
        settings,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        enable_thinking=thinking,
        stop=_stop_strings(body.stop),
        min_new_tokens=body.min_tokens,
        param=limit_param,
    )
    return _turns(body.messages, settings), params


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    """Answer a conversation, whole or as Server-Sent Events."""
    state = service()
    settings = state.settings
    body = parse_body(request, ChatCompletionRequest)
    turns, params = parse_chat(body, settings, state.backend.model_names())
    _, answer = pipeline.answer(state.backend, turns, params, settings, state.fetch_policy, "messages")
    meta = {
        "id": new_request_id("chatcmpl"),
        "created": int(time.time()),
        "model": body.model or answer.model_id,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(answer, meta, include_usage, settings)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(events, mimetype="text/event-stream", headers=headers)
    result = answer.finish(settings, pipeline.client_gone_check(request.environ))
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
    return jsonify({**meta, "object": "chat.completion", "choices": [choice], "usage": usage(result)})


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _events(answer: Answer, meta: dict[str, Any], include_usage: bool, settings: Settings) -> Iterator[str]:
    """Chunks as tokens arrive: role first, then deltas, the finish reason, usage if asked, [DONE]."""
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            for delta in answer.deltas(settings):
                piece = {"reasoning_content": delta.reasoning} if delta.reasoning else {}
                if delta.content:
                    piece["content"] = delta.content
                yield chunk(piece)
        except APIError as exc:
            # Headers are gone already: report the failure in the stream, as OpenAI-style servers do.
            yield _sse(
                {"error": error_object(exc.code or 500, exc.error_code, exc.description or "", exc.param)}
            )
            yield "data: [DONE]\n\n"
            return
        except Exception:
            log.exception("generation failed mid-stream")
            yield _sse({"error": error_object(500, "internal_error", "Generation failed.", None)})
            yield "data: [DONE]\n\n"
            return
        result = answer.result
        yield chunk({}, result.finish_reason)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(result)})
        yield "data: [DONE]\n\n"
    finally:
        answer.stream.close()  # the client went away (or we are done): free the model now
