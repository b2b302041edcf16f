"""Image URLs end to end: a local image server, the Flask app and a real gunicorn, on loopback only."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from helpers import LiveServer, image_bytes, live_server, model_sees, wait_for
from PIL import Image

from glmvision import create_app
from glmvision.core.config import ConfigError

PROMPT = "What is in this picture?"
HTTP_TIMEOUT = 60.0
EXIF_ORIENTATION = 0x0112


def _exif_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A JPEG whose EXIF says to rotate it (orientation 6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return image_bytes(width, height, "JPEG", exif=exif.tobytes())


PHOTO_PNG = image_bytes(300, 200)
PHOTO_JPEG = _exif_jpeg(300, 200, orientation=6)
ONE_MIB = 1024 * 1024
# A decodable PNG (trailing bytes are ignored by decoders) over the 1 MiB cap: only its size is wrong.
BIG_PNG = PHOTO_PNG + b"\0" * (ONE_MIB + 64 * 1024 - len(PHOTO_PNG))
DRIP_INTERVAL = 0.2
DRIP_BYTES = 40  # at most 8 s of dripping, and only while the client listens


# --- the local image server ---------------------------------------------------------------------


class ImageServer(ThreadingHTTPServer):
    """A loopback image server that counts connections and records every request path."""

    daemon_threads = True

    def __init__(self, host: str, port: int, stop: threading.Event) -> None:
        super().__init__((host, port), ImageHandler)
        self.stop = stop
        self.other_base = ""  # where /redirect-other points: the server on 127.0.0.2
        self.lock = threading.Lock()
        self.connections = 0
        self.paths: list[str] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection before handling it, so even a refused request would show."""
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    def hits(self, token: str) -> list[str]:
        """Paths (without query) of the requests that carried this token."""
        with self.lock:
            return [path.split("?", 1)[0] for path in self.paths if token in path]


class ImageHandler(BaseHTTPRequestHandler):
    """Routes of the image server: images, a page, a big, slow, missing image and redirects."""

    protocol_version = "HTTP/1.1"
    server: ImageServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def do_GET(self) -> None:
        """Record the request, then answer it; a client hanging up is fine."""
        self.close_connection = True
        with self.server.lock:
            self.server.paths.append(self.path)
        try:
            self._route()
        except OSError:
            pass

    def _reply(self, status: int, body: bytes = b"", content_type: str = "", location: str = "") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        path, _, query = self.path.partition("?")
        suffix = f"?{query}" if query else ""
        if path == "/photo.png":
            self._reply(200, PHOTO_PNG, "image/png")
        elif path == "/photo.jpg":
            self._reply(200, PHOTO_JPEG, "image/jpeg")
        elif path == "/page.html":
            self._reply(200, b"<html><body>not an image</body></html>", "text/html; charset=utf-8")
        elif path == "/big.png":
            self._reply(200, BIG_PNG, "image/png")
        elif path == "/slow.png":
            self._drip()
        elif path == "/redirect":
            self._reply(302, location="/photo.png" + suffix)
        elif path == "/redirect-other":
            self._reply(302, location=f"{self.server.other_base}/photo.png{suffix}")
        else:
            self._reply(404, b"missing", "text/plain")

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        for _ in range(DRIP_BYTES):
            self.wfile.write(b"\x89")
            self.wfile.flush()
            if self.server.stop.wait(DRIP_INTERVAL):
                return


@dataclass
class ImageSite:
    """The image server on 127.0.0.1 and a twin on 127.0.0.2 that no test may ever reach."""

    main: ImageServer
    other: ImageServer

    @property
    def port(self) -> int:
        return self.main.server_address[1]

    def url(self, path: str, token: str) -> str:
        """An http URL on 127.0.0.1 tagged with a token, so its hits can be told apart."""
        return f"http://127.0.0.1:{self.port}{path}?t={token}"

    def connections(self) -> tuple[int, int]:
        """Connections so far to (127.0.0.1, 127.0.0.2)."""
        return self.main.connections, self.other.connections


