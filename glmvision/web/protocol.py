"""Request models' shared base: strict validation, with every problem mapped to an API error.

The endpoints' own models live beside their views (glmvision.web.native.protocol,
glmvision.web.openai.protocol); rules across fields that need only the body are validators there.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from flask import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from glmvision.core.errors import APIError, bad_request
from glmvision.core.jsontext import MAX_JSON_DEPTH, json_depth, strict_loads
from glmvision.core.responses import ErrorDetail

Model = TypeVar("Model", bound="RequestModel")

# The context key that marks our own rules' errors: their type is the API's code already, they come
# after pydantic's own errors (so that the first error is the one earlier versions reported first),
# and its value names the field when the error's location does not ("": the location does).
RULE = "rule_param"
NonEmptyString = Annotated[str, Field(min_length=1)]


def rule_error(code: str, message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error that maps to the API error `code` as is; `param`: the field it names, for a
    rule checked on the whole model (whose location names no field)."""
    return PydanticCustomError(code, message, {RULE: param or ""})


def is_rule(error: Any) -> bool:
    """Whether one of pydantic's error dicts came from `rule_error`."""
    return RULE in (error.get("ctx") or {})


class RequestModel(BaseModel):
    """Base of request bodies: strict types, unknown fields ignored, every problem reported at once."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @classmethod
    def body_rules(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        """Rules across fields, checked on the raw body; errors are reported with the fields' own."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _report_every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """Run the field validation and the body rules, and fail with all their errors together."""
        rule_errors = cls.body_rules(data) if isinstance(data, dict) else []
        try:
            model = handler(data)
        except ValidationError as exc:
            if not rule_errors:
                raise
            field_errors: list[InitErrorDetails] = [
                {"type": _as_raised(item), "loc": item["loc"], "input": item["input"]}
                for item in exc.errors(include_url=False)
            ]
            raise ValidationError.from_exception_data(cls.__name__, field_errors + rule_errors) from None
        if rule_errors:
            raise ValidationError.from_exception_data(cls.__name__, rule_errors)
        return model


def _as_raised(error: Any) -> PydanticCustomError:
    """One of pydantic's error dicts as an error to raise again, its type, message and rule kept."""
    return PydanticCustomError(error["type"], error["msg"], error["ctx"] if is_rule(error) else None)


class SamplingFields(RequestModel):
    """Sampling settings shared by the native endpoints."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    enable_thinking: bool = False
    json_schema: dict[str, Any] | None = None  # the answer is JSON valid against it
    adapter: str | None = Field(default=None, min_length=1)  # a GLMVISION_LORA adapter's name


def pixels_in_order(max_pixels: int | None, info: ValidationInfo) -> int | None:
    """A field validator for `max_pixels`: not below the `min_pixels` declared before it."""
    min_pixels = info.data.get("min_pixels")
    if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
        raise rule_error(
            "invalid_value", f"'max_pixels' ({max_pixels:,}) is less than 'min_pixels' ({min_pixels:,})."
        )
    return max_pixels


def _error_code(error_type: str) -> str:
    if error_type == "missing":
        return "missing_field"
    if error_type.endswith("_type") or error_type in {"model_type", "dict_type"}:
        return "invalid_type"
    return "invalid_value"


def _detail(error: Any) -> ErrorDetail:
    param = ".".join(str(part) for part in error["loc"]) or None
    if is_rule(error):
        return ErrorDetail(code=error["type"], param=error["ctx"][RULE] or param, message=error["msg"])
    code = _error_code(error["type"])
    if code == "missing_field":
        message = f"Field {param!r} is required."
    else:
        message = f"Field {param!r}: {error['msg']}." if param else f"{error['msg']}."
    return ErrorDetail(code=code, param=param, message=message)


def validation_error(exc: ValidationError) -> APIError:
    """Turn pydantic's errors into a 400: the first at the top level, all of them in `errors`."""
    errors = exc.errors(include_url=False)
    # Our own rules were checked after the field types in earlier versions: their errors go last.
    ordered = sorted(errors, key=is_rule)
    details = [_detail(error) for error in ordered]
    first = details[0]
    error = bad_request(first.code, first.message, first.param)
    error.details = details
    return error


def read_json(request: Request, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Return the parsed JSON body, or raise 415 (not JSON) / 400 (malformed, non-finite, too deep)."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise APIError(
            415, "unsupported_media_type", "Send the request as JSON (Content-Type: application/json)."
        )
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = strict_loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise bad_request("invalid_json", f"The body is not valid JSON{where}.") from None
    except ValueError:  # NaN / Infinity, which JSON does not have
        message = "The body holds NaN, Infinity or a number too large for a float (1e999)."
        raise bad_request("invalid_json", message) from None
    except RecursionError:
        raise _too_deep(max_depth) from None
    if json_depth(body, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return body


def _too_deep(limit: int) -> APIError:
    message = f"Arrays and objects nest more than {limit} deep (GLMVISION_MAX_JSON_DEPTH)."
    return bad_request("json_too_deep", message)


def parse_body(request: Request, model: type[Model], max_depth: int = MAX_JSON_DEPTH) -> Model:
    """Read the JSON body and validate it into `model`."""
    body = read_json(request, max_depth)
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The JSON body must be an object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
