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


def split_thinking(text: str, thinking: bool) -> tuple[str, str]:
    """The thinking stage, whole: (visible reasoning, answer without markers, not yet stripped)."""
    reasoning = ""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        # Reasoning only ever opens the output; a stray </think> later is just a marker.
        reasoning, closed, answer = body[len(THINK_OPEN) :].partition(THINK_CLOSE)
        if not closed:
            answer = ""
    else:
        answer = text
    return reasoning.strip() if thinking else "", _without_markers(answer)


def cut_at_stops(answer: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The stop-string stage, whole: the answer before its stop string, stripped, and whether one ended it."""
    answer, stopped = _cut(answer, stops)
    return answer.strip(), stopped


def _cut(answer: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    stopped = False
    for stop in stops:
        at = answer.find(stop)
        if at >= 0:
            answer, stopped = answer[:at], True
    return answer, stopped


def render(text: str, thinking: bool, stops: tuple[str, ...] = (), final: bool = True) -> Rendered:
    """Split decoded output into reasoning and answer; partial renders hold back undecided text."""
    if final:
        reasoning, answer = split_thinking(text, thinking)
        answer, stopped = cut_at_stops(answer, stops)
        return Rendered(reasoning, answer, stopped)
    text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
    reasoning = ""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        reasoning, closed, answer = body[len(THINK_OPEN) :].partition(THINK_CLOSE)
        if not closed:
            return Rendered(_hold(reasoning, (THINK_CLOSE,), final) if thinking else "", "")
    elif body and THINK_OPEN.startswith(body):
        return Rendered("", "")  # could still become "<think>"
    else:
        answer = text
    answer, stopped = _cut(_without_markers(answer), stops)
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


class ThinkingStream:
    """The thinking stage, incremental: raw text in pieces -> new reasoning, and answer text without
    markers, split into what later text cannot change (settled) and the tail a marker may still take."""

    # Markers cannot overlap one another, so once the settled answer does not end with the start
    # of one, what follows never changes it: only the unsettled tail is looked at again.

    def __init__(self, thinking: bool) -> None:
        self._thinking = thinking
        self._waiting = ""  # trailing U+FFFD: maybe an incomplete character
        self._phase = "head"  # then "reasoning" and/or "answer"
        self._head = ""
        self._reasoning = ""
        self._reasoning_lead: int | None = None
        self._reasoning_sent = 0
        self._pending = ""  # answer text after the settled part, markers still in

    def feed(self, piece: str) -> tuple[str, str, str | None]:
        """Add raw text; return (new reasoning, newly settled answer, unsettled tail or None if no answer)."""
        text = self._waiting + piece
        self._waiting = text[len(text.rstrip("\ufffd")) :]
        text = text[: len(text) - len(self._waiting)]
        if not text:
            return "", "", None
        if self._phase == "head":
            return self._feed_head(text)
        if self._phase == "reasoning":
            return self._feed_reasoning(text)
        return "", *self._feed_answer(text)

    def _feed_head(self, text: str) -> tuple[str, str, str | None]:
        self._head += text
        body = self._head.lstrip()
        if body.startswith(THINK_OPEN):
            self._phase = "reasoning"
            return self._feed_reasoning(body[len(THINK_OPEN) :])
        if body and THINK_OPEN.startswith(body):
            return "", "", None
        if not body:
            return "", "", self._head  # only whitespace so far, which a stop string may still match
        self._phase = "answer"
        return "", *self._feed_answer(self._head)

    def _feed_reasoning(self, text: str) -> tuple[str, str, str | None]:
        search_from = max(0, len(self._reasoning) - len(THINK_CLOSE) + 1)
        self._reasoning += text
        at = self._reasoning.find(THINK_CLOSE, search_from)
        if at >= 0:
            self._phase = "answer"
            visible = self._reasoning[:at].strip()
            delta = visible[self._reasoning_sent :] if self._thinking else ""
            return delta, *self._feed_answer(self._reasoning[at + len(THINK_CLOSE) :])
        if not self._thinking:
            return "", "", None
        if self._reasoning_lead is None:
            rest = self._reasoning.lstrip()
            if not rest:
                return "", "", None
            self._reasoning_lead = len(self._reasoning) - len(rest)
        start = self._reasoning_lead + self._reasoning_sent
        end = _held_end(self._reasoning, (THINK_CLOSE,), start)
        self._reasoning_sent += max(0, end - start)
        return self._reasoning[start:end], "", None

    def _feed_answer(self, text: str) -> tuple[str, str]:
        self._pending += text
        tail = _without_markers(self._pending)
        if _partial_suffix(tail, MARKERS):
            return "", tail
        self._pending = ""
        return tail, ""


class StopStream:
    """The stop-string stage, incremental: settled answer text and its unsettled tail in -> the answer
    text that is sure to stay, holding back the start of a stop string or of a marker (`held`)."""

    def __init__(self, stops: tuple[str, ...], held: tuple[str, ...] = MARKERS) -> None:
        self._stops = stops
        self._needles = (*held, *stops)
        self._stop_reach = max((len(stop) for stop in stops), default=1) - 1
        self._clean = ""  # the settled answer so far
        self._answer_lead: int | None = None
        self._answer_sent = 0  # where the sent answer ends, in clean + tail
        self._stop_from = 0
        self.stopped = False

    def feed(self, settled: str, tail: str) -> str:
        """Add settled answer text, the unsettled tail after it; return the answer it makes visible."""
        self._clean += settled
        if self.stopped:
            return ""
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


class StreamRenderer:
    """Renders text arriving in pieces as `render(text, final=False)` does: the thinking stage's
    incremental form, then the stop-string stage's, re-reading only the tail."""

    def __init__(self, thinking: bool, stops: tuple[str, ...] = ()) -> None:
        self._split = ThinkingStream(thinking)
        self._stop = StopStream(stops)

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the answer (then nothing more is sent)."""
        return self._stop.stopped

    def feed(self, piece: str) -> tuple[str, str]:
        """Add text; return the (reasoning, answer) it makes visible."""
        if self.stopped:
            return "", ""
        reasoning, settled, tail = self._split.feed(piece)
        if tail is None and not settled:
            return reasoning, ""
        return reasoning, self._stop.feed(settled, tail or "")