def _bind_pair(stop: threading.Event) -> tuple[ImageServer, ImageServer]:
    """Bind 127.0.0.1 and 127.0.0.2, on one port when possible (only the host then differs)."""
    for _ in range(10):
        main = ImageServer("127.0.0.1", 0, stop)
        try:
            return main, ImageServer("127.0.0.2", main.server_address[1], stop)
        except OSError:
            main.server_close()
    main = ImageServer("127.0.0.1", 0, stop)
    return main, ImageServer("127.0.0.2", 0, stop)


@pytest.fixture(scope="module")
def site() -> Iterator[ImageSite]:
    """Both image servers, serving in background threads for the whole module."""
    stop = threading.Event()
    main, other = _bind_pair(stop)
    main.other_base = other.other_base = f"http://127.0.0.2:{other.server_address[1]}"
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for server in (main, other)
    ]
    for thread in threads:
        thread.start()
    yield ImageSite(main, other)
    stop.set()
    for server in (main, other):
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(timeout=5)


def new_token() -> str:
    """A unique marker for one request's image URL."""
    return uuid.uuid4().hex[:16]


# --- the service: Flask test client or real gunicorn ---------------------------------------------

# Service configurations: GLMVISION_<NAME> values, as strings so both transports parse them alike.
CONFIGS: dict[str, dict[str, str]] = {
    "open": {
        "IMAGE_URL_DOMAINS": "127.0.0.1",
        "IMAGE_URL_ALLOW_PRIVATE": "1",
        "IMAGE_URL_MAX_MB": "1",
        "IMAGE_URL_TIMEOUT": "2",
    },
    "disabled": {"IMAGE_URL_DOMAINS": ""},
    "foreign": {"IMAGE_URL_DOMAINS": "example.com", "IMAGE_URL_ALLOW_PRIVATE": "1"},
    "private": {"IMAGE_URL_DOMAINS": "127.0.0.1"},
}
# The in-process app waits less for the slow image; nothing else differs.
FLASK_EXTRA: dict[str, dict[str, str]] = {"open": {"IMAGE_URL_TIMEOUT": "1"}}


@dataclass(frozen=True)
class Reply:
    """What came back: status, Content-Type and the JSON body."""

    status: int
    content_type: str
    body: Any


class Service:
    """Posts JSON to the service under a named configuration."""

    name = ""

    def post(self, config: str, path: str, body: dict[str, Any]) -> Reply:
        raise NotImplementedError


class FlaskService(Service):
    """Through Flask's test client, one app per configuration."""

    name = "flask"

    def __init__(self, make_app: Callable[..., Flask]) -> None:
        self._make_app = make_app
        self._apps: dict[str, Flask] = {}

    def post(self, config: str, path: str, body: dict[str, Any]) -> Reply:
        if config not in self._apps:
            settings = {**CONFIGS[config], **FLASK_EXTRA.get(config, {})}
            self._apps[config] = self._make_app(**{name.lower(): value for name, value in settings.items()})
        with self._apps[config].test_client() as client:
            response = client.post(path, json=body)
            return Reply(response.status_code, response.content_type or "", response.get_json())


def _http_session() -> requests.Session:
    """A session that ignores proxy variables, so traffic stays on loopback."""
    session = requests.Session()
    session.trust_env = False
    return session


