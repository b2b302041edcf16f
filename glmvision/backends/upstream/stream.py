"""One generation answered by the upstream engine, with GenerationStream's consumer API."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from glmvision.backends.upstream.client import completion_event, sse_events, upstream_down
from glmvision.core.errors import APIError, out_of_time
from glmvision.core.generation import Delta, Generation, GenerationParams, ToolCall
from glmvision.postprocess.output import THINK_CLOSE, THINK_OPEN
from glmvision.postprocess.pipeline import Piece, text_pipeline
from glmvision.postprocess.stream import DEADLINE_GRACE
from glmvision.postprocess.tools import new_call_id

log = logging.getLogger("glmvision")
# Seconds the stream still reads, after our stop string ended the answer, for the upstream's usage
# (it was sent the stop strings too, so it normally ends at once).
USAGE_WAIT = 2.0


class UpstreamStream:
    """Iterate for deltas as the upstream's chunks arrive; `result` holds the whole answer at the end."""

    def __init__(
        self,
        response: requests.Response,
        params: GenerationParams,
        deadline: float,
        on_end: Callable[[], None],
        on_error: Callable[[APIError], APIError] = lambda error: error,
        queued_at: float | None = None,
        streamed: bool = True,
        sent_at: float | None = None,
    ) -> None:
        self._response = response
        self._streamed = streamed  # else the response holds the whole completion, already read
        self._params = params
        self._give_up_at = deadline + DEADLINE_GRACE
        self._on_end = on_end
        self._on_error = on_error
        self._post = text_pipeline(params.enable_thinking, params.stop).stream()
        self._text = ""  # the upstream's output as raw text, its reasoning_content inside <think> tags
        self._phase = "head"  # then "reasoning" (reasoning_content seen) or "answer"
        self._pieces = 0
        self._usage: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, str]] = {}  # the upstream's own parsed tool calls, by index
        self._upstream_finish: str | None = None
        self._done = False
        self.prompt_tokens = 0
        self.token_ids: list[int] = []  # the upstream sends text, not ids
        self.finish_reason: str | None = None
        self.result: Generation | None = None
        self.cancelled = False
        self.queued_at = time.monotonic() if queued_at is None else queued_at
        # When the upstream took the request: a stream's headers come then, a whole answer's at its end.
        self.started_at: float | None = time.monotonic() if streamed or sent_at is None else sent_at
        self.first_token_at: float | None = None
        self.ended_at: float | None = None

    def close(self) -> None:
        """Stop reading: the upstream sees the connection close and stops generating."""
        if self.result is None and not self.cancelled:
            self.cancelled = True
            log.info("upstream generation cancelled after %d chunks", self._pieces)
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.ended_at = self.ended_at or time.monotonic()
        self._response.close()
        self._on_end()

    def __iter__(self) -> Iterator[Delta]:
        try:
            yield from self._deltas(lambda: False)
        finally:
            self.close()

    def whole(self, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """Read the whole answer (no deltas); stop early if the client leaves."""
        try:
            for _ in self._deltas(client_gone):
                pass
        finally:
            self.close()
        assert self.result is not None
        return self.result

    def _deltas(self, client_gone: Callable[[], bool]) -> Iterator[Delta]:
        try:
            yield from self._read(client_gone)
        except APIError as exc:
            self._finish()
            raise self._on_error(exc) from None
        rest = self._post.finish()
        if rest.reasoning or rest.content:
            yield Delta(rest.reasoning, rest.content)
        final = self._post.result
        if self.finish_reason is None:
            self.finish_reason = "length" if self._upstream_finish == "length" else "stop"
        usage = self._usage or {}
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        # Without usage (an upstream that ignores stream_options), count its content chunks instead.
        completion = usage.get("completion_tokens")
        self.result = Generation(
            final.content,
            final.reasoning if self._params.enable_thinking else None,
            self.prompt_tokens,
            int(completion) if completion is not None else self._pieces,
            self.finish_reason,
            tuple(
                ToolCall(call["id"] or new_call_id(), call["name"], call["arguments"] or "{}")
                for _, call in sorted(self._calls.items())
                if call["name"]
            ),
            cached_tokens=_detail(usage, "cached_tokens"),
            image_tokens=_detail(usage, "image_tokens"),
        )
        self._finish()

    def _read(self, client_gone: Callable[[], bool]) -> Iterator[Delta]:
        finished = False
        stopped_at: float | None = None  # when our stop string ended the answer
        events = sse_events(self._response) if self._streamed else iter([completion_event(self._response)])
        for event in events:
            if "error" in event and not event.get("choices"):
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else str(error)
                raise upstream_down(f"The upstream engine failed mid-answer: {message}")
            if isinstance(event.get("usage"), dict):
                self._usage = event["usage"]
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                # vLLM's newer releases call the field `reasoning`.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                self._take_calls(delta.get("tool_calls"))
                piece = self._piece(reasoning, delta.get("content") or "")
                if piece and stopped_at is None:
                    self._pieces += 1
                    self.first_token_at = self.first_token_at or time.monotonic()
                    visible = self._take(piece)
                    if self._post.stopped:
                        self.finish_reason, stopped_at = "stop", time.monotonic()
                    if visible.reasoning or visible.content:
                        yield visible
                if choice.get("finish_reason"):
                    self._upstream_finish = str(choice["finish_reason"])
                    finished = True
            if client_gone():
                self.close()
                return
            if stopped_at is not None and time.monotonic() - stopped_at > USAGE_WAIT:
                return  # our stop string ended it and the upstream goes on: close() tells it to stop
            if time.monotonic() > self._give_up_at:
                log.error(
                    "the upstream is still answering %.0fs past the deadline: giving up", DEADLINE_GRACE
                )
                if not self._text:
                    raise out_of_time()
                self.finish_reason = "length"
                return
        if not finished and stopped_at is None:
            raise upstream_down("The upstream engine ended the answer without finishing it.")

    def _take_calls(self, calls: Any) -> None:
        """Add an event's tool calls: whole ones (an answer), or OpenAI's pieces by index (a stream)."""
        if not isinstance(calls, list):
            return
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            index = call.get("index", position)
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            known = self._calls.setdefault(
                int(index) if isinstance(index, int) else position, {"id": "", "name": "", "arguments": ""}
            )
            if isinstance(call.get("id"), str):
                known["id"] = known["id"] or call["id"]
            if isinstance(function.get("name"), str):
                known["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                known["arguments"] += function["arguments"]

    def _piece(self, reasoning: str, content: str) -> str:
        """Raw text for a chunk: reasoning_content goes inside <think> tags, as the model writes it."""
        piece = ""
        if reasoning:
            if self._phase == "head":
                piece, self._phase = THINK_OPEN, "reasoning"
            piece += reasoning
        if content:
            if self._phase == "reasoning":
                piece += THINK_CLOSE
            self._phase = "answer"
            piece += content
        return piece

    def _take(self, piece: str) -> Delta:
        self._text += piece
        visible = self._post.feed(Piece(content=piece))
        return Delta(visible.reasoning, visible.content)


def _detail(usage: dict[str, Any], name: str) -> int | None:
    """One count of the upstream's usage.prompt_tokens_details (vLLM and SGLang report cached_tokens;
    glmvision image_tokens too), else None."""
    details = usage.get("prompt_tokens_details")
    count = details.get(name) if isinstance(details, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
