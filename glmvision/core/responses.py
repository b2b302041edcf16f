"""Response models: every JSON body the service sends is built from one of these (the documented shape)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# "fallback": GLMVISION_FALLBACK_MESSAGE answered because the model was unavailable.
FinishReason = Literal["stop", "length", "fallback", "tool_calls", "content_filter"]


def _omitted_when_none(value: Any) -> bool:
    return value is None


class ResponseModel(BaseModel):
    """Base of response bodies: fields in the order they are sent; `to_json` is what goes on the wire."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self, **kwargs: Any) -> dict[str, Any]:
        """The body as JSON-ready data."""
        return self.model_dump(mode="json", **kwargs)


# --- Errors --------------------------------------------------------------------------------------


class ErrorDetail(ResponseModel):
    """One problem with the request: its stable code, the field at fault and a message."""

    code: str
    param: str | None
    message: str


class ErrorObject(ResponseModel):
    """The error: the first problem at the top level (as clients read it), every problem in `errors`."""

    message: str
    type: str
    code: str
    param: str | None
    errors: list[ErrorDetail] = Field(min_length=1)


class ErrorResponse(ResponseModel):
    """OpenAI's error envelope, used by /v1/chat/completions and /v1/models."""

    error: ErrorObject


class NativeErrorResponse(ResponseModel):
    """The native endpoints' error envelope: OpenAI's plus "success": false."""

    success: Literal[False] = False
    error: ErrorObject


# --- Probes and the model list -------------------------------------------------------------------


class Health(ResponseModel):
    """GET /healthz: the process answers."""

    status: Literal["ok"] = "ok"


class ModelInfo(ResponseModel):
    """The loaded model: its id, whether it is the demo model, where it runs and in which dtype."""

    id: str
    demo: bool
    device: str | None
    dtype: str | None


class EngineStatus(ResponseModel):
    """One engine process, as /readyz reports it (GLMVISION_ENGINE=process)."""

    device: str | None
    pid: int | None
    model: str | None
    queue: int
    running: int = 0
    state: str
    full: bool = False
    stalled_s: float = 0.0
    gpu_allocated: int | None = Field(default=None, exclude_if=_omitted_when_none)
    counters: dict[str, int | float | str] = {}


class Readiness(ResponseModel):
    """GET /readyz: model and engine counters once ready; otherwise why not."""

    ready: bool
    status: Literal["ready", "loading", "failed", "not_loaded", "unhealthy"]
    model: ModelInfo | None = Field(default=None, exclude_if=_omitted_when_none)
    engine: dict[str, int | float | str] | None = Field(default=None, exclude_if=_omitted_when_none)
    engines: list[EngineStatus] | None = Field(default=None, exclude_if=_omitted_when_none)


class ModelCard(ModelInfo):
    """One entry of GET /v1/models, in OpenAI's shape plus device details."""

    ready: bool
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # A LoRA adapter's entry names the model it adapts, as vLLM lists its LoRA modules.
    parent: str | None = Field(default=None, exclude_if=_omitted_when_none)