@dataclass
class GunicornPool(Service):
    """Real gunicorn servers, one per configuration, started on first use and kept for the module."""

    stack: ExitStack
    base: Path
    model_dir: Path
    servers: dict[str, LiveServer] = field(default_factory=dict)
    workers: dict[str, set[int]] = field(default_factory=dict)
    session: requests.Session = field(default_factory=_http_session)
    name = "gunicorn"

    def server(self, config: str) -> LiveServer:
        """The running server for this configuration (started now if need be)."""
        if config not in self.servers:
            env = {f"GLMVISION_{name}": value for name, value in CONFIGS[config].items()}
            env.update(
                GLMVISION_MODEL=str(self.model_dir),
                GLMVISION_DEVICE="cpu",
                GLMVISION_WORKERS="1",
                XDG_RUNTIME_DIR=str(self.base),
                TRANSFORMERS_OFFLINE="1",
            )
            warm = config == "open"  # the refusing servers never need the model
            if not warm:
                env["GLMVISION_WARMUP"] = "0"
            folder = self.base / config
            folder.mkdir()
            server = self.stack.enter_context(
                live_server(folder, env, ready_path="/readyz" if warm else "/healthz")
            )
            assert wait_for(lambda: len(server.worker_pids()) == 1), server.log()
            self.servers[config] = server
            self.workers[config] = server.worker_pids()
        return self.servers[config]

    def post(self, config: str, path: str, body: dict[str, Any]) -> Reply:
        response = self.session.post(self.server(config).url + path, json=body, timeout=HTTP_TIMEOUT)
        return Reply(response.status_code, response.headers.get("Content-Type", ""), response.json())


@pytest.fixture(scope="module")
def gunicorn(demo_model_dir: Path) -> Iterator[GunicornPool]:
    """The module's gunicorn servers, all stopped at its end."""
    base = Path(tempfile.mkdtemp(prefix="gv-url-"))
    with ExitStack() as stack:
        pool = GunicornPool(stack, base, demo_model_dir)
        yield pool
        pool.session.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["flask", "gunicorn"])
def service(request: pytest.FixtureRequest, make_app: Callable[..., Flask]) -> Service:
    """Each test runs through the Flask test client and through real gunicorn."""
    if request.param == "flask":
        return FlaskService(make_app)
    return request.getfixturevalue("gunicorn")


# --- request bodies -------------------------------------------------------------------------------

ENDPOINTS = {
    "chat": ("/v1/chat", "image_url"),
    "vision": ("/v1/chat/vision", "image_url"),
    "completions": ("/v1/chat/completions", "messages.0.content.1.image_url.url"),
}


def request_body(endpoint: str, image: str) -> dict[str, Any]:
    """A cheap request (4 tokens) to one endpoint with this image URL, base64 or data URL."""
    if endpoint == "completions":
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": image}}]
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return {"image_url": image, "prompt": PROMPT, "max_new_tokens": 4}


def check_usage(usage: Any) -> None:
    """Token accounting in OpenAI's shape, at most the 4 tokens asked for."""
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert all(isinstance(value, int) for key, value in usage.items() if key != "prompt_tokens_details")
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_seed_reply(body: Any) -> None:
    """The /v1/chat answer: {"response": str, "id", "created", "model", "finish_reason", "usage"}."""
    assert set(body) == {"response", "id", "created", "model", "finish_reason", "usage"}, body
    assert isinstance(body["response"], str)
    assert isinstance(body["id"], str) and body["id"].startswith("chat-")
    assert isinstance(body["model"], str) and body["model"]
    assert body["finish_reason"] in {"stop", "length"}
    check_usage(body["usage"])


# --- B. images that may be fetched ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "width", "height"),
    [("/photo.png", 300, 200), ("/photo.jpg", 200, 300)],
    ids=["png", "exif-rotated-jpeg"],
)
def test_vision_fetches_an_allowed_url(
    service: Service, site: ImageSite, path: str, width: int, height: int
) -> None:
    """/v1/chat/vision fetches `image_url` once and reports the (EXIF-upright) size it decoded."""
    token = new_token()
    reply = service.post("open", "/v1/chat/vision", request_body("vision", site.url(path, token)))
    assert reply.status == 200, reply.body
    assert reply.body["success"] is True and isinstance(reply.body["result"], str)
    check_usage(reply.body["usage"])
    assert reply.body["image"] == {"width": width, "height": height, "resized_to": model_sees(width, height)}
    assert site.main.hits(token) == [path]


