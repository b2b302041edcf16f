"""Rendering errors as JSON: every error, ours or the framework's, in one shape, in one place."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, has_request_context, jsonify, request
from flask.wrappers import Response
from werkzeug.exceptions import HTTPException

from glmvision.core.errors import APIError, api_error_object, error_object, framework_code
from glmvision.core.responses import ErrorObject, ErrorResponse, NativeErrorResponse
from glmvision.ops.record import current_record
from glmvision.web.route_table import OPENAI_PATHS

log = logging.getLogger("glmvision")


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
        error = error_object(status, framework_code(status), message or "", None)
    note_code(error.code)
    response = jsonify(_envelope(error))
    response.status_code = status
    response.headers.update(headers)
    if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _render_unexpected(exc: Exception) -> Response:
    # Log the trace for operators; the client only learns that something failed on our side.
    log.exception("unhandled error while serving a request")
    note_code("internal_error")
    response = jsonify(
        _envelope(error_object(500, "internal_error", "The server failed to process the request.", None))
    )
    response.status_code = 500
    return response


def note_code(code: str) -> None:
    """Name the error code of this request's response for its record (metrics, request log)."""
    record = current_record()
    if record is not None:
        record.code = code


def init_app(app: Flask) -> None:
    """Render every error, ours or the framework's, as the JSON error shape."""
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
