"""POST /v1/responses, OpenAI's Responses API: its request, its answer, and the translation of its input
items into the Chat Completions request the chat route already validates and answers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glmvision.core.errors import APIError, bad_request
from glmvision.core.responses import ResponseModel
from glmvision.web.protocol import RequestModel, rule_error

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# Fields of OpenAI's request this server does not implement: a 400 naming them, never silence.
REFUSED_FIELDS = {
    "background": "there is no background mode: wait for the answer, or stream it",
    "conversation": "conversations are not kept: use previous_response_id or send the whole input",
    "prompt": "there are no stored prompt templates: send instructions and input",
    "max_tool_calls": "the number of tool calls is not capped",
    "top_logprobs": "log-probabilities are not returned by /v1/responses",
}
# `include` values that ask for nothing this server leaves out (reasoning is returned as plain text).
HARMLESS_INCLUDES = ("reasoning.encrypted_content",)


def refused(param: str, why: str) -> APIError:
    """The 400 for a field (or a value of one) this server does not implement."""
    return bad_request("unsupported_parameter", f"'{param}' is not supported: {why}.", param)


class ReasoningConfig(BaseModel):
    """OpenAI's `reasoning`: any effort but "none" turns the model's thinking on; summary is ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(BaseModel):
    """OpenAI's text.format: free text, any JSON object, or JSON valid against a named schema."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    """OpenAI's `text`: its format (verbosity is accepted and ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# What `input` accepts, for the documented schema; the validator reports one error for the field.
InputField = str | Annotated[list[dict[str, Any]], Field(min_length=1)]


class ResponseRequest(RequestModel):
    """Body of POST /v1/responses (OpenAI's Responses API); items are checked as they are translated."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    background: bool | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None

    @field_validator("input", mode="plain", json_schema_input_type=InputField)
    @classmethod
    def _input(cls, value: Any) -> str | list[Any]:
        """A string, or a non-empty list of items (each checked as it is translated)."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise rule_error("invalid_type", "'input' must be a string or a list of input items.")
        if not value:
            raise rule_error("invalid_value", "'input' must hold at least one item.")
        return value

    @property
    def thinking(self) -> bool:
        """Whether `reasoning.effort` asks for the model's thinking."""
        return bool(self.reasoning and self.reasoning.effort not in (None, "none"))

    def check_supported(self) -> None:
        """A 400 for the first field set that this server does not implement."""
        for name, why in REFUSED_FIELDS.items():
            value = getattr(self, name)
            if value not in (None, False, 0):
                raise refused(name, why)
        if self.truncation == "auto":
            raise refused("truncation", "the input is never truncated; send 'disabled' or leave it out")
        for index, value in enumerate(self.include or ()):
            if value not in HARMLESS_INCLUDES:
                raise refused(
                    f"include.{index}", f"nothing can be included but {', '.join(HARMLESS_INCLUDES)}"
                )


@dataclass
class ChatBody:
    """A Responses request as a Chat Completions body, and where each chat field came from."""

    body: dict[str, Any]
    renames: dict[str, str] = field(default_factory=dict)  # chat param -> Responses param

    def rename(self, param: str | None) -> str | None:
        """The Responses field a chat param stands for (the longest known prefix, the rest kept)."""
        if param is None:
            return None
        parts = param.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.renames:
                return ".".join([self.renames[prefix], *parts[end:]])
        return param

    def renamed(self, exc: APIError) -> APIError:
        """`exc` with its params named as the Responses request names them."""
        exc.param = self.rename(exc.param)
        if exc.details:
            exc.details = [
                detail.model_copy(update={"param": self.rename(detail.param)}) for detail in exc.details
            ]
        return exc


TOP_LEVEL_RENAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema": "text.format",
    "chat_template_kwargs": "reasoning",
    "chat_template_kwargs.enable_thinking": "reasoning.effort",
}