@pytest.mark.parametrize("kind", ["http-url", "base64", "data-url"])
def test_seed_chat_takes_every_image_form(service: Service, site: ImageSite, kind: str) -> None:
    """/v1/chat answers {"response", ...} for an http URL, plain base64 and a data URL alike."""
    token = new_token()
    encoded = base64.b64encode(PHOTO_PNG).decode("ascii")
    image = {
        "http-url": site.url("/photo.png", token),
        "base64": encoded,
        "data-url": "data:image/png;base64," + encoded,
    }[kind]
    reply = service.post("open", "/v1/chat", request_body("chat", image))
    assert reply.status == 200, reply.body
    check_seed_reply(reply.body)
    assert site.main.hits(token) == (["/photo.png"] if kind == "http-url" else [])


def test_chat_completions_fetch_an_image_part(service: Service, site: ImageSite) -> None:
    """An image_url part of a chat completion is fetched from the allowed host."""
    token = new_token()
    reply = service.post(
        "open", "/v1/chat/completions", request_body("completions", site.url("/photo.png", token))
    )
    assert reply.status == 200, reply.body
    assert reply.body["object"] == "chat.completion"
    assert isinstance(reply.body["choices"][0]["message"]["content"], str)
    check_usage(reply.body["usage"])
    assert site.main.hits(token) == ["/photo.png"]


def test_a_redirect_within_the_allowed_host_is_followed(service: Service, site: ImageSite) -> None:
    """/redirect -> /photo.png on the same allowed host: both hops are fetched and the image decoded."""
    token = new_token()
    reply = service.post("open", "/v1/chat/vision", request_body("vision", site.url("/redirect", token)))
    assert reply.status == 200, reply.body
    assert reply.body["image"] == {"width": 300, "height": 200, "resized_to": model_sees(300, 200)}
    assert site.main.hits(token) == ["/redirect", "/photo.png"]


# --- B. the error table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A URL the service must refuse: under which config, with what, and what the server may see."""

    config: str
    url: str  # a path on the image server, or a full URL ({port}: the image server's port)
    status: int
    code: str
    seen: tuple[str, ...]  # paths the image server must have been asked for, in order


REFUSALS = {
    "disabled": Refusal("disabled", "/photo.png", 400, "image_url_disabled", ()),
    "domain-not-allowed": Refusal("foreign", "/photo.png", 400, "image_url_domain_not_allowed", ()),
    "private-by-default": Refusal("private", "/photo.png", 400, "image_url_blocked", ()),
    "redirect-to-other-host": Refusal(
        "open", "/redirect-other", 400, "image_url_domain_not_allowed", ("/redirect-other",)
    ),
    "too-large": Refusal("open", "/big.png", 413, "image_url_too_large", ("/big.png",)),
    "timeout": Refusal("open", "/slow.png", 400, "image_url_timeout", ("/slow.png",)),
    "not-an-image": Refusal("open", "/page.html", 400, "image_url_not_image", ("/page.html",)),
    "upstream-404": Refusal("open", "/missing", 400, "image_url_upstream_status", ("/missing",)),
    "file-scheme": Refusal("open", "file:///etc/passwd", 400, "image_url_invalid", ()),
    "ftp-scheme": Refusal("open", "ftp://127.0.0.1:{port}/photo.png", 400, "image_url_invalid", ()),
}


