"""From generated text to the client's answer: one ordered list of small stages.

ORDER names them: thinking split -> stop strings -> redaction -> tool calls -> boxes -> JSON check.
Redaction comes before tool calls and boxes because they read the answer as the client gets it (a
phone number in a call's arguments or a box's label is masked). Each stage has one job and one shape:
`whole(Piece) -> Piece` for an answer at once, and `stream()` for its incremental form, whose
`feed(Piece) -> Piece` takes and gives deltas and `finish(last) -> Piece` takes the last input and
gives the rest. A `Pipeline` runs consecutive stages in ORDER, whole or streamed, so the two paths
run the same stages in the same order.

Each layer runs the stages it has the inputs for: the generation streams (postprocess/stream.py,
backends/upstream/stream.py) run `text_pipeline` (a stop string ends generation); serving's Answer
runs `redaction_pipeline` (the redactor is the service's); the OpenAI route runs `reply_pipeline`
(tools, images and the constraint are the request's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from glmvision.core.generation import Constraint, GenerationParams, ToolCall
from glmvision.core.jsontext import strict_loads
from glmvision.core.responses import GroundingBox
from glmvision.postprocess.boxes import place_boxes
from glmvision.postprocess.output import MARKERS, StopStream, ThinkingStream, cut_at_stops, split_thinking
from glmvision.postprocess.tools import TOOL_TAGS, ToolCallStream, parse_tool_calls

if TYPE_CHECKING:
    from glmvision.postprocess.redact import Redactor

log = logging.getLogger("glmvision")

ORDER = ("thinking", "stop", "redact", "tools", "boxes", "json")
# Special tokens the stages read, so the tokenizer must decode them as text.
KEPT_TOKENS = (*MARKERS, *TOOL_TAGS)


@dataclass(frozen=True)
class Piece:
    """What passes between stages: an answer whole, or a delta of one."""

    reasoning: str = ""
    content: str = ""
    calls: tuple[ToolCall, ...] = ()
    stopped: bool = False  # a stop string ended the answer
    # Only between the thinking and stop stages' incremental forms: the answer's tail after
    # `content` that a marker may still take back (None: no answer text yet).
    unsettled: str | None = None
    boxes: tuple[GroundingBox, ...] = ()  # the whole answer's, from the boxes stage
    json_valid: bool | None = None  # for a JSON-constrained answer, from the JSON check

    @property
    def empty(self) -> bool:
        """True when it adds nothing a client would see."""
        return not (self.reasoning or self.content or self.calls)

    def then(self, other: Piece) -> Piece:
        """This delta followed by `other`."""
        return Piece(
            self.reasoning + other.reasoning,
            self.content + other.content,
            self.calls + other.calls,
            self.stopped or other.stopped,
            other.unsettled,
            self.boxes + other.boxes,
            other.json_valid if other.json_valid is not None else self.json_valid,
        )


class StageStream(Protocol):
    """A stage's incremental form."""

    def feed(self, piece: Piece) -> Piece: ...

    def finish(self, last: Piece) -> Piece: ...


class Stage(Protocol):
    """One step from generated text to the answer."""

    name: ClassVar[str]

    def whole(self, piece: Piece) -> Piece: ...

    def stream(self) -> StageStream: ...


class _Sent:
    """What a stage streamed so far, so its finish can send the rest of its whole form."""

    def __init__(self) -> None:
        self.reasoning = self.content = ""

    def rest(self, whole: Piece) -> Piece:
        """`whole` less what was sent (nothing where the stream somehow differs from it)."""
        reasoning, content = _after(whole.reasoning, self.reasoning), _after(whole.content, self.content)
        self.note(reasoning, content)
        return Piece(reasoning, content, whole.calls, whole.stopped)

    def note(self, reasoning: str, content: str) -> None:
        self.reasoning += reasoning
        self.content += content


def _after(whole: str, sent: str) -> str:
    return whole[len(sent) :] if whole.startswith(sent) else ""


@dataclass(frozen=True)
class ThinkingSplit:
    """Raw model text -> reasoning (kept only when thinking was asked for) and answer, markers removed."""

    thinking: bool
    name: ClassVar[str] = "thinking"

    def whole(self, piece: Piece) -> Piece:
        reasoning, content = split_thinking(piece.content, self.thinking)
        return replace(piece, reasoning=reasoning, content=content)

    def stream(self) -> _ThinkingSplitStream:
        return _ThinkingSplitStream(self)


