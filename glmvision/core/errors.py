"""API errors as data: one registry of every code, one exception type, and the error object it becomes."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import HTTPException

from glmvision.core.responses import ErrorDetail, ErrorObject

log = logging.getLogger("glmvision")


# Error `type` per HTTP status, in the spirit of OpenAI's error types.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
# Statuses whose errors pass: the same request may succeed later.
_RETRYABLE = frozenset({429, 503, 504})


class UnregisteredErrorCode(UserWarning):
    """An error raised with a code (or a status) the registry does not have; the tests make it fatal."""


@dataclass(frozen=True)
class ErrorSpec:
    """One error code: its HTTP status, OpenAI `type`, default message, and what it means to a client."""

    code: str
    status: int
    type: str
    message: str  # sent when the raise site gives none
    meaning: str  # when it happens (Markdown, for the docs)
    action: str  # what the client should do
    retryable: bool  # the same request may succeed later
    framework: bool = False  # raised by Flask, werkzeug or flask-limiter rather than by name in our code
    rejection: str | None = None  # the reason glmvision_rejections_total counts it under


def error_type(status: int) -> str:
    """The OpenAI-style error `type` for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def _spec(
    code: str,
    status: int,
    message: str,
    meaning: str,
    action: str,
    *,
    framework: bool = False,
    rejection: str | None = None,
) -> ErrorSpec:
    return ErrorSpec(
        code, status, error_type(status), message, meaning, action, status in _RETRYABLE, framework, rejection
    )


_FIX = "Fix the request; sending it again unchanged fails the same way."
_FIX_IMAGE = "Send a different image (or fix its encoding); the same one fails the same way."
_FIX_URL = "Send the image as base64, or a URL the server may fetch."
_SCHEMA = "Simplify the JSON schema (the message names what is over) or drop it."
_RETRY = "Retry after `Retry-After` seconds, with backoff."

