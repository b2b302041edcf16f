"""The OpenAPI 3.1 document, built from the request and response models and a table of routes."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, jsonify
from flask.wrappers import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from glmvision.core.errors import ERRORS
from glmvision.core.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    NativeErrorResponse,
    Readiness,
    SeedChatResponse,
    VisionResponse,
)
from glmvision.web import route_table
from glmvision.web.native.protocol import SeedChatRequest, VisionRequest
from glmvision.web.openai.protocol import ChatCompletionRequest
from glmvision.web.openai.responses_protocol import DeletedResponse, ResponseObject, ResponseRequest
from glmvision.web.route_table import BY_ENDPOINT, RouteFacts
from glmvision.web.usage import UsageReport

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
# A Flask rule's variable (`<name>` or `<converter:name>`), written `{name}` in the document.
PATH_VARIABLE = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: `/v1/models/<path:model_id>` -> `/v1/models/{model_id}`."""
    return PATH_VARIABLE.sub(r"{\1}", rule)


# Which codes each kind of route can answer with (besides internal_error, which any route can).
GUARDED = ("ip_not_allowed",)
KEYED = (
    *GUARDED,
    "missing_api_key",
    "invalid_api_key",
    "rate_limit_exceeded",
    "ratelimit_unavailable",
    "quota_exceeded",
)
BODY = (
    "invalid_json",
    "json_too_deep",
    "invalid_body",
    "missing_field",
    "invalid_type",
    "invalid_value",
    "prompt_too_long",
    "too_many_messages",
    "invalid_schema",
    "schema_too_large",
    "schema_too_complex",
    "schema_unsupported",
    "bad_request",
    "request_too_large",
    "unsupported_media_type",
)
IMAGE = (
    "invalid_base64",
    "unsupported_image_format",
    "invalid_image",
    "unsupported_aspect_ratio",
    "image_rejected",
    "image_too_large",
    "bad_video",
    "video_too_large",
    *(code for code in ERRORS if code.startswith("image_url_")),
)
GENERATION = (
    "model_not_allowed",
    "circuit_open",
    "overloaded",
    "queue_timeout",
    "request_timeout",
    "model_loading",
    "model_unavailable",
    "gpu_out_of_memory",
    "engine_failed",
    "engine_restarting",
    "row_failed",
    "preprocessing_busy",
    "grammar_busy",
    "client_closed",
    "upstream_rejected",
    "upstream_unavailable",
    "unsupported_parameter",
    "content_blocked",
    "moderation_unavailable",
)

# A 32x32 PNG: the examples run on any model, cheaply.
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42u3NMQEAAAQAMKTRP4VYSvBtBZbTHZ8qngkEAoFAIBAIBIIr"
    "C9JiAVggSmjwAAAAAElFTkSuQmCC"
)
EXAMPLE_DATA_URL = "data:image/png;base64," + EXAMPLE_PNG
EXAMPLE_CHAT = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is this?"},
                {"type": "image_url", "image_url": {"url": EXAMPLE_DATA_URL}},
            ],
        }
    ],
    "max_tokens": 4,
    "temperature": 0,
}
EXAMPLE_RESPONSE = {
    "input": [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What colour is this?"},
                {"type": "input_image", "image_url": EXAMPLE_DATA_URL, "detail": "low"},
            ],
        }
    ],
    "max_output_tokens": 4,
    "temperature": 0,
    "store": False,
}
CHAT_EVENTS = "With stream=true: `data: <{chunk}>` events (or one error event), then `data: [DONE]`."
RESPONSE_EVENTS = (
    "With stream=true: typed events (`event: <type>`, then `data:` the event with its type and "
    "sequence_number): "
    "response.created, response.in_progress, then per output item response.output_item.added, "
    "response.content_part.added, response.reasoning_text.delta / response.output_text.delta ..., "
    "their .done, response.content_part.done, response.output_item.done (a function call: "
    "response.function_call_arguments.delta and .done), and last response.completed or "
    "response.incomplete with the whole <{answer}> (or one `error` event)."
)