def check_error(reply: Reply, endpoint: str, status: int, code: str) -> None:
    """The exact status, code and param, in the endpoint's envelope (OpenAI's or the native one)."""
    assert reply.status == status, reply.body
    assert reply.content_type.startswith("application/json")
    body = reply.body
    if endpoint == "completions":
        assert set(body) == {"error"}, body
    else:
        assert set(body) == {"success", "error"} and body["success"] is False, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param", "errors"}, error
    assert error["errors"][0] == {"code": code, "param": error["param"], "message": error["message"]}
    assert error["code"] == code, error
    assert error["param"] == ENDPOINTS[endpoint][1], error
    assert error["type"] == "invalid_request_error", error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_image_urls(service: Service, site: ImageSite, case: str, endpoint: str) -> None:
    """Each refusal has its status, code and param, and the image servers see only what they must."""
    refusal = REFUSALS[case]
    token = new_token()
    if refusal.url.startswith("/"):
        url = site.url(refusal.url, token)
    elif refusal.url.startswith("ftp:"):
        url = refusal.url.format(port=site.port) + f"?t={token}"
    else:
        url = refusal.url
    before = site.connections()
    reply = service.post(refusal.config, ENDPOINTS[endpoint][0], request_body(endpoint, url))
    check_error(reply, endpoint, refusal.status, refusal.code)
    assert site.main.hits(token) == list(refusal.seen)
    main_now, other_now = site.connections()
    assert other_now == before[1] == 0  # 127.0.0.2 is never allowed, so never dialled
    if not refusal.seen:
        assert main_now == before[0]  # refused before any connection was opened


# --- C. /v1/chat as the seed guide calls it ------------------------------------------------------


def test_seed_guide_with_requests(gunicorn: GunicornPool, site: ImageSite) -> None:
    """requests.post(url, json={"image_url", "prompt"}) gets 200 and a "response"."""
    token = new_token()
    body = {"image_url": site.url("/photo.png", token), "prompt": PROMPT, "max_new_tokens": 4}
    with _http_session() as session:
        response = session.post(gunicorn.server("open").url + "/v1/chat", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    check_seed_reply(response.json())
    assert site.main.hits(token) == ["/photo.png"]


def test_seed_guide_with_curl(gunicorn: GunicornPool, site: ImageSite, tmp_path: Path) -> None:
    """`curl -sS -H 'Content-Type: application/json' --data @file URL` gets 200 and a "response"."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    token = new_token()
    payload = tmp_path / "request.json"
    payload.write_text(
        json.dumps({"image_url": site.url("/photo.png", token), "prompt": PROMPT, "max_new_tokens": 4}),
        encoding="utf-8",
    )
    url = gunicorn.server("open").url + "/v1/chat"
    # No proxy variables: curl must talk to the loopback server directly.
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    result = subprocess.run(
        [curl, "-sS", "-H", "Content-Type: application/json", "--data", f"@{payload}", url],
        capture_output=True,
        text=True,
        env=env,
        timeout=HTTP_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    check_seed_reply(json.loads(result.stdout))
    assert site.main.hits(token) == ["/photo.png"]


# --- D. a bad domain pattern stops start-up ------------------------------------------------------


@pytest.mark.parametrize("domains", ["a*.x", "cdn.example.com,a*.x"])
def test_bad_domain_pattern_is_a_config_error(demo_model_dir: Path, domains: str) -> None:
    """create_app refuses a malformed domain pattern at start-up, naming the setting."""
    settings = {
        "GLMVISION_MODEL": str(demo_model_dir),
        "GLMVISION_DEVICE": "cpu",
        "GLMVISION_IMAGE_URL_DOMAINS": domains,
    }
    with pytest.raises(ConfigError, match="GLMVISION_IMAGE_URL_DOMAINS"):
        create_app(settings)


# --- B. after the table: gunicorn is unharmed (keep last) ----------------------------------------


def test_gunicorn_workers_survive_the_table(gunicorn: GunicornPool, site: ImageSite) -> None:
    """No worker was replaced by any refusal, nothing crashed, and the next request still works."""
    server = gunicorn.server("open")
    token = new_token()
    reply = gunicorn.post("open", "/v1/chat/vision", request_body("vision", site.url("/photo.png", token)))
    assert reply.status == 200, reply.body
    assert reply.body["image"] == {"width": 300, "height": 200, "resized_to": model_sees(300, 200)}
    for config, started in gunicorn.workers.items():
        running = gunicorn.servers[config]
        assert running.worker_pids() == started, running.log()
        log = running.log()
        assert "Traceback" not in log and "unhandled error" not in log, log
        assert "WORKER TIMEOUT" not in log and "Worker exiting" not in log, log
    assert server.process.poll() is None
