"""HTTP endpoints: health probes, the model list and POST /v1/chat/vision."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.wrappers import Response

from .model import ModelHolder, is_demo, model_id_for
from .pipeline import ChatInput, check_prompt, generation_params, load_images, new_request_id, run, usage
from .schemas import VisionRequest, parse_body

bp = Blueprint("api", __name__)


def _holder() -> ModelHolder:
    return current_app.extensions["glmvision.model"]


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    """Readiness: 200 once this worker's model is loaded, 503 before."""
    holder = _holder()
    if holder.loaded is not None:
        return jsonify({"ready": True, "status": "ready", "model": holder.loaded.info()})
    status = "loading" if holder.loading else ("failed" if holder.error else "not_loaded")
    return jsonify({"ready": False, "status": status}), 503, {"Retry-After": "5"}


@bp.get("/v1/models")
def list_models() -> Response:
    """The served model, in OpenAI's list shape, with device details once loaded."""
    loaded = _holder().loaded
    if loaded is not None:
        card: dict[str, Any] = {**loaded.info(), "ready": True}
    else:
        source = current_app.config["GLMVISION_MODEL"]
        model_id = model_id_for(source, current_app.config["GLMVISION_MODEL_ID"])
        card = {"id": model_id, "demo": is_demo(source), "device": None, "dtype": None, "ready": False}
    card.update(object="model", created=int(current_app.config["GLMVISION_STARTED"]), owned_by="glmvision")
    return jsonify({"object": "list", "data": [card]})


@bp.post("/v1/chat/vision")
def chat_vision() -> Response:
    """Answer one question about one image."""
    settings = current_app.config
    body = parse_body(request, VisionRequest)
    prompt = check_prompt(body.prompt, settings)
    params = generation_params(
        settings,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        enable_thinking=body.enable_thinking,
    )
    images = load_images([("image", body.image)], settings)
    generation = run(_holder(), ChatInput(images, prompt, params), settings)
    image = images[0]
    payload: dict[str, Any] = {
        "result": generation.text,
        "model": _holder().get().model_id,
        "success": True,
        "id": new_request_id("vision"),
        "created": int(time.time()),
        "finish_reason": generation.finish_reason,
        "usage": usage(generation),
        "image": {"width": image.width, "height": image.height, "resized_to": list(image.resized_to)},
    }
    if body.enable_thinking:
        payload["reasoning"] = generation.reasoning or ""
    return jsonify(payload)
