"""Request models: what a client may send, validated strictly, with errors mapped to API errors."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from flask import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import APIError, bad_request
from .responses import ErrorDetail

Model = TypeVar("Model", bound="RequestModel")

MAX_STOP_STRINGS = 8
# Error types our own rules raise: they are the API's codes already, and come after pydantic's own
# errors so that the first error is the one earlier versions reported first.
RULE_CODES = ("invalid_value", "invalid_type", "missing_field")
NonEmptyString = Annotated[str, Field(min_length=1)]
# What `stop` accepts, as documented; the validator that enforces it reports one error for the field.
StopStrings = NonEmptyString | Annotated[list[NonEmptyString], Field(max_length=MAX_STOP_STRINGS)] | None


def rule_error(code: str, message: str) -> PydanticCustomError:
    """A validation error that maps to the API error `code` as is."""
    return PydanticCustomError(code, message)


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
                {"type": rule_error(item["type"], item["msg"]), "loc": item["loc"], "input": item["input"]}
                for item in exc.errors(include_url=False)
            ]
            raise ValidationError.from_exception_data(cls.__name__, field_errors + rule_errors) from None
        if rule_errors:
            raise ValidationError.from_exception_data(cls.__name__, rule_errors)
        return model


class SamplingFields(RequestModel):
    """Sampling settings shared by the native endpoints."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    enable_thinking: bool = False
    adapter: str | None = Field(default=None, min_length=1)  # a GLMVISION_LORA adapter's name


class VisionRequest(SamplingFields):
    """Body of POST /v1/chat/vision: `image` (base64/data URL) or `image_url`, and a prompt."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["image"]}, {"required": ["image_url"]}]}
    )

    image: str | None = Field(default=None, min_length=1)
    image_url: str | None = Field(default=None, min_length=1)
    prompt: str

    @classmethod
    def body_rules(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        """Exactly one of `image` and `image_url` (null counts as absent)."""
        has_image, has_url = data.get("image") is not None, data.get("image_url") is not None
        if has_image and has_url:
            error = rule_error("invalid_value", "Send either 'image' or 'image_url', not both.")
            return [{"type": error, "loc": ("image_url",), "input": data["image_url"]}]
        if not has_image and not has_url:
            error = rule_error("missing_field", "Field 'image' is required.")
            return [{"type": error, "loc": ("image",), "input": None}]
        return []


class SeedChatRequest(SamplingFields):
    """Body of POST /v1/chat: `image_url` (http(s) URL, base64 or data URL) and a prompt."""

    image_url: str = Field(min_length=1)
    prompt: str


class ImageURL(BaseModel):
    """OpenAI's image_url object."""

    model_config = ConfigDict(strict=True, extra="ignore")

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    """A text part of a message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image part of a message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One message of a chat completion request."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    """OpenAI's stream_options."""

    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    """vLLM's chat_template_kwargs: only enable_thinking is read; other keys are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    enable_thinking: bool = False

    @field_validator("enable_thinking", mode="plain", json_schema_input_type=bool)
    @classmethod
    def _must_be_a_bool(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise rule_error("invalid_type", "enable_thinking must be a boolean.")
        return value


class ChatCompletionRequest(RequestModel):
    """Body of POST /v1/chat/completions, following OpenAI's Chat Completions contract."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: at least this many tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, json_schema_extra={"maximum": 1})
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # Last, so that its error comes after n's and enable_thinking's, as it always has.
    stop: str | list[str] | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise rule_error("invalid_value", "Only n=1 is supported.")
        return value

    @field_validator("stop", mode="plain", json_schema_input_type=StopStrings)
    @classmethod
    def _stop_strings(cls, value: Any) -> str | list[str] | None:
        """A string or up to MAX_STOP_STRINGS strings, none empty."""
        stops = [value] if isinstance(value, str) else value
        if value is None:
            return None
        if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
            raise rule_error("invalid_type", "'stop' must be a string or a list of strings.")
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise rule_error("invalid_value", f"'stop' takes 1 to {MAX_STOP_STRINGS} non-empty strings.")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty without any)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def enable_thinking(self) -> bool:
        """chat_template_kwargs.enable_thinking, false when absent."""
        return bool(self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking)


def _error_code(error_type: str) -> str:
    if error_type in RULE_CODES:
        return error_type
    if error_type == "missing":
        return "missing_field"
    if error_type.endswith("_type") or error_type in {"model_type", "dict_type"}:
        return "invalid_type"
    return "invalid_value"


def _detail(error: Any) -> ErrorDetail:
    param = ".".join(str(part) for part in error["loc"]) or None
    code = _error_code(error["type"])
    if error["type"] in RULE_CODES:
        message = error["msg"]
    elif code == "missing_field":
        message = f"Field {param!r} is required."
    else:
        message = f"Field {param!r}: {error['msg']}." if param else f"{error['msg']}."
    return ErrorDetail(code=code, param=param, message=message)


def validation_error(exc: ValidationError) -> APIError:
    """Turn pydantic's errors into a 400: the first at the top level, all of them in `errors`."""
    errors = exc.errors(include_url=False)
    # Our own rules were checked after the field types in earlier versions: their errors go last.
    ordered = sorted(errors, key=lambda error: error["type"] in RULE_CODES)
    details = [_detail(error) for error in ordered]
    first = details[0]
    error = bad_request(first.code, first.message, first.param)
    error.details = details
    return error


def read_json(request: Request) -> Any:
    """Return the parsed JSON body, or raise 415 (not JSON) / 400 (malformed)."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise APIError(
            415, "unsupported_media_type", "Send the request as JSON (Content-Type: application/json)."
        )
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise bad_request("invalid_json", f"The body is not valid JSON{where}.") from None


def parse_body(request: Request, model: type[Model]) -> Model:
    """Read the JSON body and validate it into `model`."""
    body = read_json(request)
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The JSON body must be an object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