# Every error code the service sends, in the order the docs list them.
_SPECS = (
    _spec(
        "invalid_json",
        400,
        "The body is not valid JSON.",
        "the body is not valid JSON (`NaN`, `Infinity` and numbers past a float's range, such as `1e999`, "
        "are refused too)",
        "Send a valid JSON document.",
    ),
    _spec(
        "json_too_deep",
        400,
        "The JSON body nests too deep.",
        "arrays and objects in the body nest deeper than `GLMVISION_MAX_JSON_DEPTH`",
        "Flatten the body.",
    ),
    _spec(
        "invalid_body",
        400,
        "The JSON body must be an object.",
        "the JSON body is not an object",
        "Send a JSON object.",
    ),
    _spec(
        "missing_field",
        400,
        "A required field is missing.",
        "a required field is absent",
        "Add the field named in `param`.",
    ),
    _spec(
        "invalid_type",
        400,
        "A field has the wrong type.",
        "a field has the wrong type",
        "Send the field named in `param` with the documented type.",
    ),
    _spec(
        "invalid_value",
        400,
        "A field's value is not accepted.",
        "a field's value is out of range (empty prompt, `max_new_tokens` over the cap, ...)",
        "Send a value in the documented range for the field named in `param`.",
    ),
    _spec(
        "unsupported_parameter",
        400,
        "The field is not supported by this server.",
        "a field this server does not implement, or cannot serve as configured, was set: built-in "
        "tools, `background`, ... on `/v1/responses`; `logprobs` under `GLMVISION_SCHEDULER=static`; "
        "`n` above 1 or `logprobs` with `GLMVISION_BACKEND=openai` (see the OpenAI API page)",
        "Leave out the field named in `param`, or ask the operator for a configuration that serves it.",
    ),
    _spec(
        "prompt_too_long",
        400,
        "The prompt is too long.",
        "the prompt is over `GLMVISION_MAX_PROMPT_CHARS`, or over `GLMVISION_MAX_PROMPT_TOKENS` tokens "
        "after the chat template (images included); the message gives both numbers",
        "Shorten the prompt (or lower `max_tokens`).",
        rejection="too_large",
    ),
    _spec(
        "too_many_messages",
        400,
        "The request has too many messages.",
        "more messages than `GLMVISION_MAX_MESSAGES`",
        "Send fewer messages (drop or summarise old turns).",
    ),
    _spec(
        "invalid_schema",
        400,
        "The JSON schema is not valid.",
        "the JSON schema (`response_format`, `json_schema`) cannot be compiled into a grammar",
        "Send a valid JSON schema.",
    ),
    _spec(
        "schema_too_large",
        400,
        "The JSON schema is too large.",
        "the JSON schema is over `GLMVISION_MAX_SCHEMA_BYTES`",
        _SCHEMA,
    ),
    _spec(
        "schema_too_complex",
        400,
        "The JSON schema is too complex.",
        "the JSON schema (or a tool's parameters) is over one of the schema limits "
        "(`GLMVISION_SCHEMA_MAX_*`, see [Schema limits](#schema-limits)), checked before compiling; "
        "or it took over `GLMVISION_GRAMMAR_TIMEOUT` to compile (its compiler process is killed), "
        "or compiled into a grammar over 64 MiB",
        _SCHEMA,
    ),
    _spec(
        "schema_unsupported",
        400,
        "The JSON schema uses something the grammar cannot enforce.",
        "the JSON schema has a keyword the grammar could not enforce, or no finite document satisfies it "
        "(recursion with no way out, contradictions); the message names the keyword and where",
        "Remove the keyword the message names, or make the schema satisfiable.",
    ),
    _spec(
        "invalid_base64",
        400,
        "The image is not valid base64.",
        "the image is not strict base64",
        _FIX_IMAGE,
        rejection="bad_image",
    ),
    _spec(
        "unsupported_image_format",
        400,
        "The image format is not supported.",
        "not PNG/JPEG/WebP/GIF/BMP, or a non-image data URL",
        "Convert the image to PNG, JPEG, WebP, GIF or BMP.",
        rejection="bad_image",
    ),
    _spec(
        "invalid_image",
        400,
        "The image data is corrupt or truncated.",
        "corrupt or truncated image data",
        _FIX_IMAGE,
        rejection="bad_image",
    ),
    _spec(
        "unsupported_aspect_ratio",
        400,
        "The image is too narrow for its length.",
        "one side more than 200x the other",
        "Crop or pad the image.",
        rejection="bad_image",
    ),
    _spec(
        "image_rejected",
        400,
        "The model's processor refused the image.",
        "the model's processor refused the image",
        _FIX_IMAGE,
        rejection="bad_image",
    ),
    _spec(
        "bad_video",
        400,
        "The video could not be decoded.",
        "the video is corrupt, truncated, has no frames, or is not a container/codec FFmpeg decodes",
        "Send a different video (MP4 or WebM), or fix its encoding.",
        rejection="bad_image",
    ),
    _spec(
        "video_too_large",
        400,
        "The video is over the server's limits.",
        "the video is over `GLMVISION_MAX_VIDEO_SECONDS`, `GLMVISION_MAX_VIDEO_FRAMES`, "
        "`GLMVISION_MAX_VIDEO_MB`, `GLMVISION_MAX_VIDEO_FRAME_PIXELS`, `GLMVISION_MAX_VIDEO_PIXELS` or "
        "`GLMVISION_VIDEO_DECODE_TIMEOUT`, by its metadata or as decoded",
        "Send a shorter or smaller video.",
        rejection="too_large",
    ),
    _spec(
        "too_many_images",
        400,
        "The request has too many images.",
        "more images than `GLMVISION_MAX_IMAGES` in one request",
        "Send fewer images per request.",
        rejection="too_large",
    ),
    _spec(
        "image_url_disabled",
        400,
        "This server does not fetch image URLs; send the image as base64.",
        "an http(s) image URL while `GLMVISION_IMAGE_URL_DOMAINS` is empty",
        "Send the image as base64 or a data URL.",
        rejection="url_blocked",
    ),
    _spec(
        "image_url_invalid",
        400,
        "The image URL is not accepted.",
        "not an http(s) URL, user info, numeric host forms, bad port",
        _FIX_URL,
        rejection="url_blocked",
    ),
    _spec(
        "image_url_domain_not_allowed",
        400,
        "The image URL's host is not in the allowed image domains.",
        "the host (of the URL or a redirect) is not allowed",
        _FIX_URL,
        rejection="url_blocked",
    ),
    _spec(
        "image_url_blocked",
        400,
        "The image URL resolves to an address image URLs may not use.",
        "the host resolves to a refused address (private, metadata, ...)",
        _FIX_URL,
        rejection="url_blocked",
    ),
    _spec(
        "image_url_too_many_redirects",
        400,
        "The image URL redirects too many times.",
        "more than `GLMVISION_IMAGE_URL_MAX_REDIRECTS` redirects",
        "Send the final URL, or the image as base64.",
        rejection="url_blocked",
    ),
    _spec(
        "image_url_upstream_status",
        400,
        "The image URL did not answer with the image.",
        "the image server answered with a non-2xx status",
        "Check the URL; send the image as base64 if its server refuses us.",
    ),
    _spec(
        "image_url_not_image",
        400,
        "The image URL did not return an image.",
        "the image server's content type is not `image/*`",
        "Send a URL that serves the image itself.",
    ),
    _spec(
        "image_url_timeout",
        400,
        "The image URL did not deliver the image in time.",
        "the download took longer than `GLMVISION_IMAGE_URL_TIMEOUT`",
        "Send the image as base64, or retry when its server is faster.",
    ),
    _spec(
        "image_url_unreachable",
        400,
        "The image URL could not be fetched.",
        "DNS failure, connection refused, TLS failure, broken HTTP",
        "Check the URL, or send the image as base64.",
    ),
    _spec(
        "unknown_tool",
        400,
        "tool_choice names a function that is not in 'tools'.",
        "`tool_choice` names a function that is not among `tools` (chat completions)",
        "Name one of the functions in `tools`.",
    ),
    _spec(
        "upstream_rejected",
        400,
        "The upstream engine refused the request.",
        "`GLMVISION_BACKEND=openai` and the upstream engine refused the request (4xx); its message is "
        "passed on",
        "Fix the request as the passed-on message says.",
    ),
    _spec(
        "bad_request",
        400,
        "The request is malformed.",
        "any other malformed request",
        _FIX,
        framework=True,
    ),
    _spec(
        "missing_api_key",
        401,
        "An API key is required (Authorization: Bearer <key>).",
        "keys are configured and none was sent",
        "Send the key as `Authorization: Bearer <key>` or `X-API-Key`.",
        rejection="auth",
    ),
    _spec(
        "invalid_api_key",
        401,
        "The API key is not valid.",
        "the key sent is not one of them",
        "Send a valid key; do not retry with the same one.",
        rejection="auth",
    ),
    _spec(
        "ip_not_allowed",
        403,
        "This address may not use the service.",
        "the client address is outside `GLMVISION_ALLOWED_IPS` (every route but `/healthz` and `/health`)",
        "Call from an allowed address (ask the operator).",
        rejection="allowlist",
    ),
    _spec(
        "model_not_allowed",
        403,
        "This API key may not use that model.",
        "the named key's `models` (in the keys file) does not list the model or adapter asked for",
        "Ask for a model the key may use (ask the operator which).",
    ),
    _spec(
        "admin_required",
        403,
        "Only an admin key may read this.",
        "`GET /v1/usage` with a key whose `admin` is not true in the keys file",
        "Call with an admin key.",
    ),
    _spec(
        "not_found",
        404,
        "No such endpoint.",
        "no such endpoint",
        "Check the path against `GET /openapi.json`.",
        framework=True,
    ),
    _spec(
        "model_not_found",
        404,
        "The model does not exist.",
        "`model` is neither the served id, an alias, nor `<id>:<name>` of a loaded "
        "[LoRA adapter](#lora-adapters) (chat completions, responses, `GET /v1/models/{id}`)",
        "Use an id from `GET /v1/models`.",
    ),
    _spec(
        "response_not_found",
        404,
        "The response does not exist.",
        "no stored response has this id for this API key (never stored, `store: false`, expired, deleted, "
        "or another key's): `GET`/`DELETE /v1/responses/{id}`, `previous_response_id`",
        "Send the whole conversation as `input` instead; stored responses expire "
        "(`GLMVISION_RESPONSES_TTL`).",
    ),
    _spec(
        "adapter_not_found",
        404,
        "The adapter does not exist.",
        "`adapter` names no adapter in `GLMVISION_LORA` (`/v1/chat/vision`, `/v1/chat`)",
        "Name a loaded adapter (see `GET /v1/models`) or leave `adapter` out.",
    ),
    _spec(
        "method_not_allowed",
        405,
        "The endpoint does not take this method.",
        "e.g. GET on `/v1/chat/vision`",
        "Use a method from the `Allow` header.",
        framework=True,
    ),
    _spec(
        "request_too_large",
        413,
        "The request body is larger than the server accepts.",
        "body over `GLMVISION_MAX_BODY_MB`",
        "Send a smaller body (downscale or recompress the image).",
        framework=True,
        rejection="too_large",
    ),
    _spec(
        "image_too_large",
        413,
        "The image has too many pixels.",
        "image over `GLMVISION_MAX_IMAGE_PIXELS` (checked before decoding)",
        "Downscale the image.",
        rejection="too_large",
    ),
    _spec(
        "image_url_too_large",
        413,
        "The image at the URL is too large.",
        "the download is over `GLMVISION_IMAGE_URL_MAX_MB`",
        "Link a smaller image, or send a downscaled one as base64.",
        rejection="too_large",
    ),
    _spec(
        "unsupported_media_type",
        415,
        "Send the request as JSON (Content-Type: application/json).",
        "body not sent as `application/json`",
        "Send the body with `Content-Type: application/json`.",
        framework=True,
    ),
    _spec(
        "rate_limit_exceeded",
        429,
        "Rate limit exceeded. Retry later.",
        "over `GLMVISION_RATE_LIMIT`; `Retry-After` says when to retry",
        _RETRY,
        framework=True,
        rejection="rate_limit",
    ),
    _spec(
        "quota_exceeded",
        429,
        "This API key's quota is used up; retry after the window resets.",
        "the request would take its key over `requests_per_minute`, `tokens_per_day` (its `max_tokens` "
        "counted at admission) or `images_per_day`; `Retry-After` is the window's reset and "
        "`X-Quota-Remaining-*` the budget left",
        "Wait `Retry-After` seconds, or send a smaller request (fewer images, lower `max_tokens`).",
        rejection="quota",
    ),
    _spec(
        "circuit_open",
        429,
        "Recent requests from this client timed out; retry later.",
        "this client's last `GLMVISION_BREAKER_TIMEOUTS` requests timed out in a row; refused for "
        "`GLMVISION_BREAKER_COOLDOWN`; `Retry-After` says how long is left",
        "Wait `Retry-After` seconds; then send lighter requests (fewer tokens, smaller images).",
        rejection="circuit_open",
    ),
    _spec(
        "content_blocked",
        400,
        "The request was blocked by content moderation.",
        "the prompt (or, with `GLMVISION_MODERATION_IMAGES=1`, an image) was flagged by the content "
        "moderation hook; the message names the categories",
        "Change the request; the same content is blocked the same way.",
    ),
    _spec(
        "internal_error",
        500,
        "The server failed to process the request.",
        "a bug on our side (logged with its trace server-side)",
        "Report it with the `X-Request-ID`; retrying may fail the same way.",
    ),
    _spec(
        "ratelimit_unavailable",
        503,
        "Rate limits cannot be checked right now; retry shortly.",
        "`GLMVISION_RATELIMIT_FAIL=closed` and the rate-limit storage (Redis) is down; `Retry-After`",
        _RETRY,
        rejection="rate_limit",
    ),
    _spec(
        "moderation_unavailable",
        503,
        "Content moderation cannot be reached right now; retry shortly.",
        "`GLMVISION_MODERATION_FAIL=closed` and the moderation hook timed out, refused or answered "
        "badly (mid-stream: an error event ends the stream); `Retry-After`",
        _RETRY,
    ),
    _spec(
        "overloaded",
        503,
        "The server is at capacity; retry shortly.",
        "the worker's queue (`GLMVISION_MAX_QUEUE`) is full; `Retry-After` estimates when it drains",
        _RETRY,
        rejection="overload",
    ),
    _spec(
        "preprocessing_busy",
        503,
        "Input processors all busy; retry shortly.",
        "every copy of the input processor stayed busy for 30 s (one copy per concurrent preprocessing, "
        "up to 4); `Retry-After`",
        _RETRY,
        rejection="overload",
    ),
    _spec(
        "grammar_busy",
        503,
        "Every grammar compiler is busy; retry shortly.",
        "every grammar compiler process (`GLMVISION_GRAMMAR_WORKERS`) stayed busy with other schemas for "
        "`GLMVISION_GRAMMAR_TIMEOUT`, or none could start (the worker is shutting down, say); `Retry-After`",
        _RETRY,
    ),
    _spec(
        "client_closed",
        499,
        "The client closed the connection.",
        "logged only: the client hung up while its schema compiled, and the compile was stopped",
        "Nothing: the client is gone (a request log shows it).",
    ),
    _spec(
        "queue_timeout",
        503,
        "Waited too long for the model; retry shortly.",
        "the request waited longer than `GLMVISION_QUEUE_TIMEOUT` for the model; `Retry-After`",
        _RETRY,
        rejection="overload",
    ),
    _spec(
        "request_timeout",
        504,
        "The request ran out of time before any output.",
        "`GLMVISION_REQUEST_TIMEOUT` passed before the first token (later, the answer so far comes back "
        'with `finish_reason: "length"`)',
        "Retry with backoff, or ask for less (fewer tokens, smaller images).",
    ),
    _spec(
        "model_loading",
        503,
        "The model is still loading; retry shortly.",
        "the model is still loading; `Retry-After`",
        _RETRY,
    ),
    _spec(
        "model_unavailable",
        503,
        "The model failed to load; see the server log.",
        "the model failed to load (see the server log); `Retry-After`",
        _RETRY,
    ),
    _spec(
        "engine_failed",
        503,
        "The model failed on this worker; it is being replaced. Retry.",
        "the model thread failed (a batch's forward pass; anything but out-of-memory): every request it held "
        "gets this, the worker takes no more and exits so gunicorn starts a fresh one; `Retry-After`",
        _RETRY,
    ),
    _spec(
        "engine_restarting",
        503,
        "The engine process is restarting; retry shortly.",
        "with `GLMVISION_ENGINE=process`: the engine process died (or stopped answering) while this "
        "request was in it, or before it could be sent; the master starts a new one; `Retry-After`",
        _RETRY,
    ),
    _spec(
        "row_failed",
        503,
        "Generating this answer failed on the server; retry.",
        "this request's own part of a batch failed (its grammar, its sampling, turning its tokens into text; "
        "logged with its trace): only it ends, the other requests and the worker go on; `Retry-After`",
        _RETRY,
    ),
    _spec(
        "gpu_out_of_memory",
        503,
        "The GPU ran out of memory; retry shortly.",
        "the GPU ran out of memory for this request; the cache was emptied, the worker goes on; "
        "`Retry-After`",
        _RETRY + " A smaller request is likelier to fit.",
    ),
    _spec(
        "upstream_unavailable",
        503,
        "The upstream engine is unavailable; retry shortly.",
        "`GLMVISION_BACKEND=openai` and the upstream engine timed out, refused the connection, answered 5xx "
        "or broke off mid-answer; `Retry-After`",
        _RETRY,
    ),
)

