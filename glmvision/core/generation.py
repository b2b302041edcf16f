"""What a generation is asked for and what it gives: sampling parameters, constraints, answers, deltas."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

# Used when a request gives no temperature (OpenAI's default is 1; GLM-V's model card suggests less).
DEFAULT_TEMPERATURE = 0.7
# A temperature below this means greedy: float32 logits divided by much less overflow to inf or
# divide by zero (1e-300 is 0 in float32), and a sample that cold is the argmax anyway.
GREEDY_BELOW = 1e-5
# OpenAI's ceiling on top_logprobs.
MAX_TOP_LOGPROBS = 20
# What a token the sampler could not draw reports as its log-probability (JSON has no -inf); OpenAI's.
IMPOSSIBLE_LOGPROB = -9999.0
# One generated token's log-probability as the engine hands it over: (logprob, ((id, logprob), ...)),
# the alternatives most likely first.
RawLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolChoice:
    """A request's resolved `tool_choice`: auto, none, required, or one named function."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None  # the function, for mode "function"

    @property
    def forces_call(self) -> bool:
        """True when the answer must be a call (required, or a named function)."""
        return self.mode in ("required", "function")

    def to_json(self) -> str | dict[str, Any]:
        """The choice as OpenAI's `tool_choice` field."""
        if self.mode == "function":
            return {"type": "function", "function": {"name": self.name}}
        return self.mode


def allowed_tools(tools: tuple[dict[str, Any], ...], choice: ToolChoice | None) -> list[dict[str, Any]]:
    """The tools an answer may call: none for "none", only the named one for a function, else all.

    The one rule: the request check (a forced call needs a tool it allows), the call grammar and the
    answer's call parser all ask it.
    """
    if choice is None or choice.mode in ("auto", "required"):
        return list(tools)
    if choice.mode == "none":
        return []
    return [tool for tool in tools if tool["function"]["name"] == choice.name]


@dataclass(frozen=True)
class Constraint:
    """What decoding must produce: one call of one of `tools` (their JSON text) when given, else
    JSON valid against `schema` (canonical JSON text), or any JSON object when that is None too."""

    schema: str | None = None
    tools: str | None = None
    param: str = field(default="response_format", compare=False)  # the field errors about it name

    @property
    def kind(self) -> str:
        """What it asks for: tool_call, or OpenAI's json_schema or json_object."""
        if self.tools is not None:
            return "tool_call"
        return "json_object" if self.schema is None else "json_schema"


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one answer."""

    max_new_tokens: int
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    seed: int | None = None
    enable_thinking: bool = False
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0
    # OpenAI `tools` (rendered into the prompt) and the resolved `tool_choice`; () / None: no tools.
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: ToolChoice | None = None
    constraint: Constraint | None = None  # a grammar masks the logits at every step

    def __post_init__(self) -> None:
        if not self.temperature >= GREEDY_BELOW:  # NaN too
            # Here, so that both schedulers, their batching and the cache all see a greedy request.
            object.__setattr__(self, "temperature", 0.0)
        if self.constraint is not None and self.min_new_tokens:
            # The grammar decides where the document ends: min_new_tokens cannot hold it open.
            object.__setattr__(self, "min_new_tokens", 0)

    adapter: str | None = None  # a GLMVISION_LORA adapter's name; None: the base model
    # Report each token's log-probability and this many alternatives (0..MAX_TOP_LOGPROBS); None: none.
    logprobs: int | None = None

    @property
    def allowed_tools(self) -> list[dict[str, Any]]:
        """The tools this answer may call (see `allowed_tools`)."""
        return allowed_tools(self.tools, self.tool_choice)


def choice_params(params: GenerationParams, n: int) -> list[GenerationParams]:
    """Each of n choices' params: with a seed, choice i draws from its own stream, seeded seed + i."""
    if params.seed is None or n == 1:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as OpenAI's logprobs report it: its text, its UTF-8 bytes, its log-probability
    and (for a chosen token) the most likely alternatives at its step."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    def to_json(self, top: bool = True) -> dict[str, Any]:
        entry: dict[str, Any] = {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes)}
        if top:
            entry["top_logprobs"] = [alternative.to_json(False) for alternative in self.top]
        return entry


@dataclass(frozen=True)
class Generation:
    """One whole answer with its token accounting."""

    text: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    # Calls an upstream engine parsed itself (the local model's calls stay in `text`).
    tool_calls: tuple[ToolCall, ...] = ()
    # Prompt tokens whose KV came from the prefix cache, and that stand for images (None: not known,
    # as from an upstream engine that does not say).
    cached_tokens: int | None = None
    image_tokens: int | None = None
    # Each generated token's log-probability (its stop token excluded), when the request asked.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Delta:
    """New text since the previous delta (and, when asked, the log-probabilities of its tokens)."""

    reasoning: str = ""
    content: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


class AnswerStream(Protocol):
    """One generation as the pipeline reads it: deltas as they come, or the whole answer at once."""

    # Read-only properties, not attributes: a stream whose `queued_at` is always a float (or always None,
    # as a cache hit's) satisfies them, where a mutable protocol attribute must match its type exactly.

    @property
    def queued_at(self) -> float | None:
        """When it was queued for the model (time.monotonic())."""
        ...

    @property
    def started_at(self) -> float | None:
        """When the model began on it (None: no model call, as for a cache hit)."""
        ...

    @property
    def first_token_at(self) -> float | None: ...

    @property
    def ended_at(self) -> float | None: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def result(self) -> Generation | None:
        """The whole answer, once the stream has ended."""
        ...

    @property
    def token_ids(self) -> list[int]:
        """The ids generated so far (the response cache keeps them)."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once the stream was closed before its end."""
        ...

    def __iter__(self) -> Iterator[Delta]:
        """The answer's deltas, in order."""
        ...

    def whole(self, client_gone: Callable[[], bool] = ...) -> Generation:
        """The whole answer, waiting for it (and giving up when `client_gone` turns true)."""
        ...

    def close(self) -> None:
        """Stop generating (the client left); the backend frees its place."""
        ...
