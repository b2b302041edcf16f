"""HTTP to the upstream engine: a pooled session, bounded waits, and its failures as our errors."""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from glmvision.core.errors import APIError, bad_request, unavailable

log = logging.getLogger("glmvision")

# Seconds a client is told to wait when the upstream is down or failing.
RETRY_AFTER = 5
# Seconds, and lines, read after [DONE] for the body's end: only a body read to its end lets the
# connection go back to the pool (else every request pays a new connection).
DRAIN_SECONDS = 1.0
DRAIN_LINES = 8


class UpstreamCounters:
    """How often the upstream failed us, by kind (read by /readyz and, later, the metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unavailable = 0
        self.rejected = 0

    def count(self, error: APIError) -> APIError:
        """Count `error` by its code; return it."""
        with self._lock:
            if error.error_code == "upstream_unavailable":
                self.unavailable += 1
            elif error.error_code == "upstream_rejected":
                self.rejected += 1
        return error


def upstream_down(message: str) -> APIError:
    """The 503 for an upstream that timed out, refused the connection or failed (5xx)."""
    return unavailable("upstream_unavailable", message, RETRY_AFTER)


def upstream_message(response: requests.Response) -> str:
    """The upstream's error message (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), else its body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])[:500]
        if "message" in body:
            return str(body["message"])[:500]
    return json.dumps(body)[:500]


def status_error(response: requests.Response) -> APIError:
    """Our error for an upstream's non-2xx answer: its refusal of the request, or its failure."""
    message = upstream_message(response)
    status = response.status_code
    # 401/403/404: our key or model is wrong for it; 408/429: it is busy. Neither is the client's fault.
    if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        return APIError(400, "upstream_rejected", f"The upstream engine refused the request: {message}")
    log.warning("upstream answered %d: %s", status, message)
    return upstream_down(f"The upstream engine failed (HTTP {status}); retry shortly.")


def data_url(image: Any, original: tuple[str, bytes] | None = None) -> str:
    """An image as a data URL: the client's own bytes when decoding changed nothing, else a PNG.

    Either way the upstream sees exactly the pixels we prepared. Re-encoding is what costs: a
    1024x1024 PNG takes ~430 ms at zlib's default level on this machine, ~90 ms at level 1.
    """
    if original is not None:
        mime, raw = original
        return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pipeline's messages (images as PIL images) in OpenAI's shape, images as data URLs."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content, **_tool_fields(message)})
            continue
        if any(part["type"] == "video" for part in content):
            # Frames are decoded here; sending them on as a video needs the original bytes.
            raise bad_request("bad_video", "This server's upstream engine does not take videos.", "messages")
        parts = [
            _image_part(part) if part["type"] == "image" else {"type": "text", "text": part["text"]}
            for part in content
        ]
        out.append({"role": message["role"], "content": parts})
    return out


def _image_part(part: dict[str, Any]) -> dict[str, Any]:
    """An image as an image_url part, with the client's `detail` when it gave one."""
    image_url = {"url": data_url(part["image"], part.get("original"))}
    if part.get("detail") is not None:
        image_url["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image_url}


def _tool_fields(message: dict[str, Any]) -> dict[str, Any]:
    """A message's tool calls (arguments back as JSON text, as OpenAI sends them) and call id."""
    fields: dict[str, Any] = {}
    if message.get("tool_calls"):
        fields["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
            for call in message["tool_calls"]
        ]
    if message.get("tool_call_id") is not None:
        fields["tool_call_id"] = message["tool_call_id"]
    return fields


class UpstreamClient:
    """A pooled HTTP session to one OpenAI-compatible base URL."""

    def __init__(self, base_url: str, key: str, pool_size: int, connect_timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.trust_env = False  # a proxy from the environment must not sit between us and it
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def model_ids(self, timeout: float) -> list[str]:
        """The ids the upstream's /models lists, waiting at most `timeout` seconds in all."""
        try:
            response = self.session.get(self.base_url + "/models", timeout=(timeout, timeout))
        except requests.RequestException as exc:
            raise upstream_down(f"The upstream engine is unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise status_error(response)
        try:
            data = response.json()["data"]
            return [str(entry["id"]) for entry in data]
        except (ValueError, KeyError, TypeError):
            raise upstream_down("The upstream engine's /models answer is not OpenAI's list.") from None

    def chat(self, body: dict[str, Any], timeout: float) -> requests.Response:
        """POST a chat completion; the response once its headers came (2xx only).

        A streamed one (`body["stream"]`) is read as it arrives, each read waiting at most `timeout`.
        A whole one is read here, and must have come by then: it is what a deadline bounds.
        """
        streamed = bool(body.get("stream"))
        connect = max(0.05, min(self.connect_timeout, timeout))
        try:
            response = self.session.post(
                self.base_url + "/chat/completions",
                json=body,
                stream=streamed,
                timeout=(connect, max(0.05, timeout)),
            )
        except requests.Timeout:
            raise upstream_down("The upstream engine did not answer in time; retry shortly.") from None
        except requests.RequestException as exc:
            raise upstream_down(f"The upstream engine is unreachable ({type(exc).__name__}).") from None
        if response.status_code >= 300:
            try:
                response.content  # noqa: B018 - read the (short) error body before closing
            except requests.RequestException:
                pass
            response.close()
            raise status_error(response)
        return response


def drain(response: requests.Response, lines: Iterator[bytes]) -> None:
    """Read the little that follows [DONE], briefly, so that the connection can be reused."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(DRAIN_SECONDS)  # urllib3 sets each request's own timeouts afresh
    try:
        for _ in itertools.islice(lines, DRAIN_LINES):
            pass
    except (requests.RequestException, OSError):
        pass  # an upstream that holds the stream open after [DONE]: the connection is closed instead


def completion_event(response: requests.Response) -> dict[str, Any]:
    """A whole chat completion as one stream event: the message as its delta, usage beside it."""
    try:
        payload = response.json()
        choice = payload["choices"][0]
        message = choice.get("message") or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise upstream_down("The upstream engine's answer is not a chat completion.") from None
    if not isinstance(message, dict):
        raise upstream_down("The upstream engine's answer is not a chat completion.")
    # A message has a delta's fields (content, reasoning_content or reasoning): the stream reads it as one.
    event: dict[str, Any] = {
        "choices": [{"index": 0, "delta": message, "finish_reason": choice.get("finish_reason")}]
    }
    if isinstance(payload.get("usage"), dict):
        event["usage"] = payload["usage"]
    return event


def sse_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream, until [DONE] or its end; raises 503 if it breaks off."""
    try:
        lines = response.iter_lines(chunk_size=None, decode_unicode=False)
        for line in lines:
            if not line or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                drain(response, lines)
                return
            try:
                payload = json.loads(data)
            except ValueError:
                log.warning("upstream sent a malformed event: %r", data[:200])
                continue
            if isinstance(payload, dict):
                yield payload
    except requests.RequestException as exc:
        raise upstream_down(f"The upstream engine broke off mid-answer ({type(exc).__name__}).") from None
