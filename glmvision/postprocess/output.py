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


def _without_markers(text: str) -> str:
    # Until none is left: taking one marker out can join the pieces of another around it.
    while any(marker in text for marker in MARKERS):
        for marker in MARKERS:
            text = text.replace(marker, "")
    return text


def _held_end(text: str, needles: tuple[str, ...], start: int) -> int:
    """Where `_hold` would cut `text` before stripping, looking no further back than `start`."""
    end = len(text)
    while end > start:
        held = 0
        for needle in needles:
            for size in range(min(len(needle) - 1, end - start), held, -1):
                if text.endswith(needle[:size], start, end):
                    held = size
                    break
        if not held:
            break
        end -= held
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


class StreamRenderer:
    """Renders text arriving in pieces as `render(text, final=False)` does, re-reading only its tail."""

    # Markers cannot overlap one another, so once the settled answer does not end with the start
    # of one, what follows never changes it: only the unsettled tail, the unsent text and the last
    # few characters a stop string could start in are looked at again.

    def __init__(self, thinking: bool, stops: tuple[str, ...] = ()) -> None:
        self._thinking, self._stops = thinking, stops
        self._needles = (*MARKERS, *stops)
        self._stop_reach = max((len(stop) for stop in stops), default=1) - 1
        self._waiting = ""  # trailing U+FFFD: maybe an incomplete character
        self._phase = "head"  # then "reasoning" and/or "answer"
        self._head = ""
        self._reasoning = ""
        self._reasoning_lead: int | None = None
        self._reasoning_sent = 0
        self._clean = ""  # the answer so far without markers, settled
        self._pending = ""  # answer text after it, not settled
        self._answer_lead: int | None = None
        self._answer_sent = 0  # where the sent answer ends, in clean + pending-without-markers
        self._stop_from = 0
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, str]:
        """Add text; return the (reasoning, answer) it makes visible."""
        text = self._waiting + piece
        self._waiting = text[len(text.rstrip("\ufffd")) :]
        text = text[: len(text) - len(self._waiting)]
        if self.stopped or not text:
            return "", ""
        if self._phase == "head":
            return self._feed_head(text)
        if self._phase == "reasoning":
            return self._feed_reasoning(text)
        return "", self._feed_answer(text)

    def _feed_head(self, text: str) -> tuple[str, str]:
        self._head += text
        body = self._head.lstrip()
        if body.startswith(THINK_OPEN):
            self._phase = "reasoning"
            return self._feed_reasoning(body[len(THINK_OPEN) :])
        if body and THINK_OPEN.startswith(body):
            return "", ""
        if not body:
            # Only whitespace so far, which a stop string may still match.
            self.stopped = render(self._head, self._thinking, self._stops, final=False).stopped
            return "", ""
        self._phase = "answer"
        return "", self._feed_answer(self._head)

    def _feed_reasoning(self, text: str) -> tuple[str, str]:
        search_from = max(0, len(self._reasoning) - len(THINK_CLOSE) + 1)
        self._reasoning += text
        at = self._reasoning.find(THINK_CLOSE, search_from)
        if at >= 0:
            self._phase = "answer"
            visible = self._reasoning[:at].strip()
            delta = visible[self._reasoning_sent :] if self._thinking else ""
            return delta, self._feed_answer(self._reasoning[at + len(THINK_CLOSE) :])
        if not self._thinking:
            return "", ""
        if self._reasoning_lead is None:
            rest = self._reasoning.lstrip()
            if not rest:
                return "", ""
            self._reasoning_lead = len(self._reasoning) - len(rest)
        start = self._reasoning_lead + self._reasoning_sent
        end = _held_end(self._reasoning, (THINK_CLOSE,), start)
        self._reasoning_sent += max(0, end - start)
        return self._reasoning[start:end], ""

    def _feed_answer(self, text: str) -> str:
        self._pending += text
        tail = _without_markers(self._pending)
        if not _partial_suffix(tail, MARKERS):
            self._clean, self._pending, tail = self._clean + tail, "", ""
        low = 0 if self._answer_lead is None else min(self._answer_sent, self._stop_from)
        window = self._clean[low:] + tail
        end = len(window)
        for stop in self._stops:
            at = window.find(stop, max(0, self._stop_from - low), end)
            if at >= 0:
                end, self.stopped = at, True
        if self.stopped:
            while end > 0 and window[end - 1].isspace():
                end -= 1
        else:
            self._stop_from = max(self._stop_from, len(self._clean) - self._stop_reach)
        if self._answer_lead is None:
            rest = window.lstrip()
            if not rest:
                return ""
            start = lead = len(window) - len(rest)
            if not self.stopped:
                # A stop string may begin with the leading whitespace: look back to the start.
                end = _held_end(window, self._needles, 0)
        else:
            start = self._answer_sent - low
            if not self.stopped:
                end = _held_end(window, self._needles, start)
        if end <= start:
            return ""
        if self._answer_lead is None:
            self._answer_lead = lead
        self._answer_sent = low + end
        return window[start:end]
