"""Native HTTP endpoints: health probes, the model list, /v1/chat/vision and /v1/chat."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.wrappers import Response

from .errors import APIError, bad_request
from .model import ModelHolder, is_demo, model_id_for
from .pipeline import (
    Answer,
    ChatInput,
    ImageRef,
    Turn,
    answer,
    check_prompt,
    generation_params,
    new_request_id,
    usage,
)
from .schemas import SamplingFields, SeedChatRequest, VisionRequest, parse_body

bp = Blueprint("api", __name__)


def holder() -> ModelHolder:
    """This app's model holder."""
    return current_app.extensions["glmvision.model"]


def served_model_names() -> tuple[str, ...]:
    """Names a client may ask for: the served id, then the configured aliases."""
    config = current_app.config
    served = model_id_for(config["GLMVISION_MODEL"], config["GLMVISION_MODEL_ID"])
    return (served, *config["GLMVISION_MODEL_ALIASES"])


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    """Readiness: 200 once this worker's model is loaded, 503 before."""
    model_holder = holder()
    if model_holder.loaded is not None:
        loaded = model_holder.loaded
        engine = {"queued": loaded.engine.queued(), **loaded.engine.stats.as_dict()} if loaded.engine else {}
        return jsonify({"ready": True, "status": "ready", "model": loaded.info(), "engine": engine})
    status = "loading" if model_holder.loading else ("failed" if model_holder.error else "not_loaded")
    return jsonify({"ready": False, "status": status}), 503, {"Retry-After": "5"}


@bp.get("/v1/models")
def list_models() -> Response:
    """The served model, in OpenAI's list shape, with device details once loaded."""
    loaded = holder().loaded
    if loaded is not None:
        card: dict[str, Any] = {**loaded.info(), "ready": True}
    else:
        source = current_app.config["GLMVISION_MODEL"]
        card = {"id": served_model_names()[0], "demo": is_demo(source), "device": None, "dtype": None}
        card["ready"] = False
    card.update(object="model", created=int(current_app.config["GLMVISION_STARTED"]), owned_by="glmvision")
    return jsonify({"object": "list", "data": [card]})


def _answer_one_image(image: ImageRef, prompt: str, body: SamplingFields) -> tuple[ChatInput, Answer]:
    settings = current_app.config
    params = generation_params(
        settings,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        enable_thinking=body.enable_thinking,
    )
    turns = [Turn("user", [image, check_prompt(prompt, settings)])]
    return answer(holder(), turns, params, settings, current_app.extensions["glmvision.fetch_policy"])


@bp.post("/v1/chat/vision")
def chat_vision() -> Response:
    """Answer one question about one image."""
    body = parse_body(request, VisionRequest)
    if body.image is not None and body.image_url is not None:
        raise bad_request("invalid_value", "Send either 'image' or 'image_url', not both.", "image_url")
    if body.image is None and body.image_url is None:
        raise APIError(400, "missing_field", "Field 'image' is required.", "image")
    image = ImageRef(body.image, "image") if body.image is not None else ImageRef(body.image_url, "image_url")
    chat, generation = _answer_one_image(image, body.prompt, body)
    result = generation.finish(current_app.config)
    decoded = chat.images[0]
    payload: dict[str, Any] = {
        "result": result.text,
        "model": generation.model_id,
        "success": True,
        "id": new_request_id("vision"),
        "created": int(time.time()),
        "finish_reason": result.finish_reason,
        "usage": usage(result),
        "image": {"width": decoded.width, "height": decoded.height, "resized_to": list(decoded.resized_to)},
    }
    if body.enable_thinking:
        payload["reasoning"] = result.reasoning or ""
    return jsonify(payload)


@bp.post("/v1/chat")
def chat_seed() -> Response:
    """The reference guides' shape: {"image_url", "prompt"} -> {"response"}."""
    body = parse_body(request, SeedChatRequest)
    _, generation = _answer_one_image(ImageRef(body.image_url, "image_url"), body.prompt, body)
    result = generation.finish(current_app.config)
    payload: dict[str, Any] = {
        "response": result.text,
        "id": new_request_id("chat"),
        "model": generation.model_id,
        "finish_reason": result.finish_reason,
        "usage": usage(result),
    }
    if body.enable_thinking:
        payload["reasoning"] = result.reasoning or ""
    return jsonify(payload)
