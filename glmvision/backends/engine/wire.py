"""The messages workers and an engine process exchange, as msgspec Structs in msgpack (no pickle).

One tagged union: `decode` reads any message and refuses a malformed or unknown frame with `WireError`,
so a reader can log the frame and go on. Tensors never travel in a message: a `Submit` names them
(`TensorRef`, see shm.py) in a shared-memory block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from glmvision.core.generation import Constraint, GenerationParams, ToolChoice

# Raised with each change of a message's fields: a worker and an engine of different code refuse each other.
PROTOCOL = 5

DType = Literal["int64", "int32", "int16", "uint8", "bool", "float32", "float16", "bfloat16"]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
State = Literal["loading", "ready", "draining", "failed"]


class WireError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


class TensorRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one tensor lies: its block, byte offset, dtype and shape (its bytes are C-contiguous)."""

    name: str
    block: str
    offset: NonNegative
    dtype: DType
    shape: tuple[NonNegative, ...]


class WireToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


class WireConstraint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: str | None
    tools: str | None
    param: str


class WireParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`GenerationParams`, field for field (tests/test_engine_wire.py checks none is missing)."""

    max_new_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    enable_thinking: bool
    stop: tuple[str, ...]
    min_new_tokens: int
    tools: tuple[dict[str, Any], ...]
    tool_choice: WireToolChoice | None
    constraint: WireConstraint | None
    adapter: str | None
    logprobs: int | None = None

    @classmethod
    def of(cls, params: GenerationParams) -> WireParams:
        """The wire form of `params`."""
        choice, constraint = params.tool_choice, params.constraint
        return cls(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            enable_thinking=params.enable_thinking,
            stop=params.stop,
            min_new_tokens=params.min_new_tokens,
            tools=params.tools,
            tool_choice=None if choice is None else WireToolChoice(choice.mode, choice.name),
            constraint=(
                None
                if constraint is None
                else WireConstraint(constraint.schema, constraint.tools, constraint.param)
            ),
            adapter=params.adapter,
            logprobs=params.logprobs,
        )

    def to_params(self) -> GenerationParams:
        """The `GenerationParams` this was made of."""
        choice, wired = self.tool_choice, self.constraint
        constraint = None if wired is None else Constraint(wired.schema, wired.tools, wired.param)
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            enable_thinking=self.enable_thinking,
            stop=tuple(self.stop),
            min_new_tokens=self.min_new_tokens,
            tools=tuple(self.tools),
            tool_choice=None if choice is None else ToolChoice(choice.mode, choice.name),
            constraint=constraint,
            adapter=self.adapter,
            logprobs=self.logprobs,
        )


class Submit(msgspec.Struct, frozen=True, tag="submit", forbid_unknown_fields=True):
    """Generate for one request: its inputs (in shared memory), parameters and compiled grammar."""

    request_id: str
    tensors: tuple[TensorRef, ...]
    params: WireParams
    grammar: str | None  # xgrammar's CompiledGrammar.serialize_json(), as compiler.py moves it
    deadline_s: float  # seconds left when sent (clocks are per process: monotonic times do not travel)


class Tokens(msgspec.Struct, frozen=True, tag="tokens", forbid_unknown_fields=True):
    """New token ids of one request; `end` is its last message, with an error code when it failed (and
    the request field the error names, if any)."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    end: bool = False
    cached_tokens: NonNegative = 0  # on the first message: prompt tokens the prefix cache gave
    error_code: str | None = None
    error_message: str | None = None
    error_param: str | None = None
    # One per token id, when the request asked: (logprob, ((id, logprob), ...)) as the sampler gave them.
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()


class Abort(msgspec.Struct, frozen=True, tag="abort", forbid_unknown_fields=True):
    """Stop one request (its client left); the engine answers with its end."""

    request_id: str


class HealthQuery(msgspec.Struct, frozen=True, tag="health_query", forbid_unknown_fields=True):
    query_id: int = 0


class HealthReport(msgspec.Struct, frozen=True, tag="health_report", forbid_unknown_fields=True):
    """What an engine process says of itself."""

    query_id: int
    pid: int
    device: str
    model_id: str
    loaded: bool
    queue_depth: NonNegative
    running: NonNegative
    state: State
    full: bool = False  # its queue holds GLMVISION_ADMISSION_CAPACITY: workers refuse in front
    stalled_s: float = 0.0  # seconds without progress while work waits
    counters: dict[str, float | int | str] = {}  # EngineStats, for /readyz
    gpu: tuple[int, int, int] | None = None  # allocated, reserved and total bytes on its GPU
    # Since the previous report (to any worker, so the workers' sums count each once): batch sizes
    # as (rows, batches), and torch.cuda.empty_cache() calls.
    batches: tuple[tuple[int, int], ...] = ()
    cache_empties: NonNegative = 0
    cache_events: dict[str, NonNegative] = {}  # the model caches' counters, since the previous report
    protocol: int = PROTOCOL


Message = Submit | Tokens | Abort | HealthQuery | HealthReport

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """One message as a msgpack frame."""
    return _encoder.encode(message)


def decode(frame: bytes | memoryview) -> Message:
    """The message in `frame`; `WireError` when it is not one."""
    try:
        return _decoder.decode(frame)
    except msgspec.MsgspecError as exc:  # DecodeError and ValidationError both
        raise WireError(f"refused a frame of {len(frame)} bytes: {exc}") from None
