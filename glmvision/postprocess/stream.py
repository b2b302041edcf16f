"""One generation as its request sees it: tokens arrive from the engine and become answer deltas."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

from glmvision.core.errors import APIError, out_of_time, row_failed
from glmvision.core.generation import Delta, Generation, GenerationParams, RawLogprob, TokenLogprob
from glmvision.postprocess.pipeline import Piece, text_pipeline

log = logging.getLogger("glmvision")
_END = object()


class FixedStream:
    """An answer known before any model call (a cache hit, the fallback message): one delta, then done."""

    queued_at = started_at = first_token_at = ended_at = None
    cancelled = False

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self.prompt_tokens = generation.prompt_tokens
        self.token_ids: list[int] = []
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Delta]:
        text, reasoning = self._generation.text, self._generation.reasoning or ""
        self.result = self._generation
        if text or reasoning:
            yield Delta(reasoning, text)

    def whole(self, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """The answer, at once."""
        self.result = self._generation
        return self._generation

    def close(self) -> None:
        """Nothing to stop."""


class Decoder(Protocol):
    """What a stream needs from the model: its stop ids and a decoder of generated ids."""

    stop_ids: list[int]

    def decode(self, token_ids: list[int]) -> str: ...


class Detokenizer(Protocol):
    """Turns ids arriving a few at a time into the text they add."""

    def push(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class IncrementalDecoder:
    """Decodes only a short window of ids per push, so a token costs the same at any length."""

    # The window starts a few tokens back (prefix) because a token's text can depend on the
    # tokens before it (a leading space, bytes of one character split over tokens); its text
    # past the previous decoding (read) is new. Text ending in U+FFFD may be a character whose
    # remaining bytes are still to come: it waits, and flush() gives whatever is left at the end.

    def __init__(self, decoder: Decoder) -> None:
        self._decode = decoder.decode
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._prefix_text = ""

    def push(self, token_ids: list[int]) -> str:
        """Add ids; return the text they complete (possibly none yet)."""
        self._ids.extend(token_ids)
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return new

    def flush(self) -> str:
        """The text still held back; call once, when no more ids will come."""
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        new, self._prefix_text = text[len(self._prefix_text) :], ""
        return new


# How long past its deadline a request thread still waits for the engine to end its row (a stuck
# model thread must not hold request threads forever).
DEADLINE_GRACE = 10.0
# How often a request thread waiting for a whole answer checks that its client is still there.
CLIENT_CHECK_INTERVAL = 0.25


class GenerationStream:
    """Iterate for deltas as tokens arrive; `result` holds the whole answer once iteration ends."""

    detokenizer: ClassVar[Callable[[Decoder], Detokenizer]] = IncrementalDecoder

    def __init__(
        self, decoder: Decoder, prompt_tokens: int, params: GenerationParams, deadline: float = math.inf
    ) -> None:
        self._decoder = decoder
        self._params = params
        self._give_up_at = deadline + DEADLINE_GRACE
        self._client_gone: Callable[[], bool] = lambda: False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._ended = threading.Event()
        self._ids: list[int] = []
        # Asked for: the engine's log-probabilities, one per id (put before its id), and those turned
        # into tokens' text so far; the ones the next delta carries; each token id's text and bytes.
        self._arrived_logprobs: list[RawLogprob] = []
        self._logprobs: list[TokenLogprob] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._token_texts: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._detokenizer = self.detokenizer(decoder)
        self._post = text_pipeline(params.enable_thinking, params.stop).stream()
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # prompt tokens whose KV the engine reused (set before the first token)
        self.image_tokens = 0  # prompt tokens that stand for images
        self.finish_reason: str | None = None
        self.result: Generation | None = None
        # Monotonic times the engine marks, for the request log and metrics.
        self.queued_at = time.monotonic()
        self.started_at: float | None = None  # its first model call (prefill) began
        self.first_token_at: float | None = None
        self.ended_at: float | None = None

    # The producer side, called by the engine's model thread.

    def start(self) -> None:
        """The engine begins this request's first model call (the queue wait ends)."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def put(self, token_ids: list[int], logprobs: list[RawLogprob] | None = None) -> None:
        """Hand over newly generated token ids (and their log-probabilities, one each, when asked)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if logprobs:
            self._arrived_logprobs.extend(logprobs)  # before the ids: the reader finds them there
        self._queue.put(token_ids)

    def fail(self, error: Exception) -> None:
        """End the stream with an error the consumer raises (e.g. out of memory, timeout)."""
        self.ended_at = self.ended_at or time.monotonic()
        self._queue.put(error)
        self._ended.set()

    def end(self) -> None:
        """No more tokens will come."""
        self.ended_at = self.ended_at or time.monotonic()
        self._queue.put(_END)
        self._ended.set()

    @property
    def cancelled(self) -> bool:
        """True once the consumer no longer wants tokens (client gone, stop string seen)."""
        return self._cancelled.is_set()

    # The consumer side, in the request's thread.

    @property
    def token_ids(self) -> list[int]:
        """The ids generated for this request so far (its stop token included)."""
        return list(self._ids)

    def close(self) -> None:
        """Stop generating (e.g. the client went away); the model is free again within a step."""
        if self.result is None and not self._cancelled.is_set():
            self._cancelled.set()
            log.info("generation cancelled after %d tokens", len(self._ids))

    def __iter__(self) -> Iterator[Delta]:
        try:
            yield from self._deltas(patient=False)
        finally:
            self.close()

    def whole(self, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """Wait for and return the whole answer (no deltas); stop generating if the client leaves."""
        self._client_gone = client_gone
        try:
            for _ in self._deltas(patient=not self._params.stop):
                pass
        finally:
            self.close()
        assert self.result is not None
        return self.result

    def _get(self) -> Any:
        """The next queue item, waiting at most until the deadline's grace runs out."""
        while True:
            remaining = self._give_up_at - time.monotonic()
            try:
                return self._queue.get(timeout=max(0.0, min(remaining, CLIENT_CHECK_INTERVAL)))
            except queue.Empty:
                pass
            if not self._keep_waiting():
                self._cancelled.set()
                log.error("no word from the engine %.0fs past the deadline: giving up", DEADLINE_GRACE)
                if self._ids:
                    return _END  # what was generated is the answer, cut for length
                return out_of_time()

    def _keep_waiting(self) -> bool:
        """Between waits: stop generating for a client that left; False once the deadline's grace is over."""
        if self._client_gone():
            self.close()  # the engine drops the row within a step and ends the stream
        return time.monotonic() < self._give_up_at

    def _batches(self) -> Iterator[Any]:
        """Queue items, with token lists that are already waiting merged into one."""
        item = self._get()
        while item is not _END:
            if not isinstance(item, list):
                yield item
                item = self._get()
                continue
            tokens = list(item)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
                if not isinstance(item, list):
                    break
                tokens.extend(item)
            yield tokens
            if item is None:
                item = self._get()

    def _deltas(self, patient: bool) -> Iterator[Delta]:
        """The answer's deltas; a failure turning its tokens into text is this request's 503 row_failed
        (its row stops within a step: the caller closes the stream), never a 500."""
        try:
            yield from self._decoded(patient)
        except APIError:
            raise
        except Exception as exc:
            log.exception("turning a row's tokens into text failed: that request alone fails")
            raise row_failed() from exc

    def _decoded(self, patient: bool) -> Iterator[Delta]:
        if patient:
            # Nobody reads deltas and no stop string can end the answer early from our side: let
            # tokens pile up rather than waking this thread (and taking the GIL) once per token.
            while not self._ended.wait(CLIENT_CHECK_INTERVAL) and self._keep_waiting():
                pass  # past the grace, _get() below reports it
        for item in self._batches():
            if isinstance(item, BaseException):
                raise item
            if self.finish_reason is not None:
                continue  # generate() is winding down after a stop: its last tokens are not ours
            delta = self._feed(item)
            if self._post.stopped:
                self.finish_reason = "stop"
                self._cancelled.set()
            if delta.reasoning or delta.content or delta.logprobs:
                yield delta
        self.finish_reason = self.finish_reason or "length"
        rest = self._post.finish(Piece(content=self._detokenizer.flush()))
        if rest.reasoning or rest.content:
            yield Delta(rest.reasoning, rest.content)
        final = self._post.result
        self.result = Generation(
            final.content,
            final.reasoning if self._params.enable_thinking else None,
            self.prompt_tokens,
            len(self._ids),
            self.finish_reason,
            cached_tokens=self.cached_tokens,
            image_tokens=self.image_tokens,
            logprobs=tuple(self._logprobs) if self._params.logprobs is not None else None,
        )

    def _feed(self, token_ids: list[int]) -> Delta:
        """Take ids in; the text they make visible (rendering only new text, so cheap at any length)."""
        stop_ids = self._decoder.stop_ids
        reasoning = content = ""
        fresh: list[int] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            if token_id in stop_ids:
                self.finish_reason = "stop"  # the stop token itself is not text
                break
            if self._params.logprobs is not None:
                self._note_logprob(token_id)
            if self._params.stop:
                # Check after every token, so the count is the same however tokens were grouped.
                more_reasoning, more_content = self._take_text(self._detokenizer.push([token_id]))
                reasoning, content = reasoning + more_reasoning, content + more_content
                if self._post.stopped:
                    return Delta(reasoning, content, self._take_logprobs())
            else:
                fresh.append(token_id)
        if fresh:
            more_reasoning, more_content = self._take_text(self._detokenizer.push(fresh))
            reasoning, content = reasoning + more_reasoning, content + more_content
        return Delta(reasoning, content, self._take_logprobs())

    def _note_logprob(self, token_id: int) -> None:
        """The log-probability of the token just taken (the engine put it before its id)."""
        index = len(self._ids) - 1
        if index >= len(self._arrived_logprobs):
            return  # none came (an engine that cannot give them refuses the request beforehand)
        logprob, alternatives = self._arrived_logprobs[index]
        top = tuple(TokenLogprob(*self._token_text(other), value) for other, value in alternatives)
        entry = TokenLogprob(*self._token_text(token_id), logprob, top)
        self._logprobs.append(entry)
        self._pending_logprobs.append(entry)

    def _token_text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """One token's text on its own and its UTF-8 bytes, as OpenAI's logprobs give them."""
        known = self._token_texts.get(token_id)
        if known is None:
            token_bytes = getattr(self._decoder, "token_bytes", None)
            raw = token_bytes(token_id) if token_bytes is not None else None
            text = self._decoder.decode([token_id])
            known = (text, tuple(raw if raw is not None else text.encode()))
            self._token_texts[token_id] = known
        return known

    def _take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken = tuple(self._pending_logprobs)
        self._pending_logprobs.clear()
        return taken

    def _take_text(self, piece: str) -> tuple[str, str]:
        if not piece:
            return "", ""
        visible = self._post.feed(Piece(content=piece))
        return visible.reasoning, visible.content
