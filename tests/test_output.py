"""Rendering generated text: streamed pieces always add up to the whole answer."""

from __future__ import annotations

import random

import pytest

from glmvision.postprocess.output import MARKERS, render

PIECES = [
    "<think>",
    "</think>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<",
    "</",
    "thi",
    "nk>",
    "<|beg",
    " ",
    "\n",
    "Hello",
    " world",
    "STOP",
    "ST",
    "OP",
    "END",
    "\ufffd",
    "é",
    "<|",
    "box",
    "answer",
]


def stream_pieces(pieces: list[str], thinking: bool, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Feed text piece by piece, collecting what a streaming client would receive."""
    sent_reasoning = sent_answer = ""
    text = ""
    for piece in pieces:
        text += piece
        partial = render(text, thinking, stops, final=False)
        assert partial.reasoning.startswith(sent_reasoning), (text, partial)
        assert partial.answer.startswith(sent_answer), (text, partial)
        sent_reasoning, sent_answer = partial.reasoning, partial.answer
        if partial.stopped:
            break
    return sent_reasoning, sent_answer, partial.stopped


@pytest.mark.parametrize("seed", range(400))
def test_streamed_text_adds_up_to_the_final_answer(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [rng.choice(PIECES) for _ in range(rng.randint(1, 14))]
    thinking = rng.random() < 0.5
    stops = tuple(rng.sample(["STOP", "END", "box"], rng.randint(0, 2)))
    reasoning, answer, stopped = stream_pieces(pieces, thinking, stops)
    final = render("".join(pieces), thinking, stops, final=True)
    # What was streamed is a prefix of the final answer; the final render sends the rest.
    assert final.answer.startswith(answer) and final.reasoning.startswith(reasoning)
    if stopped:
        assert (final.answer, final.reasoning) == (answer, reasoning)
    for stop in stops:
        assert stop not in final.answer
    for marker in ("<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>"):
        assert marker not in final.answer
    if not thinking:
        assert final.reasoning == ""


@pytest.mark.parametrize(
    ("text", "stops", "answer", "stopped"),
    [
        ("Hello STOP world", ("STOP",), "Hello", True),
        ("Hello world", ("STOP",), "Hello world", False),
        ("a END b STOP c", ("STOP", "END"), "a", True),
        ("  spaced  ", (), "spaced", False),
    ],
)
def test_stop_strings_cut_the_answer(text: str, stops: tuple[str, ...], answer: str, stopped: bool) -> None:
    rendered = render(text, False, stops)
    assert (rendered.answer, rendered.stopped) == (answer, stopped)


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ("Hello <|beg", "Hello"),  # could become a box marker
        ("Hello ST", "Hello"),  # could become the stop string
        ("<thi", ""),  # could become <think>
        ("caf\ufffd", "caf"),  # half a UTF-8 character
        ("Hello   ", "Hello"),  # trailing space waits for more text
    ],
)
def test_partial_renders_hold_back_undecided_text(text: str, held: str) -> None:
    assert render(text, False, ("STOP",), final=False).answer == held


@pytest.mark.parametrize(
    ("text", "thinking", "reasoning", "answer"),
    [
        ("<think>look at it</think>A cat.", True, "look at it", "A cat."),
        ("<think>look at it</think>A cat.", False, None, "A cat."),
        ("<think>still thinking", True, "still thinking", ""),
        ("Plain answer", True, "", "Plain answer"),
        ("\n<think></think>\n<|begin_of_box|>42<|end_of_box|>", False, None, "42"),
    ],
)
def test_split_reasoning(text: str, thinking: bool, reasoning: str | None, answer: str) -> None:
    rendered = render(text, thinking)
    assert ((rendered.reasoning if thinking else None), rendered.answer) == (reasoning, answer)


def test_stop_string_token_count_does_not_depend_on_grouping() -> None:
    """Tokens may reach a stream one by one or several at once; the stop lands on the same token."""
    from glmvision.core.generation import GenerationParams
    from glmvision.postprocess.stream import GenerationStream

    class Letters:
        stop_ids = [0]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(96 + i) for i in ids)

    ids = [1, 2, 19, 20, 15, 16, 3, 4, 5]  # "abstopcde": "stop" ends after the 6th token
    params = GenerationParams(max_new_tokens=20, stop=("stop",))
    counts = []
    for groups in ([[i] for i in ids], [ids[:4], ids[4:]], [ids]):
        stream = GenerationStream(Letters(), 3, params)
        for group in groups:
            stream.put(group)
        stream.end()
        counts.append(stream.whole())
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in counts] == [("ab", 6, "stop")] * 3


def test_a_partial_stop_string_after_a_space_is_held_back_with_the_space() -> None:
    """Issue 7's example: "Hello STO" may still become "Hello STOP", so only "Hello" is sent."""
    assert render("Hello STO", False, ("STOP",), final=False) == render("Hello", False, (), final=True)


@pytest.mark.parametrize(
    ("pieces", "stops", "answer"),
    [
        # "ST" before a half marker: the marker completes, vanishes, and "ST" + "OP" is the stop.
        (["Hello ST", "<|beg", "in_of_box|>", "OP and more"], ("STOP",), "Hello"),
        # A half marker before a half marker: "</" + "think>" is a marker once the box one goes.
        (["Yes </", "<|beg", "in_of_box|>", "think> no"], (), "Yes  no"),
        # A stop string with a space in it, its start before a half marker.
        (["Hello lo", "<|beg", "in_of_box|>", " World"], ("lo W",), "Hello"),
    ],
)
def test_text_before_a_held_marker_is_held_too(
    pieces: list[str], stops: tuple[str, ...], answer: str
) -> None:
    _, streamed, _ = stream_pieces(pieces, False, stops)
    assert render("".join(pieces), False, stops).answer == answer
    assert answer.startswith(streamed)


def test_removing_a_marker_cannot_leave_another_one_behind() -> None:
    assert render("<thi<|end_of_box|>nk>A cat.", False).answer == "A cat."
    assert render("x <|begin<|end_of_box|>_of_box|>y", False).answer == "x y"


# Pieces that cut stop strings (some with spaces in them) and markers at every point.
SPLIT_PIECES = [
    *["Hello", " ", "  ", "\n", "lo", " W", "W", "orld", "a", " b", "b", "\ufffd", "é"],
    *["S", "ST", "TO", "OP", "P", "STOP", " STOP", "END", "E", "ND"],
    *["<", "</", "<|", "<|beg", "in_of_box|>", "<|begin_of_box|>", "<|end_of_box|>"],
    *["<thi", "nk>", "<think>", "</think>", "think>"],
]
SPLIT_STOPS = ["STOP", " STOP", "lo W", "a b", "\n\n", "END", "o W"]


def test_streamed_deltas_add_up_to_the_final_answer_for_random_splits() -> None:
    """Over many random token splits, what a client receives is exactly the final answer."""
    rng = random.Random(7)
    for _ in range(3000):
        pieces = [rng.choice(SPLIT_PIECES) for _ in range(rng.randint(1, 12))]
        thinking = rng.random() < 0.5
        stops = tuple(rng.sample(SPLIT_STOPS, rng.randint(0, 2)))
        received = {"reasoning": "", "answer": ""}
        text = ""
        for piece in pieces:
            text += piece
            partial = render(text, thinking, stops, final=False)
            for part in received:
                now = getattr(partial, part)
                assert now.startswith(received[part]), (pieces, stops, text, partial)
                received[part] = now
            if partial.stopped:
                break  # generation ends here: the final render sees no more text
        final = render(text, thinking, stops, final=True)
        assert final.answer.startswith(received["answer"]), (pieces, stops, final)
        assert final.reasoning.startswith(received["reasoning"]), (pieces, stops, final)
        assert not any(stop in final.answer for stop in stops), (pieces, stops, final)
        assert not any(marker in final.answer for marker in MARKERS), (pieces, final)


@pytest.mark.parametrize("stop", ["<", "<t", "<thin"])
def test_a_stop_string_that_starts_think_does_not_end_a_reasoning_output(stop: str) -> None:
    """Until "<think>" is complete or ruled out, a stop string cannot match its first letters."""
    pieces = ["<", "th", "ink>", "look", "</think>", "A cat."]
    reasoning, answer, stopped = stream_pieces(pieces, True, (stop,))
    assert not stopped
    final = render("".join(pieces), True, (stop,))
    assert (final.reasoning, final.answer, final.stopped) == ("look", "A cat.", False)
    assert final.answer.startswith(answer) and final.reasoning.startswith(reasoning)


def test_the_stream_renderer_matches_render_at_every_step() -> None:
    """Rendering only the new text gives what rendering all of it gives, piece after piece."""
    from glmvision.postprocess.output import StreamRenderer

    rng = random.Random(11)
    pieces_pool = [*SPLIT_PIECES, *PIECES, "\ufffd\ufffd", "  \n", "STO", "<|end", "_of_box|>"]
    for _ in range(6000):
        pieces = [rng.choice(pieces_pool) for _ in range(rng.randint(1, 16))]
        thinking = rng.random() < 0.5
        stops = tuple(rng.sample(SPLIT_STOPS, rng.randint(0, 2)))
        renderer = StreamRenderer(thinking, stops)
        reasoning = answer = text = ""
        for piece in pieces:
            text += piece
            new_reasoning, new_answer = renderer.feed(piece)
            reasoning, answer = reasoning + new_reasoning, answer + new_answer
            expected = render(text, thinking, stops, final=False)
            assert (reasoning, answer, renderer.stopped) == (
                expected.reasoning,
                expected.answer,
                expected.stopped,
            ), (pieces, thinking, stops, text)
            if renderer.stopped:
                break
