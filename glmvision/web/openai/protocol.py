"""The body of POST /v1/chat/completions, OpenAI's Chat Completions contract: its messages, tools and
response_format, the rules across them, and its sampling parameters."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails

from glmvision.core.config import Settings
from glmvision.core.constraints import (
    check_prompt_length,
    generation_params,
    json_constraint,
    tool_constraint,
)
from glmvision.core.errors import bad_request
from glmvision.core.generation import (
    MAX_TOP_LOGPROBS,
    Constraint,
    GenerationParams,
    ToolChoice,
    allowed_tools,
)
from glmvision.core.images import Detail, PixelBudget
from glmvision.web.protocol import NonEmptyString, RequestModel, rule_error

MAX_STOP_STRINGS = 8
# What `stop` accepts, as documented; the validator that enforces it reports one error for the field.
StopStrings = NonEmptyString | Annotated[list[NonEmptyString], Field(max_length=MAX_STOP_STRINGS)] | None


DETAILS = ("auto", "low", "high")
PixelCount = Annotated[int, Field(ge=1)]


def _is_pixel_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ImageURL(BaseModel):
    """OpenAI's image_url object; min_pixels/max_pixels (width x height) are this server's extension.

    detail, min_pixels and max_pixels are checked on the raw body (ChatCompletionRequest.body_rules):
    inside `content`'s union, pydantic's own errors would name the union's branches, not the field.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    url: str = Field(min_length=1)
    detail: Detail | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    @field_validator("detail", mode="plain", json_schema_input_type=Detail | None)
    @classmethod
    def _detail(cls, value: Any) -> Any:
        return value if value in DETAILS else None

    @field_validator("min_pixels", "max_pixels", mode="plain", json_schema_input_type=PixelCount | None)
    @classmethod
    def _pixels(cls, value: Any) -> Any:
        return value if _is_pixel_count(value) else None

    def budget(self, param: str) -> PixelBudget | None:
        """The size asked for this image (None: the server's default); `param`: this object's path."""
        if self.detail is None and self.min_pixels is None and self.max_pixels is None:
            return None
        return PixelBudget(self.detail, self.min_pixels, self.max_pixels, param)


