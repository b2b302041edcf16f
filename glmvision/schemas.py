"""Request models: what a client may send, validated strictly, with errors mapped to API errors."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from flask import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, bad_request

Model = TypeVar("Model", bound=BaseModel)


class SamplingFields(BaseModel):
    """Sampling settings shared by the native endpoints."""

    model_config = ConfigDict(strict=True, extra="ignore")

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    enable_thinking: bool = False


class VisionRequest(SamplingFields):
    """Body of POST /v1/chat/vision: `image` (base64/data URL) or `image_url`, and a prompt."""

    image: str | None = Field(default=None, min_length=1)
    image_url: str | None = Field(default=None, min_length=1)
    prompt: str


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


class ChatCompletionRequest(BaseModel):
    """Body of POST /v1/chat/completions, following OpenAI's Chat Completions contract."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: at least this many tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _error_code(error_type: str) -> str:
    if error_type == "missing":
        return "missing_field"
    if error_type.endswith("_type") or error_type in {"model_type", "dict_type"}:
        return "invalid_type"
    return "invalid_value"


def validation_error(exc: ValidationError) -> APIError:
    """Turn the first pydantic error into a 400 naming the offending field."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    code = _error_code(first["type"])
    if code == "missing_field":
        message = f"Field {param!r} is required."
    else:
        message = f"Field {param!r}: {first['msg']}." if param else f"{first['msg']}."
    return bad_request(code, message, param)


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
