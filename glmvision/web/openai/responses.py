"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API over the chat pipeline.

A request becomes the Chat Completions body the chat route takes (responses_protocol.chat_body), is
validated and answered by the same code, and its answer is dressed as Responses output items, whole or
as the documented typed events.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, jsonify, request
from flask.wrappers import Response
from pydantic import ValidationError

from glmvision.core.errors import APIError, api_error, api_error_object, error_object
from glmvision.core.generation import Generation, ToolCall
from glmvision.postprocess.pipeline import Piece, reply_pipeline
from glmvision.serving import pipeline
from glmvision.serving.context import RequestContext, admit, new_context
from glmvision.serving.pipeline import Answer, ChatInput
from glmvision.serving.responses_store import ResponseStore, scope_of
from glmvision.web.openai.protocol import ChatCompletionRequest
from glmvision.web.openai.responses_protocol import (
    ChatBody,
    DeletedResponse,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    chat_body,
)
from glmvision.web.openai.routes import parse_chat
from glmvision.web.protocol import parse_body, validation_error
from glmvision.web.route_table import route
from glmvision.web.state import app_state, service

log = logging.getLogger("glmvision")
bp = Blueprint("responses", __name__)


def init_app(app: Flask) -> None:
    """Serve the Responses API (its stored responses live in the app's state)."""
    app.register_blueprint(bp)


def _store() -> ResponseStore:
    store = app_state().responses
    assert store is not None  # create_app always makes one
    return store


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _not_found(response_id: str, param: str | None = None) -> APIError:
    message = f"No stored response has the id {response_id!r} for this API key."
    return api_error("response_not_found", message, param)


class Prepared:
    """A validated request: its body, the chat input it became, and the answer under way."""

    def __init__(self, context: RequestContext) -> None:
        self.context = context
        settings = context.settings
        self.body = parse_body(request, ResponseRequest, settings.max_json_depth)
        self.body.check_supported()
        self.scope = scope_of(context.key_id)
        self.store = _store()  # a stream stores its response after the request's context is gone
        earlier: list[dict[str, Any]] = []
        if self.body.previous_response_id is not None:
            stored = self.store.get(self.scope, self.body.previous_response_id)
            if stored is None:
                raise _not_found(self.body.previous_response_id, "previous_response_id")
            earlier = stored["messages"]
        self.translated, self.conversation = chat_body(self.body, earlier)
        capabilities = context.service.backend.capabilities()
        with _renamed(self.translated):
            try:
                chat_request = ChatCompletionRequest.model_validate(self.translated.body)
            except ValidationError as exc:
                raise validation_error(exc) from None
            turns, params = parse_chat(
                chat_request, settings, capabilities.model_names, capabilities.adapters
            )
            self.chat, self.answer = pipeline.answer(
                context, turns, params, "input", streamed=self.body.stream
            )
        self.id = _item_id("resp")
        self.created = int(time.time())
        self.model = self.body.model or self.answer.model_id

    def response(self, output: list[Any], result: Generation | None, status: str) -> ResponseObject:
        """The response object with `output`, its usage once `result` is known."""
        body = self.body
        usage = None
        if result is not None:
            details = InputTokensDetails(
                cached_tokens=result.cached_tokens or 0, image_tokens=result.image_tokens
            )
            usage = ResponseUsage(
                input_tokens=result.prompt_tokens,
                input_tokens_details=details,
                output_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            )
        filtered = result is not None and result.finish_reason == "content_filter"
        reason = "content_filter" if filtered else "max_output_tokens"
        incomplete = IncompleteDetails(reason=reason) if status == "incomplete" else None
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,  # type: ignore[arg-type]
            incomplete_details=incomplete,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=self.model,
            output=output,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            reasoning=body.reasoning.model_dump() if body.reasoning else {"effort": None, "summary": None},
            store=body.store,
            temperature=body.temperature,
            text=body.text.model_dump(by_alias=True, exclude_none=True)
            if body.text
            else {"format": {"type": "text"}},
            tool_choice=body.tool_choice or "auto",
            tools=body.tools or [],
            top_p=body.top_p,
            usage=usage,
            user=body.user,
            metadata=body.metadata or {},
            degraded=True if self.context.degraded else None,
        )

    def keep(self, response: ResponseObject, text: str, calls: list[ToolCall]) -> None:
        """Store the response (store: true) with the conversation a follow-up continues."""
        if not self.body.store:
            return
        reply: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            reply["tool_calls"] = [call.to_json() for call in calls]
        record = {"response": response.to_json(), "messages": [*self.conversation, reply]}
        self.store.put(self.scope, self.id, record)