def _text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """The text of a string, or of a list of text parts of the given `kinds` (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("invalid_type", f"Field {where!r} must be a string or a list of parts.", where)
    texts: list[str] = []
    for number, part in enumerate(content):
        at = f"{where}.{number}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise refused(f"{at}.type", f"only {', '.join(kinds)} parts are accepted here, not {kind!r}")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise bad_request("invalid_type", f"Field '{at}.text' must be a string.", f"{at}.text")
        texts.append(text)
    return "".join(texts)


class InputTranslator:
    """Responses input items -> chat messages, remembering each message's and part's Responses path."""

    def __init__(self, renames: dict[str, str]) -> None:
        self.messages: list[dict[str, Any]] = []
        self.renames = renames

    def _add(self, message: dict[str, Any], where: str) -> dict[str, Any]:
        self.renames[f"messages.{len(self.messages)}"] = where
        self.messages.append(message)
        return message

    def carried(self, messages: list[dict[str, Any]], where: str) -> None:
        """Messages from an earlier response, named by the field that brought them."""
        for message in copy.deepcopy(messages):  # a call merged into one must not change the stored turn
            self._add(message, where)

    def instructions(self, text: str) -> None:
        self._add({"role": "system", "content": text}, "instructions")

    def text(self, text: str, where: str) -> None:
        self._add({"role": "user", "content": text}, where)

    def item(self, item: Any, where: str) -> None:
        """One input item: a message, a function call or its output; reasoning items are skipped."""
        if not isinstance(item, dict):
            raise bad_request("invalid_type", f"Field {where!r} must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            self._message(item, where)
        elif kind == "function_call":
            self._function_call(item, where)
        elif kind == "function_call_output":
            self._function_output(item, where)
        elif kind != "reasoning":  # the model's earlier thinking: its chat template drops it anyway
            raise refused(f"{where}.type", f"input items of type {kind!r} are not supported")

    def _message(self, item: dict[str, Any], where: str) -> None:
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            message = f"Field '{where}.role' must be 'user', 'system', 'developer' or 'assistant'."
            raise bad_request("invalid_value", message, f"{where}.role")
        content = item.get("content")
        if role == "assistant":
            text = _text_of(content, f"{where}.content", ("output_text", "input_text", "refusal"))
            self._add({"role": "assistant", "content": text}, where)
            return
        if isinstance(content, str):
            self._add({"role": role, "content": content}, where)
            return
        if not isinstance(content, list):
            message = f"Field '{where}.content' must be a string or a list of parts."
            raise bad_request("invalid_type", message, f"{where}.content")
        index = len(self.messages)
        parts = [self._part(part, f"{where}.content.{number}") for number, part in enumerate(content)]
        for number in range(len(parts)):
            at, chat = f"{where}.content.{number}", f"messages.{index}.content.{number}"
            self.renames[chat] = at
            self.renames[f"{chat}.image_url"] = f"{at}.image_url"
            self.renames[f"{chat}.image_url.url"] = f"{at}.image_url"
            self.renames[f"{chat}.image_url.detail"] = f"{at}.detail"
            self.renames[f"{chat}.video_url"] = f"{at}.video_url"
            self.renames[f"{chat}.video_url.url"] = f"{at}.video_url"
        self._add({"role": role, "content": parts}, where)

    @staticmethod
    def _part(part: Any, where: str) -> dict[str, Any]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request("invalid_type", f"Field '{where}.text' must be a string.", f"{where}.text")
            return {"type": "text", "text": text}
        if kind == "input_image":
            url = part.get("image_url")
            if part.get("file_id") is not None:
                raise refused(
                    f"{where}.file_id", "there is no file store: send image_url (a data or http URL)"
                )
            if not isinstance(url, str) or not url:
                message = f"Field '{where}.image_url' must be a data URL or an http(s) URL."
                code = "missing_field" if url is None else "invalid_type"
                raise bad_request(code, message, f"{where}.image_url")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            return {"type": "image_url", "image_url": image}
        if kind == "input_video":  # as chat's video_url part (vLLM's extension), flat like input_image
            url = part.get("video_url")
            if not isinstance(url, str) or not url:
                message = f"Field '{where}.video_url' must be a data:video URL or an http(s) URL."
                code = "missing_field" if url is None else "invalid_type"
                raise bad_request(code, message, f"{where}.video_url")
            return {"type": "video_url", "video_url": {"url": url}}
        raise refused(f"{where}.type", f"content parts of type {kind!r} are not supported")

    def _function_call(self, item: dict[str, Any], where: str) -> None:
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        for key, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
            if not isinstance(value, str):
                code = "missing_field" if value is None else "invalid_type"
                raise bad_request(code, f"Field '{where}.{key}' must be a string.", f"{where}.{key}")
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant":
            last = self._add({"role": "assistant", "content": None}, where)
        calls = last.setdefault("tool_calls", [])
        prefix = f"messages.{len(self.messages) - 1}.tool_calls.{len(calls)}"
        self.renames[prefix] = where
        self.renames[f"{prefix}.function.arguments"] = f"{where}.arguments"
        self.renames[f"{prefix}.function.name"] = f"{where}.name"
        calls.append(call)

    def _function_output(self, item: dict[str, Any], where: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            code = "missing_field" if call_id is None else "invalid_type"
            raise bad_request(code, f"Field '{where}.call_id' must be a string.", f"{where}.call_id")
        output = _text_of(item.get("output"), f"{where}.output", ("input_text", "output_text"))
        self._add({"role": "tool", "tool_call_id": call_id, "content": output}, where)


def _tools(tools: list[dict[str, Any]], renames: dict[str, str]) -> list[dict[str, Any]]:
    """Responses' flat function tools as Chat Completions tools; built-in tools are refused."""
    converted: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        kind = tool.get("type")
        if kind != "function":
            raise refused(f"{where}.type", f"only function tools are supported, not {kind!r}")
        function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
        renames[where] = where
        renames[f"{where}.function"] = where
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """Responses' tool_choice as Chat Completions' (a named function nests its name)."""
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise refused("tool_choice", f"only 'none', 'auto', 'required' or a function, not {choice.get('type')!r}")