class ModelList(ResponseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- Native answers ------------------------------------------------------------------------------


class PromptTokensDetails(ResponseModel):
    """What the prompt's tokens were: reused from the prefix cache, and standing for images."""

    cached_tokens: int = Field(
        0, ge=0, description="Prompt tokens whose keys and values came from the prefix cache."
    )
    image_tokens: int | None = Field(
        None,
        ge=0,
        description="Prompt tokens that stand for images (absent when an upstream engine does not say).",
        exclude_if=lambda value: value is None,
    )


class Usage(ResponseModel):
    """Token accounting in OpenAI's shape."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None,
        description="What the prompt's tokens were (absent when an upstream engine does not say).",
        exclude_if=lambda value: value is None,
    )


class ImageSize(ResponseModel):
    """The image as a person sees it (after EXIF rotation) and the size that went to the model."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    resized_to: list[int] = Field(min_length=2, max_length=2)


class GroundingBox(ResponseModel):
    """A box the answer drew: on which image, normalised (0..1000), and in that image's pixels."""

    image: int = Field(description="Index of the image among the request's images (0-based).")
    box: list[float] = Field(description="[x1, y1, x2, y2] normalised to 0..1000, as the model wrote it.")
    pixels: list[float] = Field(
        description="[x1, y1, x2, y2] in the image's pixels as the user sees it (EXIF-rotated, "
        "before any resize)."
    )
    label: str | None = None


class TopLogprob(ResponseModel):
    """One likely token at a step: its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float = Field(le=0.0)
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    """One generated token with its log-probability and the most likely tokens at its step."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    """OpenAI's `choices[i].logprobs`: the answer's tokens (no refusals here)."""

    content: list[TokenLogprobEntry] | None
    refusal: None = None


class NativeAnswer(ResponseModel):
    """The fields both native answers share, `reasoning` only when enable_thinking was set."""

    id: str
    created: int
    model: str
    finish_reason: FinishReason
    usage: Usage
    reasoning: str | None = Field(default=None, exclude_if=_omitted_when_none)
    degraded: Literal[True] | None = Field(default=None, exclude_if=_omitted_when_none)
    boxes: list[GroundingBox] = Field(default_factory=list, description="Grounding boxes in the answer.")
    # With `logprobs: true`: each generated token, as chat completions' choices[0].logprobs.content.
    logprobs: list[TokenLogprobEntry] | None = Field(default=None, exclude_if=_omitted_when_none)


class VisionResponse(NativeAnswer):
    """POST /v1/chat/vision: the answer as `result`, and the image's sizes."""

    result: str
    success: Literal[True] = True
    image: ImageSize


class SeedChatResponse(NativeAnswer):
    """POST /v1/chat: the answer as `response`; `boxes` only when it has any (the guides' shape)."""

    response: str
    boxes: list[GroundingBox] | None = Field(default=None, exclude_if=_omitted_when_none)  # type: ignore[assignment]


# --- Chat completions ----------------------------------------------------------------------------


class CalledFunction(ResponseModel):
    """The function a tool call calls, its arguments as a JSON object's text."""

    name: str
    arguments: str


class ToolCallObject(ResponseModel):
    """One tool call of an answer."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(ResponseModel):
    """The answer of a chat completion; `reasoning_content` only when thinking was enabled.

    `content` is null when the answer is only tool calls; `tool_calls` is left out when there are none.
    """

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(default=None, exclude_if=_omitted_when_none)
    tool_calls: list[ToolCallObject] | None = Field(default=None, exclude_if=_omitted_when_none)
    # glmvision's extension: the answer's grounding boxes, when it has any.
    boxes: list[GroundingBox] | None = Field(default=None, exclude_if=_omitted_when_none)


class Choice(ResponseModel):
    """One choice of a chat completion (n of them, indexed from 0)."""

    index: int = Field(default=0, ge=0)
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(ResponseModel):
    """POST /v1/chat/completions without streaming."""

    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice] = Field(min_length=1)
    usage: Usage
    # Served under a deep queue with a smaller image side and token cap (GLMVISION_DEGRADE).
    degraded: Literal[True] | None = Field(default=None, exclude_if=_omitted_when_none)


class FunctionDelta(ResponseModel):
    """A piece of a streamed call's function: the name comes first, then its arguments' text."""

    name: str | None = Field(default=None, exclude_if=_omitted_when_none)
    arguments: str


class ToolCallDelta(ResponseModel):
    """A piece of the streamed call at `index`: its id, type and name in its first piece only."""

    index: int = Field(ge=0)
    id: str | None = Field(default=None, exclude_if=_omitted_when_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_omitted_when_none)
    function: FunctionDelta


class Delta(ResponseModel):
    """What a streamed chunk adds to the answer; absent keys add nothing."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omitted_when_none)
    content: str | None = Field(default=None, exclude_if=_omitted_when_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_omitted_when_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_omitted_when_none)
    # glmvision's extension, in the finish chunk only: the whole answer's grounding boxes.
    boxes: list[GroundingBox] | None = Field(default=None, exclude_if=_omitted_when_none)


class ChunkChoice(ResponseModel):
    """The one choice of a streamed chunk (chunks of n choices interleave, each naming its index)."""

    index: int = Field(default=0, ge=0)
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    """One streamed event; `usage` only with include_usage (null but on the last, choice-less, chunk)."""

    id: str
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice] = Field(max_length=1)
    usage: Usage | None = None
    degraded: Literal[True] | None = Field(default=None, exclude_if=_omitted_when_none)
