"""Turning generated text into answer and reasoning, incrementally, with stop strings.

The same function renders partial and final text, so a streamed answer's pieces always add up to
exactly the non-streamed answer: partial renders only hold back what a later token could change.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Markers the model writes that are not part of an answer.
MARKERS = (THINK_OPEN, THINK_CLOSE, "<|begin_of_box|>", "<|end_of_box|>")


@dataclass(frozen=True)
class Rendered:
    """Visible reasoning and answer so far, and whether a stop string ended the answer."""

    reasoning: str
    answer: str
    stopped: bool = False


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `needles` without completing it."""
    longest = 0
    for needle in needles:
        for size in range(min(len(needle) - 1, len(text)), longest, -1):
            if text.endswith(needle[:size]):
                longest = size
                break
    return longest


def _hold(text: str, needles: tuple[str, ...], final: bool) -> str:
    if final:
        return text.strip()
    # A held start of a marker may yet complete and vanish, joining the text before it to what
    # follows: so what is left must not end with the start of a needle either.
    while held := _partial_suffix(text, needles):
        text = text[:-held]
    # Whitespace at either end is dropped from final answers: send it only once text follows.
    return text.strip()


def render(text: str, thinking: bool, stops: tuple[str, ...] = (), final: bool = True) -> Rendered:
    """Split decoded output into reasoning and answer; partial renders hold back undecided text."""
    if not final:
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
    reasoning = ""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        # Reasoning only ever opens the output; a stray </think> later is just a marker.
        reasoning, closed, answer = body[len(THINK_OPEN) :].partition(THINK_CLOSE)
        if not closed:
            return Rendered(_hold(reasoning, (THINK_CLOSE,), final) if thinking else "", "")
    elif not final and body and THINK_OPEN.startswith(body):
        return Rendered("", "")  # could still become "<think>"
    else:
        answer = text
    # Until none is left: taking one marker out can join the pieces of another around it.
    while any(marker in answer for marker in MARKERS):
        for marker in MARKERS:
            answer = answer.replace(marker, "")
    stopped = False
    for stop in stops:
        at = answer.find(stop)
        if at >= 0:
            answer, stopped = answer[:at], True
    if stopped:
        final = True
    answer = _hold(answer, (*MARKERS, *stops), final)
    return Rendered(reasoning.strip() if thinking else "", answer, stopped)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """Split complete output into (reasoning, answer); reasoning is None when thinking is off."""
    rendered = render(text, thinking)
    return (rendered.reasoning if thinking else None), rendered.answer