ERRORS: dict[str, ErrorSpec] = {spec.code: spec for spec in _SPECS}

# The code of an HTTP error that werkzeug or flask-limiter raise rather than us, by its status.
FRAMEWORK_CODES: dict[int, str] = {spec.status: spec.code for spec in _SPECS if spec.framework}


def framework_code(status: int) -> str:
    """The code of a framework HTTP error: its registered code, or `http_<status>` for any other status."""
    return FRAMEWORK_CODES.get(status, f"http_{status}")


def error_spec(code: str, status: int | None = None) -> ErrorSpec:
    """The registered spec of `code`; an unknown one is warned about and answered with `status` (or 500).

    A typo'd code must not turn a client's 4xx into a 500, so production goes on with a generic spec;
    tests turn the warning into an error (setup.cfg) and tests/test_error_registry.py finds every
    code in the source, so none reaches production.
    """
    spec = ERRORS.get(code)
    if spec is not None:
        if status is not None and status != spec.status:
            _warn(f"error {code!r} raised with status {status}, registered as {spec.status}")
        return spec
    status = 500 if status is None else status
    _warn(f"error code {code!r} is not in the registry (glmvision/core/errors.py)")
    return ErrorSpec(code, status, error_type(status), "The request failed.", "", "", status in _RETRYABLE)