def image_budget_problems(image_url: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    """(code, field, message) for each of an image_url's detail, min_pixels and max_pixels that is wrong."""
    problems: list[tuple[str, str, str]] = []
    detail = image_url.get("detail")
    if detail is not None and detail not in DETAILS:
        code = "invalid_value" if isinstance(detail, str) else "invalid_type"
        problems.append((code, "detail", f"Field '{where}.detail' must be 'auto', 'low' or 'high'."))
    for name in ("min_pixels", "max_pixels"):
        value = image_url.get(name)
        if value is None or _is_pixel_count(value):
            continue
        code = "invalid_value" if isinstance(value, int) and not isinstance(value, bool) else "invalid_type"
        problems.append((code, name, f"Field '{where}.{name}' must be a whole number of pixels, at least 1."))
    least, most = image_url.get("min_pixels"), image_url.get("max_pixels")
    if not problems and least is not None and most is not None and least > most:
        message = f"Field '{where}.max_pixels' ({most:,}) is less than 'min_pixels' ({least:,})."
        problems.append(("invalid_value", "max_pixels", message))
    return problems


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


class VideoURL(BaseModel):
    """vLLM's video_url object: a `data:video/...;base64,` URL or an http(s) URL."""

    model_config = ConfigDict(strict=True, extra="ignore")

    url: str = Field(min_length=1)


class VideoPart(BaseModel):
    """A video part of a message (vLLM's extension of OpenAI's content parts)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["video_url"]
    video_url: VideoURL


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
    content: str | list[Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]] | None = (
        None
    )
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
    n: int = Field(default=1, ge=1)  # at most GLMVISION_MAX_N (checked with the server's limits)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    ignore_eos: bool = False  # vLLM's extension: stop tokens do not end the answer (stop strings do)
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    # Last, so that its error comes after n's and enable_thinking's, as it always has.
    stop: str | list[str] | None = None

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

    @property
    def tool_specs(self) -> tuple[dict[str, Any], ...]:
        """The tools as the chat template renders them (and an upstream engine takes them)."""
        return tuple(tool.to_json() for tool in self.tools or ())

    @property
    def resolved_tool_choice(self) -> ToolChoice | None:
        """tool_choice, "auto" when absent, and None without tools."""
        return (self.tool_choice or ToolChoice("auto")) if self.tools else None

    @model_validator(mode="after")
    def _rules(self) -> ChatCompletionRequest:
        """The rules across fields that need only the body: tools, then the messages, in order."""
        self._check_tools()
        for index, message in enumerate(self.messages):
            self._check_message(index, message)
        if self.top_logprobs is not None and not self.logprobs:
            raise rule_error("invalid_value", "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        last = self.messages[-1]
        if last.role not in ("user", "tool"):
            raise rule_error(
                "invalid_value", "The last message must come from the user or a tool.", "messages"
            )
        return self

    @classmethod
    def body_rules(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        """On the raw body, reported beside the other fields' errors: the images' detail and pixel
        bounds, and an empty last user message."""
        return _image_budget_errors(data.get("messages")) + _empty_last_message(data)

    def _check_tools(self) -> None:
        """Tool names are unique, and a forced call (required, or a named function) has a tool to call."""
        tools = self.tool_specs
        names = [tool["function"]["name"] for tool in tools]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise rule_error(
                    "invalid_value", f"Two tools are named {name!r}.", f"tools.{index}.function.name"
                )
        choice = self.tool_choice
        if choice is None or not choice.forces_call or allowed_tools(tools, choice):
            return
        if not tools:
            raise rule_error("invalid_value", f"tool_choice {choice.mode!r} needs 'tools'.", "tool_choice")
        message = f"tool_choice names {choice.name!r}, which is not in 'tools'."
        raise rule_error("unknown_tool", message, "tool_choice")

    @staticmethod
    def _check_message(index: int, message: ChatMessage) -> None:
        """A tool message answers a call; only user messages carry images, only assistant ones calls."""
        if message.role == "tool" and message.tool_call_id is None:
            where = f"messages.{index}.tool_call_id"
            raise rule_error("missing_field", f"Field {where!r} is required in a tool message.", where)
        if message.role != "user" and any(
            part.type in ("image_url", "video_url") for part in _parts(message.content)
        ):
            where = f"messages.{index}.content"
            raise rule_error("invalid_value", "Only user messages may carry images or videos.", where)
        if message.tool_calls and message.role != "assistant":
            where = f"messages.{index}.tool_calls"
            raise rule_error("invalid_value", "Only assistant messages may carry tool_calls.", where)

    def to_generation_params(self, settings: Settings, adapter: str | None = None) -> GenerationParams:
        """How to sample, under the server's limits: the token cap, the schemas', the prompt's size;
        `adapter`: the LoRA adapter `model` names (the view resolves it against the loaded ones)."""
        limit_param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        params = generation_params(
            settings,
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            enable_thinking=self.enable_thinking,
            stop=self.stop_strings,
            min_new_tokens=self.min_tokens,
            param=limit_param,
            constraint=self._format_constraint(settings),
            adapter=adapter,
        )
        if self.n > settings.max_n:
            raise bad_request("invalid_value", f"Field 'n' may be at most {settings.max_n}.", "n")
        if self.logprobs:
            params = replace(params, logprobs=self.top_logprobs or 0)
        if self.ignore_eos:  # as vLLM: only the stop tokens are ignored (a constraint still ends it)
            params = replace(params, min_new_tokens=params.max_new_tokens)
        tools, choice = self.tool_specs, self.resolved_tool_choice
        if tools:
            params = replace(params, tools=tools, tool_choice=choice)
        if choice is not None and choice.forces_call:  # a call, whatever response_format says of text
            params = replace(params, constraint=tool_constraint(params.allowed_tools, settings))
        self._check_size(settings)
        return params

    def _format_constraint(self, settings: Settings) -> Constraint | None:
        """response_format as a decoding constraint (none for text)."""
        form = self.response_format
        if form is None or form.type == "text":
            return None
        if form.type == "json_object" or form.json_schema is None:
            return json_constraint(None, settings, "response_format")
        return json_constraint(form.json_schema.schema_, settings, "response_format.json_schema.schema")

    def _check_size(self, settings: Settings) -> None:
        """At most GLMVISION_MAX_MESSAGES messages, and GLMVISION_MAX_PROMPT_CHARS of text, tools included."""
        count, limit = len(self.messages), settings.max_messages
        if count > limit:
            refusal = f"The request has {count} messages; at most {limit} are accepted."
            raise bad_request("too_many_messages", refusal, "messages")
        characters = sum(len(json.dumps(tool)) for tool in self.tool_specs)
        for message in self.messages:
            characters += sum(len(part.text) for part in _parts(message.content) if part.type == "text")
            characters += sum(len(call.function.arguments) for call in message.tool_calls or ())
        check_prompt_length(characters, settings, "messages")


def _empty_last_message(data: dict[str, Any]) -> list[InitErrorDetails]:
    """A last user message with no image and no text but blanks."""
    messages = data.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return []
    content = last.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if content is not None and not isinstance(parts, list):
        return []  # not a string or a list: its field error says so
    if any(
        not isinstance(part, dict)
        or part.get("type") != "text"
        or not isinstance(part.get("text"), str)
        or part["text"].strip()
        for part in parts or []
    ):
        return []  # an image, some text, or a malformed part (its own error)
    where = f"messages.{len(messages) - 1}.content"
    error = rule_error("invalid_value", "The last user message is empty.", where)
    return [{"type": error, "loc": ("messages", len(messages) - 1, "content"), "input": content}]


def _image_budget_errors(messages: Any) -> list[InitErrorDetails]:
    """Each image part's wrong detail, min_pixels or max_pixels, named by its path."""
    errors: list[InitErrorDetails] = []
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for number, part in enumerate(content if isinstance(content, list) else []):
            image_url = part.get("image_url") if isinstance(part, dict) else None
            if (
                not isinstance(part, dict)
                or part.get("type") != "image_url"
                or not isinstance(image_url, dict)
            ):
                continue
            where = f"messages.{index}.content.{number}.image_url"
            for code, name, text in image_budget_problems(image_url, where):
                loc = ("messages", index, "content", number, "image_url", name)
                errors.append(
                    {
                        "type": rule_error(code, text, f"{where}.{name}"),
                        "loc": loc,
                        "input": image_url.get(name),
                    }
                )
    return errors


def _parts(
    content: str | list[TextPart | ImagePart | VideoPart] | None,
) -> list[TextPart | ImagePart | VideoPart]:
    """A message's content as parts (a string is one text part)."""
    if content is None:
        return []
    return [TextPart(type="text", text=content)] if isinstance(content, str) else content
