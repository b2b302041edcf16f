"""Native HTTP endpoints: health probes, the model list, /v1/chat/vision and /v1/chat."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify, request
from flask.wrappers import Response

from glmvision.core.errors import APIError
from glmvision.core.generation import Generation
from glmvision.core.lora import check_adapter, model_name
from glmvision.core.responses import (
    Health,
    ImageSize,
    ModelCard,
    ModelList,
    Readiness,
    SeedChatResponse,
    VisionResponse,
)
from glmvision.serving.context import RequestContext, admit, new_context
from glmvision.serving.pipeline import (
    Answer,
    ChatInput,
    ImageRef,
    Turn,
    VideoRef,
    answer,
    boxes_of,
    new_request_id,
    usage,
)
from glmvision.web.errors import note_code
from glmvision.web.native.protocol import NativeRequest, SeedChatRequest, VisionRequest
from glmvision.web.protocol import parse_body
from glmvision.web.route_table import route
from glmvision.web.state import service

bp = Blueprint("api", __name__)


@route(bp, "api.healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify(Health().to_json())


@route(bp, "api.health")
def health() -> Response:
    """Liveness under vLLM's path: the same answer as /healthz."""
    return healthz()


@route(bp, "api.readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    """Readiness: 200 once this worker's model is loaded and its engine healthy, 503 otherwise."""
    ready, details = service().backend.health().readiness()
    body = Readiness(ready=ready, **details).to_json()
    if ready:
        return jsonify(body)
    # The metrics' and the request log's code for this 503 (else "none").
    note_code("model_loading" if details["status"] in ("loading", "not_loaded") else "model_unavailable")
    return jsonify(body), 503, {"Retry-After": "5"}


def _model_cards() -> list[ModelCard]:
    """The served model, then one card per LoRA adapter."""
    state = service()
    capabilities = state.backend.capabilities()
    base = {**capabilities.model.as_dict(), "ready": state.backend.health().gauges.loaded}
    cards = [ModelCard(**base, created=int(state.started), owned_by="glmvision")]
    cards += [
        ModelCard(
            **{**base, "id": model_name(base["id"], adapter)},
            parent=base["id"],
            created=int(state.started),
            owned_by="glmvision",
        )
        for adapter in capabilities.adapters or ()
    ]
    return cards


@route(bp, "api.list_models")
def list_models() -> Response:
    """The served model, in OpenAI's list shape, with device details once loaded."""
    return jsonify(ModelList(data=_model_cards()).to_json())


@route(bp, "api.retrieve_model")
def retrieve_model(model_id: str) -> Response:
    """One entry of the model list by its id, an alias's or `<alias>:<adapter>` (named as asked)."""
    capabilities = service().backend.capabilities()
    cards = _model_cards()
    # An alias names the served model: `<alias>` and `<alias>:<adapter>` are its cards under that name.
    for name in capabilities.model_names:
        for card in cards:
            suffix = card.id[len(cards[0].id) :]
            if model_id == name + suffix:
                return jsonify(card.model_copy(update={"id": model_id}).to_json())
    served = ", ".join(card.id for card in cards)
    message = f"The model {model_id!r} does not exist; this server serves: {served}."
    raise APIError(404, "model_not_found", message, "model")


def _answer_one_image(
    context: RequestContext, image: ImageRef | VideoRef, body: NativeRequest
) -> tuple[ChatInput, Answer, Generation]:
    state = context.service
    adapter = check_adapter(body.adapter, state.backend.capabilities().adapters)
    params = body.to_generation_params(state.settings, adapter)
    chat, generation = answer(context, [Turn("user", [image, body.prompt])], params, image.param)
    return chat, generation, generation.finish(state.settings, context.client_gone)


def _native_fields(
    context: RequestContext, prefix: str, model_id: str, result: Generation, thinking: bool
) -> dict[str, Any]:
    """The fields every native answer shares."""
    return {
        "id": new_request_id(prefix),
        "created": int(time.time()),
        "model": model_id,
        "finish_reason": result.finish_reason,
        "usage": usage(result),
        "reasoning": (result.reasoning or "") if thinking else None,
        "degraded": True if context.degraded else None,
        "logprobs": None if result.logprobs is None else [token.to_json() for token in result.logprobs],
    }


@route(bp, "api.chat_vision")
def chat_vision() -> Response:
    """Answer one question about one image."""
    context = new_context(service())
    admit(context)
    # Exactly one of image and image_url: the model checks.
    body = parse_body(request, VisionRequest, context.settings.max_json_depth)
    if body.video is not None:
        return _answer_video(context, body)
    chat, generation, result = _answer_one_image(
        context, ImageRef(*body.image_source, body.pixel_budget), body
    )
    decoded = chat.images[0]
    sent = generation.image_sizes[0] if generation.image_sizes else decoded.resized_to
    answer = VisionResponse(
        result=result.text,
        **_native_fields(context, "vision", generation.model_id, result, body.enable_thinking),
        boxes=boxes_of(chat, result.text),
        image=ImageSize(width=decoded.width, height=decoded.height, resized_to=list(sent)),
    )
    return jsonify(answer.to_json())


def _answer_video(context: RequestContext, body: VisionRequest) -> Response:
    """Answer one question about one video; `image` gives its frames' size, as decoded and as sampled."""
    assert body.video is not None
    chat, generation, result = _answer_one_image(context, VideoRef(body.video, "video"), body)
    video = chat.videos[0]
    frames = video.frames.shape
    answer = VisionResponse(
        result=result.text,
        **_native_fields(context, "vision", generation.model_id, result, body.enable_thinking),
        image=ImageSize(width=video.width, height=video.height, resized_to=[frames[2], frames[1]]),
    )
    return jsonify(answer.to_json())


@route(bp, "api.chat_seed")
def chat_seed() -> Response:
    """The reference guides' shape: {"image_url", "prompt"} -> {"response"}."""
    context = new_context(service())
    admit(context)
    body = parse_body(request, SeedChatRequest, context.settings.max_json_depth)
    chat, generation, result = _answer_one_image(context, ImageRef(body.image_url, "image_url"), body)
    fields = _native_fields(context, "chat", generation.model_id, result, body.enable_thinking)
    answer = SeedChatResponse(response=result.text, boxes=boxes_of(chat, result.text) or None, **fields)
    return jsonify(answer.to_json())
