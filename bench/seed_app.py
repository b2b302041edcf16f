"""A naive seed-style wrapper: one global model, one generate() per request, no lock, no batching.

This is the baseline the benchmark compares glmvision against: what a first Flask wrapper around
`transformers` usually looks like. Served by gunicorn with one gthread worker, e.g.
`SEED_MODEL_DIR=/tmp/demo gunicorn -w 1 -k gthread --threads 8 --chdir bench seed_app:app`.
"""

from __future__ import annotations

import base64
import io
import os

import torch
from flask import Flask, jsonify, request
from flask.wrappers import Response
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL_DIR = os.environ["SEED_MODEL_DIR"]

processor = AutoProcessor.from_pretrained(MODEL_DIR)
model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR)
model.eval()

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> Response:
    """Answers once the module (and so the model) has loaded."""
    return jsonify({"status": "ok"})


@app.post("/v1/chat/vision")
def chat_vision() -> Response:
    """Decode the image, build the chat, run generate() on it and return the text."""
    body = request.get_json()
    image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": body["prompt"]},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    temperature = float(body.get("temperature", 0.7))
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=int(body.get("max_new_tokens", 512)),
            min_new_tokens=int(body.get("min_new_tokens", 0)),  # the scheduler bench fixes answer lengths
            **sampling,
        )
    prompt_tokens = int(inputs["input_ids"].shape[1])
    new_tokens = output[0, prompt_tokens:]
    text = processor.decode(new_tokens, skip_special_tokens=True)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": int(new_tokens.shape[0]),
        "total_tokens": prompt_tokens + int(new_tokens.shape[0]),
    }
    return jsonify({"result": text, "usage": usage})