class _renamed:
    """Errors raised inside name the Responses request's fields, not the chat body's."""

    def __init__(self, translated: ChatBody) -> None:
        self.translated = translated

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, trace: Any) -> None:
        if isinstance(exc, APIError):
            self.translated.renamed(exc)


def _status(result: Generation) -> str:
    return "incomplete" if result.finish_reason in ("length", "content_filter") else "completed"


@route(bp, "responses.create_response")
def create_response() -> Response:
    """Answer input items, whole or as typed Server-Sent Events."""
    context = new_context(service())
    admit(context)
    prepared = Prepared(context)
    if prepared.body.stream:
        context.record.stream = True
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(_events(prepared), mimetype="text/event-stream", headers=headers)
    settings = context.settings
    result = prepared.answer.finish(settings, context.client_gone)
    reply = reply_pipeline(prepared.chat.params, pipeline.box_stage(prepared.chat)).whole(
        Piece(result.reasoning or "", result.text, result.tool_calls)
    )
    status = _status(result)
    output: list[Any] = []
    if result.reasoning is not None:  # thinking was on: its item even when the model wrote none
        output.append(_reasoning(_item_id("rs"), result.reasoning, "completed"))
    calls = list(reply.calls)
    if reply.content or not calls:
        output.append(_message(_item_id("msg"), reply.content, status))
    output += [_call(_item_id("fc"), call) for call in calls]
    response = prepared.response(output, result, status)
    prepared.keep(response, reply.content, calls)
    return jsonify(response.to_json())


def _reasoning(item_id: str, text: str, status: str) -> ReasoningItem:
    content = [ReasoningText(text=text)] if text or status != "in_progress" else []
    return ReasoningItem(id=item_id, content=content, status=status)  # type: ignore[arg-type]


def _message(item_id: str, text: str, status: str) -> OutputMessage:
    content = [OutputText(text=text)] if status != "in_progress" else []
    return OutputMessage(id=item_id, status=status, content=content)  # type: ignore[arg-type]


def _call(item_id: str, call: ToolCall, arguments: str | None = None) -> FunctionCallItem:
    done = arguments is None
    return FunctionCallItem(
        id=item_id,
        call_id=call.id,
        name=call.name,
        arguments=call.arguments if done else arguments,
        status="completed" if done else "in_progress",
    )