class _ThinkingSplitStream:
    def __init__(self, stage: ThinkingSplit) -> None:
        self._stage, self._split, self._raw, self._sent = stage, ThinkingStream(stage.thinking), "", _Sent()

    def feed(self, piece: Piece) -> Piece:
        self._raw += piece.content
        reasoning, settled, tail = self._split.feed(piece.content)
        self._sent.note(reasoning, settled)
        return replace(piece, reasoning=reasoning, content=settled, unsettled=tail)

    def finish(self, last: Piece) -> Piece:
        self._raw += last.content
        # At the end no marker can complete any more: the whole form says what the rest is.
        rest = self._sent.rest(self._stage.whole(Piece(content=self._raw)))
        return replace(last, reasoning=rest.reasoning, content=rest.content, unsettled="")


@dataclass(frozen=True)
class StopStrings:
    """The answer up to the first stop string, stripped; `stopped` says one ended it."""

    stops: tuple[str, ...]
    name: ClassVar[str] = "stop"

    def whole(self, piece: Piece) -> Piece:
        content, stopped = cut_at_stops(piece.content, self.stops)
        return replace(piece, content=content, stopped=piece.stopped or stopped)

    def stream(self) -> _StopStringsStream:
        return _StopStringsStream(self)


class _StopStringsStream:
    def __init__(self, stage: StopStrings) -> None:
        self._stage, self._stop, self._settled, self._sent = stage, StopStream(stage.stops), "", _Sent()

    def feed(self, piece: Piece) -> Piece:
        self._settled += piece.content
        content = ""
        if piece.unsettled is not None or piece.content:
            content = self._stop.feed(piece.content, piece.unsettled or "")
        self._sent.note(piece.reasoning, content)
        return replace(piece, content=content, stopped=self._stop.stopped, unsettled=None)

    def finish(self, last: Piece) -> Piece:
        self._settled += last.content
        self._sent.note(last.reasoning, "")
        whole = self._stage.whole(Piece(self._sent.reasoning, self._settled))
        rest = self._sent.rest(whole)
        return replace(last, content=rest.content, stopped=whole.stopped, unsettled=None)


@dataclass(frozen=True)
class Redaction:
    """The configured kinds of numbers and addresses masked, in reasoning and answer alike."""

    redactor: Redactor
    name: ClassVar[str] = "redact"

    def whole(self, piece: Piece) -> Piece:
        return replace(
            piece,
            reasoning=self.redactor.redact(piece.reasoning),
            content=self.redactor.redact(piece.content),
        )

    def stream(self) -> _RedactionStream:
        return _RedactionStream(self.redactor)


class _RedactionStream:
    def __init__(self, redactor: Redactor) -> None:
        self._reasoning, self._content = redactor.stream(), redactor.stream()

    def feed(self, piece: Piece) -> Piece:
        reasoning, content = self._reasoning.feed(piece.reasoning), self._content.feed(piece.content)
        return replace(piece, reasoning=reasoning, content=content)

    def finish(self, last: Piece) -> Piece:
        fed = self.feed(last)
        reasoning, content = fed.reasoning + self._reasoning.flush(), fed.content + self._content.flush()
        return replace(fed, reasoning=reasoning, content=content)


@dataclass(frozen=True)
class ToolCalls:
    """Well-formed calls to the allowed tools taken out of the answer, before any the piece carried
    (an upstream engine's own); without allowed tools the answer passes unchanged."""

    tools: tuple[dict[str, Any], ...]
    name: ClassVar[str] = "tools"

    def whole(self, piece: Piece) -> Piece:
        if not self.tools:
            return piece
        content, calls = parse_tool_calls(piece.content, list(self.tools))
        return replace(piece, content=content, calls=(*calls, *piece.calls))

    def stream(self) -> StageStream:
        return _ToolCallsStream(self.tools) if self.tools else _Passing()


class _ToolCallsStream:
    def __init__(self, tools: tuple[dict[str, Any], ...]) -> None:
        self._calls = ToolCallStream(list(tools))

    def feed(self, piece: Piece) -> Piece:
        content, calls = self._calls.feed(piece.content)
        return replace(piece, content=content, calls=(*calls, *piece.calls))

    def finish(self, last: Piece) -> Piece:
        fed = self.feed(last)
        return replace(fed, content=fed.content + self._calls.finish())


@dataclass(frozen=True)
class Boxes:
    """The answer's grounding boxes on the request's images (`sizes` as the user sees them;
    `last_turn_images`: how many the last question carried)."""

    sizes: tuple[tuple[int, int], ...]
    last_turn_images: int
    name: ClassVar[str] = "boxes"

    def whole(self, piece: Piece) -> Piece:
        return replace(piece, boxes=self.place(piece.content))

    def place(self, text: str) -> tuple[GroundingBox, ...]:
        """The boxes `text` draws."""
        placed = place_boxes(text, list(self.sizes), self.last_turn_images)
        return tuple(GroundingBox(**box.to_json()) for box in placed)

    def stream(self) -> _WholeAtEnd:
        return _WholeAtEnd(self)


