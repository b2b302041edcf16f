"""The request pipeline every endpoint shares: parse -> images -> model -> encode.

Endpoints only translate their wire format into a `ChatInput` and a result back; validation of
prompts and limits, image handling and generation all live here.
"""

from __future__ import annotations

import logging
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, Ticket
from .config import Settings
from .errors import bad_request
from .generation import DEFAULT_TEMPERATURE, Delta, Generation, GenerationParams, GenerationStream
from .images import DecodedImage, Fit, decode_image, open_image
from .responses import Usage
from .urlfetch import FetchPolicy, fetch_image, is_url

log = logging.getLogger("glmvision")


@dataclass(frozen=True)
class ImageRef:
    """An image as the client sent it: base64, a data URL or an http(s) URL, and where."""

    source: str
    param: str


@dataclass(frozen=True)
class Turn:
    """One chat message: a role and its parts (text, or images once loaded)."""

    role: str
    parts: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ChatInput:
    """A validated request: the conversation with decoded images, and how to sample."""

    turns: list[Turn]
    params: GenerationParams

    @property
    def images(self) -> list[DecodedImage]:
        return [part for turn in self.turns for part in turn.parts if isinstance(part, DecodedImage)]


def check_prompt_length(characters: int, settings: Settings, param: str) -> None:
    """Refuse prompts (all text of a request together) over GLMVISION_MAX_PROMPT_CHARS."""
    limit = settings.max_prompt_chars
    if characters > limit:
        raise bad_request(
            "prompt_too_long", f"Field {param!r} holds {characters} characters; at most {limit}.", param
        )


def check_prompt(prompt: str, settings: Settings, param: str = "prompt") -> str:
    """Refuse empty or over-long prompts."""
    if not prompt.strip():
        raise bad_request("invalid_value", f"Field {param!r} must not be empty.", param)
    check_prompt_length(len(prompt), settings, param)
    return prompt


def generation_params(
    settings: Settings,
    *,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None = None,
    seed: int | None = None,
    enable_thinking: bool = False,
    stop: tuple[str, ...] = (),
    min_new_tokens: int = 0,
    param: str = "max_new_tokens",
) -> GenerationParams:
    """Apply the server's token cap and defaults to a request's sampling settings."""
    cap = settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(settings.default_max_new_tokens, cap)
    elif max_new_tokens > cap:
        raise bad_request("invalid_value", f"Field {param!r} may be at most {cap}.", param)
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    return GenerationParams(max_new_tokens, temperature, top_p, seed, enable_thinking, stop, min_new_tokens)


def load_image(
    ref: ImageRef, settings: Settings, policy: FetchPolicy, fit: Fit | None = None
) -> DecodedImage:
    """Decode one image from base64/data URL, or fetch it from an allowed http(s) URL."""
    limits = {"max_side": settings.max_image_side, "max_pixels": settings.max_image_pixels}
    if is_url(ref.source):
        raw = fetch_image(ref.source, policy, ref.param)
        return open_image(raw, param=ref.param, fit=fit, **limits)
    return decode_image(ref.source, param=ref.param, fit=fit, **limits)


def load_turns(
    turns: list[Turn], settings: Settings, policy: FetchPolicy, fit: Fit | None = None
) -> list[Turn]:
    """Check the image count, then decode every image in the conversation (in order)."""
    refs = [part for turn in turns for part in turn.parts if isinstance(part, ImageRef)]
    limit = settings.max_images
    if len(refs) > limit:
        raise bad_request(
            "too_many_images",
            f"The request has {len(refs)} images; at most {limit} are accepted.",
            "messages",
        )
    return [
        Turn(
            turn.role,
            [load_image(p, settings, policy, fit) if isinstance(p, ImageRef) else p for p in turn.parts],
        )
        for turn in turns
    ]


def to_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Render turns in the processor's chat format, images as PIL images (never user strings)."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role != "user":
            messages.append({"role": turn.role, "content": "\n".join(turn.parts)})
            continue
        content = [
            {"type": "image", "image": part.image}
            if isinstance(part, DecodedImage)
            else {"type": "text", "text": part}
            for part in turn.parts
        ]
        messages.append({"role": "user", "content": content})
    return messages


@dataclass
class Answer:
    """A generation under way: the model's name, its live stream and when it began."""

    model_id: str
    stream: GenerationStream
    started: float
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # as the model sees them

    def deltas(self, settings: Settings) -> Iterator[Delta]:
        """Yield deltas as they are generated; log the outcome once done."""
        yield from self.stream
        _log_generation(self.result, time.perf_counter() - self.started, settings)

    def finish(self, settings: Settings, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """Wait for the whole answer; generation stops early if `client_gone()` turns true."""
        result = self.stream.whole(client_gone)
        _log_generation(result, time.perf_counter() - self.started, settings)
        return result

    @property
    def result(self) -> Generation:
        assert self.stream.result is not None, "the stream has not ended"
        return self.stream.result


def answer(
    backend: Backend,
    ticket: Ticket,
    turns: list[Turn],
    params: GenerationParams,
    settings: Settings,
    policy: FetchPolicy,
    image_param: str = "image",
) -> tuple[ChatInput, Answer]:
    """With the request's place taken, decode the images, prepare the inputs and queue the generation."""
    try:
        # Once the model is known, images go straight to the size its processor wants.
        chat = ChatInput(load_turns(turns, settings, policy, backend.image_fit()), params)
        if settings.log_content:
            texts = [(t.role, part) for t in chat.turns for part in t.parts if isinstance(part, str)]
            log.info("prompt=%r", texts)
        prepared = backend.prepare(to_messages(chat.turns), params, ticket, image_param)
        stream = backend.submit(prepared, params, ticket)
    except BaseException:
        ticket.release()
        raise
    return chat, Answer(prepared.model_id, stream, time.perf_counter(), prepared.image_sizes)


def _log_generation(generation: Generation, elapsed: float, settings: Settings) -> None:
    if settings.log_content:
        log.info("answer=%r reasoning=%r", generation.text, generation.reasoning)
    log.info(
        "generated prompt_tokens=%d completion_tokens=%d finish=%s in %.3fs",
        generation.prompt_tokens,
        generation.completion_tokens,
        generation.finish_reason,
        elapsed,
    )


def new_request_id(prefix: str) -> str:
    """Return a fresh response id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(generation: Generation) -> Usage:
    """Return token accounting in the OpenAI shape."""
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
    )


def client_gone_check(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check that the client of this WSGI request hung up (gunicorn exposes its socket)."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return lambda: False  # another server (or Flask's test client): cannot tell

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # The body was read already: a readable socket with nothing to read is a closed one.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone
