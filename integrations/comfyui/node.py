"""The node: ComfyUI IMAGE tensors -> PNG data URLs -> /v1/chat/completions -> the answer as a STRING.

Only the standard library, torch, numpy and Pillow, which every ComfyUI install has.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8080"


def tensor_to_pngs(images: Any) -> list[bytes]:
    """ComfyUI's IMAGE (batch x height x width x channels, floats in 0..1) as one PNG per image.

    Values outside 0..1 are clamped; 3 channels give RGB, 4 RGBA, 1 greyscale.
    """
    import numpy as np
    from PIL import Image

    array = images.detach().cpu().float().clamp(0.0, 1.0).numpy() if hasattr(images, "detach") else images
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:  # one image without its batch axis
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected IMAGE as batch x height x width x 1/3/4 channels, got shape {array.shape}"
        )
    pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    encoded = []
    for frame in pixels:
        buffer = io.BytesIO()
        channels = frame.shape[-1]
        Image.fromarray(frame[..., 0] if channels == 1 else frame, modes[channels]).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


def request_body(
    pngs: list[bytes], prompt: str, max_tokens: int, temperature: float, thinking: bool
) -> dict[str, Any]:
    """One user turn with every image of the batch, then the prompt."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
        for png in pngs
    ]
    content.append({"type": "text", "text": prompt})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "chat_template_kwargs": {"enable_thinking": thinking},
    }


class GLMVisionError(RuntimeError):
    """What went wrong, in words ComfyUI shows the user; never returned as if it were an answer."""


def ask(server: str, api_key: str, body: dict[str, Any], timeout: float) -> str:
    """POST the chat completion; its answer, or a GLMVisionError saying why not."""
    url = server.rstrip("/") + "/v1/chat/completions"
    if not url.startswith(("http://", "https://")):
        raise GLMVisionError(f"glmvision: the server URL must start with http:// or https://, not {server!r}")
    headers = {"Content-Type": "application/json"}
    if api_key.strip():
        headers["Authorization"] = f"Bearer {api_key.strip()}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            completion = json.loads(response.read())
    except urllib.error.HTTPError as failure:
        raise GLMVisionError(_server_error(failure)) from None
    except (urllib.error.URLError, TimeoutError, OSError) as failure:
        reason = getattr(failure, "reason", failure)
        raise GLMVisionError(f"glmvision: cannot reach {server} ({reason}); is the server running?") from None
    except ValueError:
        raise GLMVisionError("glmvision: the server's answer was not JSON") from None
    try:
        return str(completion["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise GLMVisionError("glmvision: the server's answer was not a chat completion") from None


def _server_error(failure: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(failure.read()).get("error") or {}
        detail = f"{error.get('message')} ({error.get('code')})"
    except (ValueError, AttributeError):
        detail = failure.reason
    retry = failure.headers.get("Retry-After") if failure.headers else None
    later = f"; retry after {retry} s" if retry else ""
    return f"glmvision: HTTP {failure.code}: {detail}{later}"


class GLMVisionAsk:
    """Ask GLM-4.6V-Flash, served by glmvision, a question about the input image(s)."""

    CATEGORY = "glmvision"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    FUNCTION = "run"
    DESCRIPTION = "Sends the image batch and the prompt to a glmvision server; outputs its answer."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI calls it by this name
        return {
            "required": {
                "image": ("IMAGE",),
                "prompt": ("STRING", {"multiline": True, "default": "Describe this image."}),
                "server": ("STRING", {"default": DEFAULT_SERVER}),
                "api_key": ("STRING", {"default": ""}),
                "max_tokens": ("INT", {"default": 512, "min": 1, "max": 8192}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05}),
                "thinking": ("BOOLEAN", {"default": False}),
            },
            "optional": {"timeout": ("FLOAT", {"default": 300.0, "min": 1.0, "max": 3600.0})},
        }

    def run(
        self,
        image: Any,
        prompt: str,
        server: str,
        api_key: str,
        max_tokens: int,
        temperature: float,
        thinking: bool,
        timeout: float = 300.0,
    ) -> tuple[str]:
        try:
            pngs = tensor_to_pngs(image)
        except ValueError as failure:
            raise GLMVisionError(f"glmvision: {failure}") from None
        body = request_body(pngs, prompt, int(max_tokens), float(temperature), bool(thinking))
        return (ask(server, api_key, body, float(timeout)),)
