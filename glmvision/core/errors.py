"""API errors as data: one exception type with a stable code, and the error object it becomes."""

from __future__ import annotations

from werkzeug.exceptions import HTTPException

from glmvision.core.responses import ErrorDetail, ErrorObject

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
