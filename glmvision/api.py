"""Native HTTP endpoints: health probes, the model list, /v1/chat/vision and /v1/chat."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify, request
from flask.wrappers import Response

from .errors import APIError, bad_request
from .generation import Generation
from .pipeline import (
    ChatInput,
    ImageRef,
    Turn,
    answer,
    check_prompt,
    client_gone_check,
    generation_params,
    new_request_id,
    usage,
)
from .schemas import SamplingFields, SeedChatRequest, VisionRequest, parse_body
from .service import service

bp = Blueprint("api", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    """Readiness: 200 once this worker's model is loaded and its engine healthy, 503 otherwise."""
    ready, details = service().backend.readiness()
    if ready:
        return jsonify({"ready": True, **details})
    return jsonify({"ready": False, **details}), 503, {"Retry-After": "5"}


@bp.get("/v1/models")
def list_models() -> Response:
    """The served model, in OpenAI's list shape, with device details once loaded."""
    state = service()
    card = state.backend.model_card()
    card.update(object="model", created=int(state.started), owned_by="glmvision")
    return jsonify({"object": "list", "data": [card]})


def _answer_one_image(
    image: ImageRef, prompt: str, body: SamplingFields
) -> tuple[ChatInput, str, Generation]:
    state = service()
    params = generation_params(
        state.settings,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        enable_thinking=body.enable_thinking,
    )
    turns = [Turn("user", [image, check_prompt(prompt, state.settings)])]
    chat, generation = answer(state.backend, turns, params, state.settings, state.fetch_policy, image.param)
    return chat, generation, generation.finish(state.settings, client_gone_check(request.environ))


def _native_tail(prefix: str, model_id: str, result: Generation, thinking: bool) -> dict[str, Any]:
    """The fields every native answer ends with."""
    tail: dict[str, Any] = {
        "id": new_request_id(prefix),
        "created": int(time.time()),
        "model": model_id,
        "finish_reason": result.finish_reason,
        "usage": usage(result),
    }
    if thinking:
        tail["reasoning"] = result.reasoning or ""
    return tail


@bp.post("/v1/chat/vision")
def chat_vision() -> Response:
    """Answer one question about one image."""
    body = parse_body(request, VisionRequest)
    if body.image is not None and body.image_url is not None:
        raise bad_request("invalid_value", "Send either 'image' or 'image_url', not both.", "image_url")
    if body.image is None and body.image_url is None:
        raise APIError(400, "missing_field", "Field 'image' is required.", "image")
    image = ImageRef(body.image, "image") if body.image is not None else ImageRef(body.image_url, "image_url")
    chat, generation, result = _answer_one_image(image, body.prompt, body)
    decoded = chat.images[0]
    sent = generation.image_sizes[0] if generation.image_sizes else decoded.resized_to
    payload: dict[str, Any] = {
        "result": result.text,
        "success": True,
        **_native_tail("vision", generation.model_id, result, body.enable_thinking),
        "image": {"width": decoded.width, "height": decoded.height, "resized_to": list(sent)},
    }
    return jsonify(payload)


@bp.post("/v1/chat")
def chat_seed() -> Response:
    """The reference guides' shape: {"image_url", "prompt"} -> {"response"}."""
    body = parse_body(request, SeedChatRequest)
    _, generation, result = _answer_one_image(ImageRef(body.image_url, "image_url"), body.prompt, body)
    tail = _native_tail("chat", generation.model_id, result, body.enable_thinking)
    return jsonify({"response": result.text, **tail})
