"""The request pipeline every endpoint shares: parse -> images -> model -> encode."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import bad_request
from .images import DecodedImage, decode_image
from .model import Generation, GenerationParams, ModelHolder

log = logging.getLogger("glmvision")


@dataclass(frozen=True)
class ChatInput:
    """A validated request: decoded images, the prompt and how to sample."""

    images: list[DecodedImage]
    prompt: str
    params: GenerationParams


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
    temperature: float,
    top_p: float | None,
    seed: int | None,
    enable_thinking: bool,
    param: str = "max_new_tokens",
) -> GenerationParams:
    """Apply the server's token cap and defaults to a request's sampling settings."""
    cap = settings["GLMVISION_MAX_NEW_TOKENS"]
    if max_new_tokens is None:
        max_new_tokens = min(settings["GLMVISION_DEFAULT_MAX_NEW_TOKENS"], cap)
    elif max_new_tokens > cap:
        raise bad_request("invalid_value", f"Field {param!r} may be at most {cap}.", param)
    return GenerationParams(max_new_tokens, temperature, top_p, seed, enable_thinking)


def load_images(sources: list[tuple[str, str]], settings: Mapping[str, Any]) -> list[DecodedImage]:
    """Decode (param, base64 string) pairs into bounded RGB images."""
    return [
        decode_image(
            data,
            max_side=settings["GLMVISION_MAX_IMAGE_SIDE"],
            max_pixels=settings["GLMVISION_MAX_IMAGE_PIXELS"],
            param=param,
        )
        for param, data in sources
    ]


def run(holder: ModelHolder, chat: ChatInput, settings: Mapping[str, Any]) -> Generation:
    """Load (if needed) the model, prepare inputs and generate one answer."""
    model = holder.get()
    started = time.perf_counter()
    inputs = model.prepare([image.image for image in chat.images], chat.prompt, chat.params.enable_thinking)
    generation = model.generate(inputs, chat.params)
    elapsed = time.perf_counter() - started
    if settings["GLMVISION_LOG_CONTENT"]:
        log.info("prompt=%r answer=%r", chat.prompt, generation.text)
    log.info(
        "generated prompt_tokens=%d completion_tokens=%d finish=%s in %.3fs",
        generation.prompt_tokens,
        generation.completion_tokens,
        generation.finish_reason,
        elapsed,
    )
    return generation


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
