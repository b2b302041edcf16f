"""Talking to a running glmvision: requests, its errors as one line, and retries that honour Retry-After."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

DEFAULT_SERVER = "http://127.0.0.1:8080"
# The client's own variables (the server's settings never read them: core.config.CLIENT_VARIABLES).
CLIENT_SERVER_ENV = "GLMVISION_SERVER"
CLIENT_KEY_ENV = "GLMVISION_KEY"
# Statuses worth another try: the server said "later" (with Retry-After), not "never".
RETRYABLE = {429, 502, 503, 504}
# First-byte bytes of the formats the server takes, for files whose name says nothing.
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


class ClientError(Exception):
    """A failure to report in one line: the server's error (with its code) or the connection's."""

    def __init__(self, message: str, code: str = "client_error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status}


@dataclass(frozen=True)
class Server:
    """A glmvision base URL and the key to present, if any."""

    url: str
    key: str | None = None
    timeout: float = 300.0

    @classmethod
    def from_args(cls, url: str | None, key: str | None, timeout: float = 300.0) -> Server:
        """Flags first, then GLMVISION_SERVER / GLMVISION_KEY, then the local default."""
        base = (url or os.environ.get(CLIENT_SERVER_ENV) or DEFAULT_SERVER).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ClientError(f"the server URL must start with http:// or https://, not {base!r}", "usage")
        return cls(base, key or os.environ.get(CLIENT_KEY_ENV) or None, timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both client commands take: the server, its key, how to sample, how long to wait."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="glmvision's base URL (default $GLMVISION_SERVER, else http://127.0.0.1:8080)",
    )
    parser.add_argument("--key", metavar="K", help="API key (default $GLMVISION_KEY)")
    parser.add_argument(
        "--max-tokens", type=int, metavar="N", help="most tokens per answer (default: the server's)"
    )
    parser.add_argument("--temperature", type=float, metavar="T", help="0 for greedy (default: the server's)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="seconds to wait per answer (default 300)"
    )


def is_http_or_data_url(source: str) -> bool:
    """Whether `source` goes to the server as given (an http(s) URL it fetches, or a data: URL)."""
    # Narrower than glmvision.core.urlfetch.is_url (any `scheme://`: the server's test for "fetch this").
    return source.startswith(("http://", "https://", "data:"))


def image_url(source: str) -> str:
    """What goes in an image_url part: a URL as given (the server fetches it), a file as a data URL."""
    if is_http_or_data_url(source):
        return source
    path = Path(source)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ClientError(f"no such file: {source}", "file_not_found") from None
    except IsADirectoryError:
        raise ClientError(f"{source} is a directory, not an image", "file_not_found") from None
    except OSError as exc:
        raise ClientError(f"cannot read {source}: {exc.strerror}", "file_unreadable") from None
    mime = next((kind for magic, kind in MAGIC if raw.startswith(magic)), None)
    if mime is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        mime = "image/webp"
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def chat_body(source: str, question: str, **fields: Any) -> dict[str, Any]:
    """A one-image chat completion request; `fields` with None values are left to the server."""
    content = [
        {"type": "image_url", "image_url": {"url": image_url(source)}},
        {"type": "text", "text": question},
    ]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    body.update({name: value for name, value in fields.items() if value is not None})
    return body


def error_from(response: requests.Response) -> ClientError:
    """The server's error as a ClientError: its message, code and Retry-After."""
    try:
        error = response.json().get("error") or {}
        message, code = str(error.get("message") or response.reason), str(error.get("code") or "http_error")
    except (ValueError, AttributeError):
        message, code = f"HTTP {response.status_code} {response.reason}", "http_error"
    failure = ClientError(message, code, response.status_code)
    try:
        failure.retry_after = float(response.headers.get("Retry-After", ""))
    except ValueError:
        failure.retry_after = None
    return failure


def post(server: Server, path: str, body: dict[str, Any], stream: bool = False) -> requests.Response:
    """POST JSON; the response if 2xx, else the server's error raised as a ClientError."""
    return send(server, "POST", path, body, stream)


def send(
    server: Server, method: str, path: str, body: dict[str, Any] | None = None, stream: bool = False
) -> requests.Response:
    """One request (JSON body, if any); the response if 2xx, else the server's error as a ClientError."""
    try:
        response = requests.request(
            method,
            server.url + path,
            json=body,
            headers=server.headers(),
            stream=stream,
            timeout=(10, server.timeout),
        )
    except requests.ConnectionError:
        raise ClientError(
            f"cannot reach the server at {server.url} (is it running?)", "unreachable"
        ) from None
    except requests.Timeout:
        raise ClientError(
            f"the server at {server.url} did not answer in {server.timeout:.0f}s", "timeout"
        ) from None
    except requests.RequestException as exc:
        raise ClientError(f"request to {server.url} failed: {type(exc).__name__}", "request_failed") from None
    if response.status_code >= 300:
        failure = error_from(response)
        response.close()
        raise failure
    return response


def sse_payloads(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of a chat completion stream; an error event is raised as a ClientError."""
    try:
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            payload = json.loads(data)
            if "error" in payload:
                error = payload["error"] or {}
                raise ClientError(str(error.get("message")), str(error.get("code") or "stream_error"))
            yield payload
    except requests.RequestException as exc:
        raise ClientError(f"the stream broke off ({type(exc).__name__})", "stream_broken") from None
    finally:
        response.close()


def with_retries(
    call: Callable[[], Any],
    retries: int,
    sleep: Callable[[float], None] = time.sleep,
    base: float = 1.0,
    cap: float = 60.0,
) -> Any:
    """`call()`, tried again on 429/5xx or a lost connection: after Retry-After, else exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return call()
        except ClientError as failure:
            again = failure.status in RETRYABLE or failure.code in ("unreachable", "stream_broken")
            if not again or attempt == retries:
                raise
            backoff = min(cap, base * 2**attempt) * (0.5 + random.random() / 2)
            sleep(max(failure.retry_after or 0.0, backoff))
    raise AssertionError("not reached")