@dataclass(frozen=True)
class Route:
    """One operation: what it takes, what it answers and which error codes it may send."""

    endpoint: str  # its path, method and who may call it: glmvision.web.route_table
    summary: str
    answer: type[BaseModel]
    codes: tuple[str, ...] = ()
    request: type[BaseModel] | None = None
    examples: dict[str, Any] = field(default_factory=dict)
    streams: bool = False
    events: str = CHAT_EVENTS  # how the stream is told, {chunk} and {answer} naming their schemas
    answer_status: tuple[int, ...] = (200,)
    plain_text: str = ""  # an answer in text/plain, described by this
    security: tuple[dict[str, list[str]], ...] | None = None  # instead of the document's

    @property
    def facts(self) -> RouteFacts:
        """The route table's entry for this operation."""
        return BY_ENDPOINT[self.endpoint]

    @property
    def method(self) -> str:
        """The HTTP method, as OpenAPI writes it."""
        return self.facts.method.lower()

    @property
    def path(self) -> str:
        """The path, from the route table, its variables as OpenAPI writes them."""
        return openapi_path(self.facts.path)

    @property
    def variables(self) -> list[str]:
        """The path's variables, in order."""
        return PATH_VARIABLE.findall(self.facts.path)


ROUTES = (
    Route("api.healthz", "Liveness: 200 while the process runs.", Health),
    Route("api.health", "Liveness under vLLM's path: the same answer as /healthz.", Health),
    Route(
        "api.readyz",
        "Readiness: 200 once this worker's model is loaded, 503 with Retry-After before.",
        Readiness,
        GUARDED,
        answer_status=(200, 503),
    ),
    Route("openapi.openapi_json", "This document.", BaseModel, GUARDED),
    Route(
        "usage.get_usage",
        "Every named key's usage by UTC day (requests, tokens, images, errors) and limits; admin keys only.",
        UsageReport,
        (*KEYED, "admin_required"),
    ),
    Route(
        "ops.metrics",
        "Prometheus metrics of every worker; with GLMVISION_METRICS_KEY set, only for that bearer key.",
        BaseModel,
        (*GUARDED, "missing_api_key", "invalid_api_key"),
        plain_text="Prometheus text exposition format.",
        security=({}, {"bearerAuth": []}),
    ),
    Route(
        "api.list_models",
        "The served model, then one entry per LoRA adapter (`<id>:<name>`), in OpenAI's list shape.",
        ModelList,
        KEYED,
    ),
    Route(
        "api.retrieve_model",
        "One entry of the model list, by its id, an alias or `<id>:<adapter>`; 404 names the served ids.",
        ModelCard,
        (*KEYED, "model_not_found"),
    ),
    Route(
        "api.chat_vision",
        "Answer one question about one image (exactly one of image and image_url).",
        VisionResponse,
        (*KEYED, *BODY, *IMAGE, "adapter_not_found", *GENERATION),
        VisionRequest,
        {"image": EXAMPLE_PNG, "prompt": "What colour is this?", "max_new_tokens": 4, "temperature": 0},
    ),
    Route(
        "api.chat_seed",
        "The reference guides' shape: image_url and prompt in, response out.",
        SeedChatResponse,
        (*KEYED, *BODY, *IMAGE, "adapter_not_found", *GENERATION),
        SeedChatRequest,
        {"image_url": EXAMPLE_DATA_URL, "prompt": "What colour is this?", "max_new_tokens": 4},
    ),
    Route(
        "openai.chat_completions",
        "OpenAI's Chat Completions: the whole answer as JSON, or Server-Sent Events with stream=true.",
        ChatCompletion,
        (*KEYED, *BODY, *IMAGE, "too_many_images", "model_not_found", "unknown_tool", *GENERATION),
        ChatCompletionRequest,
        EXAMPLE_CHAT,
        streams=True,
    ),
    Route(
        "responses.create_response",
        "OpenAI's Responses API: input items (text, images, function calls and their outputs) in, output "
        "items out, whole or as typed Server-Sent Events with stream=true; stored for "
        "previous_response_id unless store=false.",
        ResponseObject,
        (
            *KEYED,
            *BODY,
            *IMAGE,
            "too_many_images",
            "unsupported_parameter",
            "model_not_found",
            "response_not_found",
            "unknown_tool",
            *GENERATION,
        ),
        ResponseRequest,
        EXAMPLE_RESPONSE,
        streams=True,
        events=RESPONSE_EVENTS,
    ),
    Route(
        "responses.get_response",
        "A stored response, to the API key that created it.",
        ResponseObject,
        (*KEYED, "response_not_found"),
    ),
    Route(
        "responses.delete_response",
        "Forget a stored response.",
        DeletedResponse,
        (*KEYED, "response_not_found"),
    ),
)


