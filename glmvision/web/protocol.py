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

from glmvision.core.errors import APIError, bad_request
from glmvision.core.generation import ToolChoice
from glmvision.core.jsontext import MAX_JSON_DEPTH, json_depth, strict_loads
from glmvision.core.responses import ErrorDetail

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
    json_schema: dict[str, Any] | None = None  # the answer is JSON valid against it
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


class CalledFunction(BaseModel):
    """The function of an earlier tool call: its name and arguments (a JSON object's text)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    name: NonEmptyString
    arguments: str


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: NonEmptyString
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """One message of a chat completion request."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages only
    tool_call_id: NonEmptyString | None = None  # tool messages: the call this result answers


class FunctionDefinition(BaseModel):
    """A function the model may call: OpenAI's name rule, and its arguments' JSON schema."""

    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """One entry of `tools`."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition

    def to_json(self) -> dict[str, Any]:
        """The tool as the chat template renders it (and an upstream engine takes it)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


TOOL_CHOICE_MODES = ("none", "auto", "required")
# What `tool_choice` accepts, for the documented schema; the validator reports one error for the field.
ToolChoiceInput = (
    Literal["none", "auto", "required"]
    | Annotated[dict[str, Any], Field(json_schema_extra={"required": ["type", "function"]})]
    | None
)


class StreamOptions(BaseModel):
    """OpenAI's stream_options."""

    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class JSONSchemaSpec(BaseModel):
    """OpenAI's response_format.json_schema: a named schema the answer must match."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise rule_error(
                "missing_field", "response_format.json_schema is required with type json_schema."
            )
        return self


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
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
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

    @field_validator("tool_choice", mode="plain", json_schema_input_type=ToolChoiceInput)
    @classmethod
    def _tool_choice(cls, value: Any) -> ToolChoice | None:
        """ "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""
        if value is None:
            return None
        if isinstance(value, str):
            if value not in TOOL_CHOICE_MODES:
                raise rule_error(
                    "invalid_value", "'tool_choice' must be 'none', 'auto', 'required' or a function."
                )
            return ToolChoice(value)  # type: ignore[arg-type]
        function = value.get("function") if isinstance(value, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
            raise rule_error(
                "invalid_type",
                '\'tool_choice\' must be a string or {"type": "function", "function": {"name": ...}}.',
            )
        return ToolChoice("function", name)

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
