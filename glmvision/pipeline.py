"""The request pipeline every endpoint shares: parse -> images -> model -> encode.

Endpoints only translate their wire format into a `ChatInput` and a result back; validation of
prompts and limits, image handling and generation all live here.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request
from .generation import Delta, Generation, GenerationParams, GenerationStream
from .images import DecodedImage, Fit, decode_image, open_image
from .model import ModelHolder
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


def check_prompt(prompt: str, settings: Mapping[str, Any], param: str = "prompt") -> str:
    """Refuse empty or over-long prompts."""
    if not prompt.strip():
        raise bad_request("invalid_value", f"Field {param!r} must not be empty.", param)
    limit = settings["GLMVISION_MAX_PROMPT_CHARS"]
    if len(prompt) > limit:
        raise bad_request(
            "prompt_too_long", f"Field {param!r} has {len(prompt)} characters; at most {limit}.", param
        )
    return prompt


def generation_params(
    settings: Mapping[str, Any],
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
    cap = settings["GLMVISION_MAX_NEW_TOKENS"]
    if max_new_tokens is None:
        max_new_tokens = min(settings["GLMVISION_DEFAULT_MAX_NEW_TOKENS"], cap)
    elif max_new_tokens > cap:
        raise bad_request("invalid_value", f"Field {param!r} may be at most {cap}.", param)
    temperature = 0.7 if temperature is None else temperature
    return GenerationParams(max_new_tokens, temperature, top_p, seed, enable_thinking, stop, min_new_tokens)


def load_image(
    ref: ImageRef, settings: Mapping[str, Any], policy: FetchPolicy, fit: Fit | None = None
) -> DecodedImage:
    """Decode one image from base64/data URL, or fetch it from an allowed http(s) URL."""
    limits = {
        "max_side": settings["GLMVISION_MAX_IMAGE_SIDE"],
        "max_pixels": settings["GLMVISION_MAX_IMAGE_PIXELS"],
    }
    if is_url(ref.source):
        raw = fetch_image(ref.source, policy, ref.param)
        return open_image(raw, param=ref.param, fit=fit, **limits)
    return decode_image(ref.source, param=ref.param, fit=fit, **limits)


def load_turns(
    turns: list[Turn], settings: Mapping[str, Any], policy: FetchPolicy, fit: Fit | None = None
) -> list[Turn]:
    """Check the image count, then decode every image in the conversation (in order)."""
    refs = [part for turn in turns for part in turn.parts if isinstance(part, ImageRef)]
    limit = settings["GLMVISION_MAX_IMAGES"]
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

    def deltas(self, settings: Mapping[str, Any]) -> Iterator[Delta]:
        """Yield deltas as they are generated; log the outcome once done."""
        yield from self.stream
        _log_generation(self.result, time.perf_counter() - self.started, settings)

    def finish(self, settings: Mapping[str, Any]) -> Generation:
        """Wait for the whole answer."""
        result = self.stream.whole()
        _log_generation(result, time.perf_counter() - self.started, settings)
        return result

    @property
    def result(self) -> Generation:
        assert self.stream.result is not None, "the stream has not ended"
        return self.stream.result


def answer(
    holder: ModelHolder,
    turns: list[Turn],
    params: GenerationParams,
    settings: Mapping[str, Any],
    policy: FetchPolicy,
) -> tuple[ChatInput, Answer]:
    """Decode the images, load the model if needed, prepare the inputs and queue the generation."""
    arrived = time.monotonic()
    with holder.arriving():
        # Once the model is known, images go straight to the size its processor wants.
        fit = holder.loaded.fit_image if holder.loaded is not None else None
        chat = ChatInput(load_turns(turns, settings, policy, fit), params)
        model = holder.get()
        if settings["GLMVISION_LOG_CONTENT"]:
            texts = [(turn.role, part) for turn in chat.turns for part in turn.parts if isinstance(part, str)]
            log.info("prompt=%r", texts)
        inputs = model.prepare(to_messages(chat.turns), params.enable_thinking)
        stream = model.stream(inputs, params, arrived)
    return chat, Answer(model.model_id, stream, time.perf_counter())


def _log_generation(generation: Generation, elapsed: float, settings: Mapping[str, Any]) -> None:
    if settings["GLMVISION_LOG_CONTENT"]:
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


def usage(generation: Generation) -> dict[str, int]:
    """Return token accounting in the OpenAI shape."""
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
