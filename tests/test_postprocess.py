"""The post-processing stages: each alone, and the streamed path giving the whole path's answer."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmvision.core.generation import Constraint, GenerationParams, ToolCall, ToolChoice
from glmvision.postprocess.pipeline import (
    ORDER,
    Boxes,
    JsonCheck,
    Piece,
    Pipeline,
    Redaction,
    StopStrings,
    ThinkingSplit,
    ToolCalls,
    full_pipeline,
    text_pipeline,
)
from glmvision.postprocess.redact import Redactor

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
STOPS = ("STOP", "END")
BOX = Boxes(((200, 100),), 1)


def stream(pipeline: Pipeline, pieces: list[str], last: Piece | None = None) -> tuple[list[Piece], Piece]:
    """Feed raw text piece by piece: the deltas a client gets, and the stream's whole result."""
    post = pipeline.stream()
    deltas = [post.feed(Piece(content=piece)) for piece in pieces]
    deltas.append(post.finish(last))
    return deltas, post.result


# Each stage alone.


@pytest.mark.parametrize("thinking", [True, False])
def test_the_thinking_stage_splits_reasoning_and_drops_markers(thinking: bool) -> None:
    raw = " <think> look </think> A <|begin_of_box|>[[1,2,3,4]]<|end_of_box|> "
    out = ThinkingSplit(thinking).whole(Piece(content=raw))
    assert (out.reasoning, out.content) == ("look" if thinking else "", " A [[1,2,3,4]] ")


def test_the_thinking_stage_streams_settled_text_and_holds_a_marker_start() -> None:
    post = ThinkingSplit(False).stream()
    first = post.feed(Piece(content="A <|begin_of"))
    assert (first.content, first.unsettled) == ("", "A <|begin_of")  # the marker may yet complete
    second = post.feed(Piece(content="_box|>[[1,2,3,4]]"))
    assert second.content == "A [[1,2,3,4]]" and second.unsettled == ""


def test_the_stop_stage_cuts_strips_and_says_so() -> None:
    out = StopStrings(STOPS).whole(Piece(content="  abc ENDdef STOP"))
    assert (out.content, out.stopped) == ("abc", True)
    assert StopStrings(STOPS).whole(Piece(content=" abc ")) == Piece(content="abc")


def test_the_stop_stage_streams_nothing_of_a_partial_stop_string() -> None:
    post = StopStrings(("STOP",)).stream()
    assert post.feed(Piece(content="Hi ST", unsettled="")).content == "Hi"
    done = post.feed(Piece(content="OP more", unsettled=""))
    assert (done.content, done.stopped) == ("", True)
    assert post.finish(Piece()).content == ""


def test_the_redaction_stage_masks_reasoning_and_answer() -> None:
    stage = Redaction(Redactor(["phone"]))
    out = stage.whole(Piece("ring 13800138000", "call 138 0013 8000"))
    assert (out.reasoning, out.content) == ("ring *******8000", "call *** **** 8000")
    post = stage.stream()
    sent = post.feed(Piece(content="call 1380013")).content
    assert "1380013" not in sent  # may still be a phone number: held back
    assert sent + post.finish(Piece(content="8000")).content == "call *******8000"


def test_the_tool_stage_takes_calls_out_before_an_upstreams_own() -> None:
    theirs = ToolCall("call_x", "get_weather", '{"city": "Rome"}')
    out = ToolCalls((WEATHER,)).whole(Piece(content=f"Sure. {CALL}", calls=(theirs,)))
    assert out.content == "Sure."
    assert [(call.name, call.arguments) for call in out.calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_weather", '{"city": "Rome"}'),
    ]
    assert ToolCalls(()).whole(Piece(content=f" {CALL} ")).content == f" {CALL} "  # no tools: untouched


def test_the_tool_stage_holds_a_call_until_it_closes() -> None:
    post = ToolCalls((WEATHER,)).stream()
    assert post.feed(Piece(content="Sure. <tool_")).content == "Sure."
    assert post.feed(Piece(content=CALL[6:-3])) == Piece()
    closed = post.feed(Piece(content=CALL[-3:]))
    assert [call.name for call in closed.calls] == ["get_weather"]


def test_the_box_stage_places_boxes_in_the_users_pixels() -> None:
    out = BOX.whole(Piece(content="It is here: [[0,0,500,500]]"))
    assert out.content == "It is here: [[0,0,500,500]]"
    assert [(box.image, box.pixels) for box in out.boxes] == [(0, [0.0, 0.0, 100.0, 50.0])]
    post = BOX.stream()
    assert post.feed(Piece(content="[[0,0,500,")).boxes == ()
    assert len(post.finish(Piece(content="500]]")).boxes) == 1  # found in the whole answer, at the end


@pytest.mark.parametrize(
    ("constraint", "text", "valid"),
    [
        (Constraint(), '{"a": 1}', True),
        (Constraint(), '{"a": ', False),
        (Constraint(schema='{"type": "object"}'), '{"a": NaN}', False),
        (Constraint(tools="[]"), "not json", None),
        (None, "not json", None),
    ],
)
def test_the_json_stage_checks_only_json_constrained_answers(
    constraint: Constraint | None, text: str, valid: bool | None
) -> None:
    out = JsonCheck(constraint).whole(Piece(content=text))
    assert (out.content, out.json_valid) == (text, valid)
    assert JsonCheck(constraint).stream().finish(Piece(content=text)).json_valid == valid