@dataclass(frozen=True)
class JsonCheck:
    """Whether an answer constrained to JSON (not to a tool call) parses; the text passes unchanged.

    A grammar makes it JSON; an answer cut by length, or masked by redaction, may not be.
    """

    constraint: Constraint | None
    name: ClassVar[str] = "json"

    def whole(self, piece: Piece) -> Piece:
        valid = None
        if self.constraint is not None and self.constraint.tools is None:
            try:
                strict_loads(piece.content)
                valid = True
            except ValueError:
                valid = False
                log.debug("a %s answer is not JSON (cut short, or redacted)", self.constraint.kind)
        return replace(piece, json_valid=valid)

    def stream(self) -> _WholeAtEnd:
        return _WholeAtEnd(self)


class _Passing:
    """The incremental form of a stage with nothing to do."""

    def feed(self, piece: Piece) -> Piece:
        return piece

    def finish(self, last: Piece) -> Piece:
        return self.feed(last)


class _WholeAtEnd:
    """The incremental form of a stage that reads the whole answer: deltas pass, its findings come last."""

    def __init__(self, stage: Boxes | JsonCheck) -> None:
        self._stage, self._reasoning, self._content = stage, "", ""

    def feed(self, piece: Piece) -> Piece:
        self._reasoning += piece.reasoning
        self._content += piece.content
        return piece

    def finish(self, last: Piece) -> Piece:
        self.feed(last)
        found = self._stage.whole(replace(last, reasoning=self._reasoning, content=self._content))
        return replace(found, reasoning=last.reasoning, content=last.content, unsettled=None)


@dataclass(frozen=True)
class Pipeline:
    """Consecutive stages in ORDER, run on a whole answer or on its deltas."""

    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        if names != sorted(names, key=ORDER.index) or len(set(names)) != len(names):
            raise ValueError(f"stages {names} are not in the order {ORDER}")

    def whole(self, piece: Piece) -> Piece:
        """Every stage's whole form, in order."""
        for stage in self.stages:
            piece = stage.whole(piece)
        return piece

    def stream(self) -> PipelineStream:
        """Every stage's incremental form, chained in order."""
        return PipelineStream([stage.stream() for stage in self.stages])

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline((*self.stages, *other.stages))


@dataclass
class PipelineStream:
    """Deltas through every stage in turn; `result` adds up all it gave (the whole answer, once finished)."""

    streams: Sequence[StageStream]
    result: Piece = field(default_factory=Piece)

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the answer."""
        return self.result.stopped

    def feed(self, piece: Piece) -> Piece:
        """The delta `piece` makes visible after every stage."""
        for stream in self.streams:
            piece = stream.feed(piece)
        return self._given(piece)

    def finish(self, last: Piece | None = None) -> Piece:
        """The rest, once the last input (e.g. an upstream's own tool calls) is in."""
        piece = last if last is not None else Piece()
        for stream in self.streams:
            piece = stream.finish(piece)
        return self._given(piece)

    def _given(self, piece: Piece) -> Piece:
        self.result = self.result.then(piece)
        return piece


def text_pipeline(thinking: bool, stops: tuple[str, ...]) -> Pipeline:
    """Raw model text -> reasoning and answer: what a generation stream runs (stop strings end it)."""
    return Pipeline((ThinkingSplit(thinking), StopStrings(stops)))


def redaction_pipeline(redactor: Redactor | None) -> Pipeline:
    """Masking, where a redactor is configured (else nothing)."""
    return Pipeline((Redaction(redactor),) if redactor is not None and redactor.enabled else ())


def reply_pipeline(params: GenerationParams, boxes: Boxes) -> Pipeline:
    """Tool calls, boxes and the JSON check: what the OpenAI route runs on the answer it sends."""
    tools = tuple(params.allowed_tools)
    return Pipeline((ToolCalls(tools), boxes, JsonCheck(params.constraint)))


def full_pipeline(params: GenerationParams, redactor: Redactor | None, boxes: Boxes) -> Pipeline:
    """Every stage, in ORDER: the parts above, joined."""
    return (
        text_pipeline(params.enable_thinking, params.stop)
        + redaction_pipeline(redactor)
        + reply_pipeline(params, boxes)
    )