def _component_schemas() -> tuple[dict[str, Any], dict[tuple[type[BaseModel], str], Any]]:
    models: list[tuple[type[BaseModel], Any]] = [(ErrorResponse, "serialization")]
    models.append((NativeErrorResponse, "serialization"))
    models.append((ChatCompletionChunk, "serialization"))
    for route in ROUTES:
        if route.answer is not BaseModel:
            models.append((route.answer, "serialization"))
        if route.request is not None:
            models.append((route.request, "validation"))
    refs, definitions = models_json_schema(models, ref_template=REF)
    schemas = definitions["$defs"]
    schemas["ErrorCode"] = {
        "description": "Every error code, with its HTTP status and meaning.",
        "type": "string",
        "oneOf": [
            {"const": code, "description": f"{spec.status}: {spec.meaning}"} for code, spec in ERRORS.items()
        ],
    }
    return schemas, refs


def _retry_after() -> dict[str, Any]:
    return {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    }


def _error_responses(route: Route, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    envelope = ErrorResponse if route.facts.openai else NativeErrorResponse
    by_status: dict[int, list[str]] = {}
    for code in (*route.codes, "internal_error"):
        by_status.setdefault(ERRORS[code].status, []).append(code)
    responses: dict[str, Any] = {}
    for status, codes in sorted(by_status.items()):
        narrowed = {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {"code": {"enum": codes}, "type": {"const": ERRORS[codes[0]].type}},
                }
            },
        }
        listed = "\n".join(f"- `{code}`: {ERRORS[code].meaning}" for code in codes)
        response: dict[str, Any] = {
            "description": listed,
            "content": {
                "application/json": {"schema": {"allOf": [refs[(envelope, "serialization")], narrowed]}}
            },
        }
        if status in (429, 503):
            response["headers"] = _retry_after()
        responses[str(status)] = response
    return responses


def _answers(route: Route, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    if route.plain_text:
        text = {"schema": {"type": "string", "description": route.plain_text}}
        return {"200": {"description": route.summary, "content": {"text/plain": text}}}
    if route.answer is BaseModel:
        return {
            "200": {
                "description": "The OpenAPI document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        }
    schema = refs[(route.answer, "serialization")]
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if route.streams:
        chunk = refs[(ChatCompletionChunk, "serialization")]["$ref"].rsplit("/", 1)[1]
        answer_name = schema["$ref"].rsplit("/", 1)[1]
        events = route.events.format(chunk=chunk, answer=answer_name)
        content["text/event-stream"] = {"schema": {"type": "string", "description": events}}
    answers: dict[str, Any] = {}
    for status in route.answer_status:
        answer: dict[str, Any] = {"description": route.summary, "content": content}
        if status == 503:
            answer["headers"] = _retry_after()
        answers[str(status)] = answer
    return answers


def _operation(route: Route, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": re.sub(r"[^A-Za-z0-9_]", "_", route.path.strip("/")) + "_" + route.method,
        "summary": route.summary,
        "responses": {**_answers(route, refs), **_error_responses(route, refs)},
    }
    if route.variables:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in route.variables
        ]
    if route.security is not None:
        operation["security"] = list(route.security)
    elif route.facts.public:
        operation["security"] = []
    if route.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": refs[(route.request, "validation")],
                    "example": route.examples,
                }
            },
        }
    return operation


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route (it depends on no setting, so it is built once)."""
    schemas, refs = _component_schemas()
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "glmvision",
            "version": "1",
            "description": "GLM-4.6V-Flash vision-language model over HTTP. Errors carry a stable `code`; "
            "`errors` lists every problem found, the first one repeated at the top level.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <key>",
                },
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        # Keys are needed only when the server has some (GLMVISION_API_KEYS); either header will do.
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
    }


@route_table.route(bp, "openapi.openapi_json")
def openapi_json() -> Response:
    """The OpenAPI document; public, like the health probes."""
    return jsonify(openapi_document())