def test_every_stage_leaves_its_mark_on_the_whole_answer_streamed_or_not() -> None:
    text = "<think> hm </think> Call 13800138000 at [[0,0,500,500]] " + CALL + " STOP no"
    params = GenerationParams(**{**PARAMS.__dict__, "constraint": Constraint()})
    pipeline = full_pipeline(params, Redactor(["phone"]), BOX)
    whole = pipeline.whole(Piece(content=text))
    assert (whole.reasoning, whole.content) == ("hm", "Call *******8000 at [[0,0,500,500]]")
    assert [call.name for call in whole.calls] == ["get_weather"]
    assert [box.pixels for box in whole.boxes] == [[0.0, 0.0, 100.0, 50.0]]
    assert whole.stopped and whole.json_valid is False
    _, streamed = stream(pipeline, list(text))
    assert outcome(streamed) == outcome(whole) and streamed.stopped


def test_a_pipeline_keeps_its_stages_in_order() -> None:
    assert [stage.name for stage in full_pipeline(PARAMS, Redactor(["phone"]), BOX).stages] == list(ORDER)
    with pytest.raises(ValueError, match="order"):
        Pipeline((StopStrings(STOPS), ThinkingSplit(True)))


# The streamed path against the whole path.

PARAMS = GenerationParams(
    max_new_tokens=64, enable_thinking=True, stop=STOPS, tools=(WEATHER,), tool_choice=ToolChoice("auto")
)
TRICKY = [
    "<think>Let me look.</think>The cat is <|begin_of_box|>[[10,20,300,400]]<|end_of_box|> there. STOP more",
    "  <think>\nhmm 13800138000</think>\n\nCall 138 0013 8000 now." + CALL + " done",
    '[{"bbox_2d": [100, 200, 300, 400], "label": "cat 13800138000"}] ST',
    "No thinking <thi here [[1,2,3,4]] and a stray </think> then ENDING",
    "<tool_call>unknown<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> text <tool_call>get_weather",
    "<think>a <|begin_of_box|>b</thi</think>   <|begin_<think>of_box|>x<|end_of_box|> é \ufffd",
    "   ",
    "<thi",
    "<think>unfinished ST",
    CALL + CALL.replace("Paris", "mail ann@example.com") + " END " + CALL,
]
# Where a chunk boundary hurts: inside a stop string, <think>, a tool tag, a box marker.
AWKWARD = ["ST", "<th", "</thi", "<tool_", "</tool_ca", "<arg_", "<|begin_of", "<|end_", "1380013", "[[10,2"]


def outcome(piece: Piece) -> tuple[Any, ...]:
    """What the client gets, call ids aside (each parse makes new ones)."""
    calls = [(call.name, call.arguments) for call in piece.calls]
    return piece.reasoning, piece.content, calls, piece.boxes, piece.json_valid


def awkward_cuts(text: str) -> list[int]:
    return sorted({at + 1 for needle in AWKWARD for at in range(len(text)) if text.startswith(needle, at)})


def split_at(text: str, cuts: list[int]) -> list[str]:
    edges = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def check_same(pipeline: Pipeline, text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    whole = pipeline.whole(Piece(content=text))
    deltas, result = stream(pipeline, pieces)
    assert outcome(result) == outcome(whole), pieces
    assert "".join(delta.content for delta in deltas) == whole.content
    assert "".join(delta.reasoning for delta in deltas) == whole.reasoning


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("constraint", [None, Constraint()])
def test_streaming_token_by_token_and_at_awkward_cuts_gives_the_whole_answer(
    text: str, constraint: Constraint | None
) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, "constraint": constraint})
    pipeline = full_pipeline(params, Redactor(["phone", "email"]), BOX)
    check_same(pipeline, text, list(text))
    check_same(pipeline, text, split_at(text, awkward_cuts(text)))
    check_same(pipeline, text, [text])


@settings(max_examples=300, deadline=None)
@given(
    text=st.sampled_from(TRICKY),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=12),
    thinking=st.booleans(),
    redact=st.booleans(),
)
def test_streaming_at_any_cuts_gives_the_whole_answer(
    text: str, cuts: list[int], thinking: bool, redact: bool
) -> None:
    params = GenerationParams(**{**PARAMS.__dict__, "enable_thinking": thinking})
    pipeline = full_pipeline(params, Redactor(["phone", "email"] if redact else []), BOX)
    check_same(pipeline, text, split_at(text, [cut for cut in cuts if cut < len(text)]))


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(["<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>", CALL, "<tool_call>"])
        | st.sampled_from(["ST", "OP", "STOP", "END", " ", "\n", "[[1,2,3,4]]", "138 0013 8000", "é", "<|"])
        | st.text(alphabet="<>|/thinkSTOP [],0123 ", max_size=6),
        max_size=14,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=16),
)
def test_streaming_made_up_text_at_any_cuts_gives_the_whole_answer(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    pipeline = full_pipeline(PARAMS, Redactor(["phone"]), BOX)
    check_same(pipeline, text, split_at(text, [cut for cut in cuts if cut < len(text)]))


def test_the_text_stages_stream_as_the_generation_streams_use_them() -> None:
    """The generation streams stop feeding once `stopped`: the rest then comes from the whole form."""
    post = text_pipeline(True, ("STOP",)).stream()
    sent = ""
    for piece in ["<think>x</think>", "Hello ", "wor", "ld ST", "OP", " never"]:
        sent += post.feed(Piece(content=piece)).content
        if post.stopped:
            break
    sent += post.finish().content
    assert sent == post.result.content == "Hello world"
    assert post.result.reasoning == "x"
