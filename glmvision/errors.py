"""API errors as data: one exception type, one JSON shape, one place that renders them."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, has_request_context, jsonify, request
from flask.wrappers import Response
from werkzeug.exceptions import HTTPException

from .ops.record import current_record
from .responses import ErrorDetail, ErrorObject, ErrorResponse, NativeErrorResponse

log = logging.getLogger("glmvision")

# Endpoints that follow OpenAI's API, errors included.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")

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

# Stable codes for errors that werkzeug or flask-limiter raise rather than us.
_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
}


class APIError(HTTPException):
    """A client-visible error with a stable machine-readable code and the offending field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        details: list[ErrorDetail] | None = None,
    ) -> None:
        super().__init__(description=message)
        self.code = status
        self.error_code = code
        self.param = param
        # Every problem found, this one first; a single one unless validation found several.
        self.details = details or [ErrorDetail(code=code, param=param, message=message)]
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)


def bad_request(code: str, message: str, param: str | None = None) -> APIError:
    """Return a 400 error for a client mistake in `param`."""
    return APIError(400, code, message, param)


def unavailable(code: str, message: str, retry_after: int) -> APIError:
    """Return a 503 error that tells the client when to come back."""
    return APIError(503, code, message, retry_after=retry_after)


def out_of_time() -> APIError:
    """Return the 504 for a request whose deadline passed before its first token."""
    return APIError(504, "request_timeout", "The request ran out of time before any output.")


def row_failed() -> APIError:
    """Return the 503 for one request whose own part of a batch failed (the others go on)."""
    return unavailable("row_failed", "Generating this answer failed on the server; retry.", 1)


def error_type(status: int) -> str:
    """The OpenAI-style error `type` for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


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


def _envelope(error: ErrorObject) -> dict[str, Any]:
    # OpenAI-style endpoints answer {"error": ...}; the native ones also say "success": false.
    if has_request_context() and request.path.startswith(OPENAI_PATHS):
        return ErrorResponse(error=error).to_json()
    return NativeErrorResponse(error=error).to_json()


def render_error(exc: HTTPException) -> Response:
    """The JSON error response for `exc` (for handlers that turn other exceptions into an APIError)."""
    return _render_http_error(exc)


def _render_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers: dict[str, str] = {}
    if isinstance(exc, APIError):
        error, headers = api_error_object(exc), exc.headers
    else:
        message = exc.description or exc.name
        if status == 413:
            message = "The request body is larger than the server accepts."
        elif status == 429:
            message = f"Rate limit exceeded ({exc.description}). Retry later."
        error = error_object(status, _CODES.get(status, f"http_{status}"), message or "", None)
    _note_code(error.code)
    response = jsonify(_envelope(error))
    response.status_code = status
    response.headers.update(headers)
    if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _render_unexpected(exc: Exception) -> Response:
    # Log the trace for operators; the client only learns that something failed on our side.
    log.exception("unhandled error while serving a request")
    _note_code("internal_error")
    response = jsonify(
        _envelope(error_object(500, "internal_error", "The server failed to process the request.", None))
    )
    response.status_code = 500
    return response


def _note_code(code: str) -> None:
    record = current_record()
    if record is not None:
        record.code = code


def init_app(app: Flask) -> None:
    """Render every error, ours or the framework's, as the JSON error shape."""
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