def _warn(message: str) -> None:
    log.error("%s", message)
    warnings.warn(message, UnregisteredErrorCode, stacklevel=3)


class APIError(HTTPException):
    """A client-visible error with a stable machine-readable code and the offending field.

    Its HTTP status is the registry's for the code; `status` is kept for the callers that pass it.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        details: list[ErrorDetail] | None = None,
    ) -> None:
        spec = error_spec(code, status)
        message = spec.message if message is None else message
        super().__init__(description=message)
        self.code = spec.status
        self.error_code = code
        self.param = param
        # Every problem found, this one first; a single one unless validation found several.
        self.details = details or [ErrorDetail(code=code, param=param, message=message)]
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)


def api_error(code: str, message: str | None = None, param: str | None = None, **fields: Any) -> APIError:
    """The APIError of a registered `code`, its status from the registry (`fields`: retry_after, ...)."""
    return APIError(None, code, message, param, **fields)


def bad_request(code: str, message: str, param: str | None = None) -> APIError:
    """Return the error for a client mistake in `param` (a 400 for every code but the 413s and 404s)."""
    return APIError(None, code, message, param)


def unavailable(code: str, message: str, retry_after: int) -> APIError:
    """Return an error that tells the client when to come back (a 503 for every code raised this way)."""
    return APIError(None, code, message, retry_after=retry_after)


def out_of_time() -> APIError:
    """Return the 504 for a request whose deadline passed before its first token."""
    return api_error("request_timeout")


def row_failed() -> APIError:
    """Return the 503 for one request whose own part of a batch failed (the others go on)."""
    return api_error("row_failed", retry_after=1)


def error_object(
    status: int, code: str, message: str, param: str | None, details: list[ErrorDetail] | None = None
) -> ErrorObject:
    """Return the error itself: the first problem's {message, type, code, param}, and `errors`."""
    return ErrorObject(
        message=message,
        type=error_type(status),
        code=code,
        param=param,
        errors=details or [ErrorDetail(code=code, param=param, message=message)],
    )