def _format(form: TextFormat) -> dict[str, Any]:
    """text.format as Chat Completions' response_format."""
    if form.type != "json_schema":
        return {"type": form.type}
    spec: dict[str, Any] = {"name": form.name, "schema": form.schema_ or {}}
    if form.description is not None:
        spec["description"] = form.description
    if form.strict is not None:
        spec["strict"] = form.strict
    return {"type": "json_schema", "json_schema": spec}


def chat_body(
    request: ResponseRequest, earlier: list[dict[str, Any]]
) -> tuple[ChatBody, list[dict[str, Any]]]:
    """The Chat Completions body for `request` after the `earlier` turns (previous_response_id's), and the
    conversation a later response continues (without the instructions, as OpenAI carries them)."""
    renames = dict(TOP_LEVEL_RENAMES)
    translator = InputTranslator(renames)
    if request.instructions is not None:
        translator.instructions(request.instructions)
    start = len(translator.messages)
    translator.carried(earlier, "previous_response_id")
    if isinstance(request.input, str):
        translator.text(request.input, "input")
    else:
        for index, item in enumerate(request.input):
            translator.item(item, f"input.{index}")
    body: dict[str, Any] = {"messages": translator.messages, "stream": request.stream}
    if request.model is not None:
        body["model"] = request.model
    for name, chat in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if getattr(request, name) is not None:
            body[chat] = getattr(request, name)
    if request.tools:
        body["tools"] = _tools(request.tools, renames)
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    if request.text is not None and request.text.format is not None:
        body["response_format"] = _format(request.text.format)
        renames["response_format.json_schema.schema"] = "text.format.schema"
        renames["response_format.json_schema.name"] = "text.format.name"
    if request.thinking:
        body["chat_template_kwargs"] = {"enable_thinking": True}
    return ChatBody(body, renames), translator.messages[start:]


# --- The answer ----------------------------------------------------------------------------------


class OutputText(ResponseModel):
    """A message's text."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    """The assistant's message."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ReasoningText(ResponseModel):
    """The model's thinking, as it wrote it."""

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(ResponseModel):
    """The model's thinking (reasoning.effort set): in `content` whole; no summary is written."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class FunctionCallItem(ResponseModel):
    """A call of one of the request's function tools."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | ReasoningItem | FunctionCallItem, Field(discriminator="type")]


class InputTokensDetails(ResponseModel):
    """What the input's tokens were."""

    cached_tokens: int = Field(
        0, ge=0, description="Input tokens whose keys and values came from the prefix cache."
    )
    image_tokens: int | None = Field(
        None, ge=0, description="Input tokens that stand for images.", exclude_if=lambda value: value is None
    )


class ResponseUsage(ResponseModel):
    """Token accounting in the Responses API's shape."""

    input_tokens: int = Field(ge=0)
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class IncompleteDetails(ResponseModel):
    """Why a response stopped short."""

    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(ResponseModel):
    """A response of POST /v1/responses (and GET /v1/responses/{id})."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=dict)
    store: bool
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=dict)
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    degraded: bool | None = Field(default=None, exclude_if=lambda value: value is None)


class DeletedResponse(ResponseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True