class _EventWriter:
    """Typed events, numbered in order, and the output items they describe."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking  # a reasoning item comes first, even when the model wrote none
        self.sequence = 0
        self.output: list[Any] = []
        self.open: tuple[str, str, list[str]] | None = None  # kind, item id, its text so far

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {text}\n\n"

    def _part(self, kind: str, text: str) -> dict[str, Any]:
        if kind == "reasoning":
            return ReasoningText(text=text).to_json()
        return OutputText(text=text).to_json()

    def text(self, kind: str, delta: str) -> Iterator[str]:
        """`delta` of reasoning or of the message, opening its item first."""
        if kind == "message" and self.thinking and self.open is None and not self.output:
            yield from self.text("reasoning", "")
        if self.open is None or self.open[0] != kind:
            yield from self.close()
            item_id = _item_id("rs" if kind == "reasoning" else "msg")
            self.open = (kind, item_id, [])
            index = len(self.output)
            empty = (
                _reasoning(item_id, "", "in_progress")
                if kind == "reasoning"
                else _message(item_id, "", "in_progress")
            )
            yield self.event("response.output_item.added", output_index=index, item=empty.to_json())
            yield self.event(
                "response.content_part.added",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=self._part(kind, ""),
            )
        _, item_id, texts = self.open
        texts.append(delta)
        place = {"item_id": item_id, "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            yield self.event("response.reasoning_text.delta", **place, delta=delta)
        else:
            yield self.event("response.output_text.delta", **place, delta=delta, logprobs=[])

    def close(self, status: str = "completed") -> Iterator[str]:
        """Finish the open item, if any."""
        if self.open is None:
            return
        kind, item_id, texts = self.open
        self.open = None
        text = "".join(texts)
        place = {"item_id": item_id, "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            yield self.event("response.reasoning_text.done", **place, text=text)
            item: Any = _reasoning(item_id, text, "completed")
        else:
            yield self.event("response.output_text.done", **place, text=text, logprobs=[])
            item = _message(item_id, text, status)
        yield self.event("response.content_part.done", **place, part=self._part(kind, text))
        yield self.event("response.output_item.done", output_index=len(self.output), item=item.to_json())
        self.output.append(item)

    def call(self, call: ToolCall) -> Iterator[str]:
        """A function call: its item, its arguments whole, then done."""
        item_id, index = _item_id("fc"), len(self.output)
        yield self.event(
            "response.output_item.added", output_index=index, item=_call(item_id, call, "").to_json()
        )
        place = {"item_id": item_id, "output_index": index}
        yield self.event("response.function_call_arguments.delta", **place, delta=call.arguments)
        yield self.event(
            "response.function_call_arguments.done", **place, name=call.name, arguments=call.arguments
        )
        item = _call(item_id, call)
        yield self.event("response.output_item.done", output_index=index, item=item.to_json())
        self.output.append(item)

    @property
    def message_text(self) -> str:
        return "".join(item.content[0].text for item in self.output if isinstance(item, OutputMessage))


def _events(prepared: Prepared) -> Iterator[str]:
    """response.created, in_progress, the items' events as tokens arrive, then completed (or incomplete)."""
    answer: Answer = prepared.answer
    chat: ChatInput = prepared.chat
    settings = prepared.context.settings
    writer = _EventWriter(chat.params.enable_thinking)
    post = reply_pipeline(chat.params, pipeline.box_stage(chat)).stream()
    calls: list[ToolCall] = []
    try:
        started = prepared.response([], None, "in_progress").to_json()
        yield writer.event("response.created", response=started)
        yield writer.event("response.in_progress", response=started)
        try:
            for delta in answer.deltas(settings):
                shown = post.feed(Piece(delta.reasoning, delta.content))
                if shown.reasoning:
                    yield from writer.text("reasoning", shown.reasoning)
                if shown.content:
                    yield from writer.text("message", shown.content)
                calls += shown.calls
        except APIError as exc:
            error = api_error_object(exc)
            yield writer.event("error", code=error.code, message=error.message, param=error.param)
            return
        except Exception:
            log.exception("generation failed mid-stream")
            error = error_object(500, "internal_error", "Generation failed.", None)
            yield writer.event("error", code=error.code, message=error.message, param=None)
            return
        result = answer.result
        rest = post.finish(Piece(calls=result.tool_calls))
        if rest.content:
            yield from writer.text("message", rest.content)
        calls += rest.calls
        status = _status(result)
        if not calls and not any(isinstance(item, OutputMessage) for item in writer.output):
            if writer.open is None or writer.open[0] != "message":
                yield from writer.text("message", "")
        if writer.thinking and writer.open is None and not writer.output:  # calls only: reasoning first
            yield from writer.text("reasoning", "")
        yield from writer.close(status)
        for call in calls:
            yield from writer.call(call)
        response = prepared.response(writer.output, result, status)
        prepared.keep(response, writer.message_text, calls)
        yield writer.event(f"response.{status}", response=response.to_json())
    finally:
        answer.stream.close()  # the client went away (or we are done): free the model now


@route(bp, "responses.get_response")
def get_response(response_id: str) -> Response:
    """A stored response, to the API key that created it."""
    context = new_context(service())
    stored = _store().get(scope_of(context.key_id), response_id)
    if stored is None:
        raise _not_found(response_id)
    return jsonify(stored["response"])


@route(bp, "responses.delete_response")
def delete_response(response_id: str) -> Response:
    """Forget a stored response."""
    context = new_context(service())
    if not _store().delete(scope_of(context.key_id), response_id):
        raise _not_found(response_id)
    return jsonify(DeletedResponse(id=response_id).to_json())