def api_error_object(exc: APIError) -> ErrorObject:
    """The error object of an APIError."""
    return error_object(exc.code or 500, exc.error_code, exc.description or "", exc.param, exc.details)


DOC_COLUMNS = ("status", "code", "type", "retry", "when", "what to do")
_CELLS: dict[str, Callable[[ErrorSpec], str]] = {
    "status": lambda spec: str(spec.status),
    "code": lambda spec: f"`{spec.code}`",
    "type": lambda spec: f"`{spec.type}`",
    "retry": lambda spec: "yes" if spec.retryable else "no",
    "when": lambda spec: spec.meaning,
    "what to do": lambda spec: spec.action,
}


def markdown_table(columns: tuple[str, ...] = DOC_COLUMNS) -> str:
    """The registry as a Markdown table (docs/errors.md's, or fewer columns)."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_CELLS[column](spec) for column in columns) + " |" for spec in _SPECS]
    return "\n".join(lines) + "\n"


def errors_document() -> str:
    """docs/errors.md: every error code, generated from the registry (scripts/gen_docs.py writes it)."""
    return (
        "# Errors\n\n"
        "<!-- Generated from glmvision/core/errors.py by scripts/gen_docs.py; do not edit. -->\n\n"
        "Every error is JSON `{message, type, param, code, errors}` (the native endpoints add "
        '`"success": false`). `code` is stable; `type` follows OpenAI\'s error types. `retry` says whether '
        "the same request may succeed later: wait `Retry-After` seconds when the answer has it. Flask, "
        "werkzeug and flask-limiter raise `"
        + "`, `".join(FRAMEWORK_CODES.values())
        + "`; any other HTTP error they raise has the code `http_<status>`.\n\n"
        + _docs_links(markdown_table())
    )


# The in-page anchors the registry's meanings link to, and the docs pages that cover them (mkdocs checks).
DOC_LINKS = {
    "#schema-limits": "structured-outputs.md#schema-limits",
    "#lora-adapters": "lora.md",
}


def _docs_links(table: str) -> str:
    for anchor, target in DOC_LINKS.items():
        table = table.replace(f"]({anchor})", f"]({target})")
    return table
