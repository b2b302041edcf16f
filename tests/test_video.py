"""Video input: MP4 and WebM made with PyAV, answered by the demo model; hostile files refused with 400."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import pytest
import requests
from flask import Flask
from helpers import live_server, make_video, server_env

from glmvision.core.errors import APIError
from glmvision.core.video import VideoLimits, decode_video


def data_url(raw: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def chat_body(url: str) -> dict[str, Any]:
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}


def responses_body(url: str, stream: bool = False) -> dict[str, Any]:
    """The Responses API's form of `chat_body`: the same message, the video as an input_video part."""
    content = [{"type": "input_video", "video_url": url}, {"type": "input_text", "text": "What happens?"}]
    return {
        "input": [{"role": "user", "content": content}],
        "max_output_tokens": 4,
        "temperature": 0,
        "stream": stream,
    }


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    mp4 = make_video("mp4")
    return {
        "mp4": mp4,
        "webm": make_video("webm"),
        "truncated": mp4[: len(mp4) // 2],
        "zero_frames": make_video("mp4", frames=0),  # non-empty, but holds no frame
        "huge_frame": make_video("mp4", frames=1, width=4096, height=4096),
        # WebM keeps no frame count: it claims 0.2 s, and holds 200 frames crammed into it.
        "lying": make_video("webm", frames=200, width=32, height=32, step=1),
    }


@pytest.fixture
def video_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(MAX_VIDEO_FRAMES="50")


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_chat_completion_answers_a_video(video_app: Flask, videos: dict[str, bytes], fmt: str) -> None:
    reply = video_app.test_client().post(
        "/v1/chat/completions", json=chat_body(data_url(videos[fmt], f"video/{fmt}"))
    )
    assert reply.status_code == 200, reply.get_json()
    data = reply.get_json()
    assert data["choices"][0]["message"]["content"] is not None
    assert data["usage"]["prompt_tokens_details"]["image_tokens"] > 0


def test_native_endpoint_answers_a_video(video_app: Flask, videos: dict[str, bytes]) -> None:
    body = {"video": base64.b64encode(videos["mp4"]).decode(), "prompt": "What happens?", "max_new_tokens": 4}
    reply = video_app.test_client().post("/v1/chat/vision", json=body)
    assert reply.status_code == 200, reply.get_json()
    data = reply.get_json()
    assert data["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert data["image"]["width"] == 64 and data["image"]["height"] == 48


def test_native_endpoint_takes_one_of_image_and_video(video_app: Flask, videos: dict[str, bytes]) -> None:
    body = {"video": base64.b64encode(videos["mp4"]).decode(), "image": "aGk=", "prompt": "?"}
    reply = video_app.test_client().post("/v1/chat/vision", json=body)
    assert reply.status_code == 400
    assert reply.get_json()["error"]["param"] == "video"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("truncated", "bad_video"),
        ("zero_frames", "bad_video"),
        ("huge_frame", "video_too_large"),
        ("lying", "video_too_large"),
    ],
)
def test_hostile_videos_are_refused(video_app: Flask, videos: dict[str, bytes], name: str, code: str) -> None:
    client = video_app.test_client()
    reply = client.post("/v1/chat/completions", json=chat_body(data_url(videos[name])))
    assert reply.status_code == 400, reply.get_json()
    error = reply.get_json()["error"]
    assert error["code"] == code
    assert error["param"] == "messages.0.content.0.video_url.url"
    body = {"video": base64.b64encode(videos[name]).decode(), "prompt": "?"}
    reply = client.post("/v1/chat/vision", json=body)
    assert reply.status_code == 400
    assert (reply.get_json()["error"]["code"], reply.get_json()["error"]["param"]) == (code, "video")


def test_lying_metadata_is_caught_while_decoding(videos: dict[str, bytes]) -> None:
    container = av.open(io.BytesIO(videos["lying"]))
    claimed = container.duration / 1_000_000
    frames_claimed = container.streams.video[0].frames
    container.close()
    assert claimed < 1 and frames_claimed == 0  # the metadata alone passes the caps
    limits = VideoLimits(300, 50, 1 << 30, 3840 * 2160, 10**9, 30)
    with pytest.raises(APIError) as caught:
        decode_video(videos["lying"], limits, "video")
    assert caught.value.error_code == "video_too_large"
    assert "more than 50 frames" in str(caught.value.description)


def test_frames_are_sampled_at_two_per_second(videos: dict[str, bytes]) -> None:
    limits = VideoLimits(300, 1000, 1 << 30, 3840 * 2160, 10**9, 30)
    video = decode_video(make_video("mp4", frames=12, rate=4), limits)
    # 12 frames at 4 fps: 3 s, sampled every half second (frames 0, 2, ..., 10).
    assert list(video.indices) == [0, 2, 4, 6, 8, 10]
    assert video.frames.shape == (6, 48, 64, 3)
    assert [round(i / video.fps, 2) for i in video.indices] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_a_non_video_data_url_is_refused(video_app: Flask) -> None:
    reply = video_app.test_client().post("/v1/chat/completions", json=chat_body("data:image/png;base64,aGk="))
    assert reply.status_code == 400
    assert reply.get_json()["error"]["code"] == "bad_video"


def test_video_through_gunicorn_and_the_engine_process(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path, videos: dict[str, bytes]
) -> None:
    """The default deployment: the worker decodes and prepares, the engine process gets the video's
    tensors over shared memory and encodes its frames; a bad file is still a 400 there."""
    env = server_env(demo_model_dir, runtime_dir, ENGINE="process")
    with live_server(tmp_path, env, ready_path="/readyz", timeout=180) as server:
        url = server.url + "/v1/chat/completions"
        reply = requests.post(url, json=chat_body(data_url(videos["webm"], "video/webm")), timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
        reply = requests.post(url, json=chat_body(data_url(videos["truncated"])), timeout=120)
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "bad_video"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_responses_answer_an_input_video(video_app: Flask, videos: dict[str, bytes], stream: bool) -> None:
    client = video_app.test_client()
    reply = client.post("/v1/responses", json=responses_body(data_url(videos["mp4"]), stream))
    assert reply.status_code == 200, reply.get_data(as_text=True)
    if stream:
        events = sse_events(reply.get_data(as_text=True))
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        response = events[-1]["response"]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas == response["output"][0]["content"][0]["text"]
    else:
        response = reply.get_json()
    assert response["output"][0]["type"] == "message"
    # The video's tokens count as chat counts them: the same message costs the same prompt.
    chat = client.post("/v1/chat/completions", json=chat_body(data_url(videos["mp4"]))).get_json()
    usage = response["usage"]
    assert (
        usage["input_tokens_details"]["image_tokens"]
        == chat["usage"]["prompt_tokens_details"]["image_tokens"]
    )
    assert usage["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert usage["input_tokens_details"]["image_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("name", "code"), [("truncated", "bad_video"), ("huge_frame", "video_too_large")])
def test_responses_refuse_a_bad_input_video_by_its_field(
    video_app: Flask, videos: dict[str, bytes], name: str, code: str, stream: bool
) -> None:
    reply = video_app.test_client().post("/v1/responses", json=responses_body(data_url(videos[name]), stream))
    assert reply.status_code == 400, reply.get_data(as_text=True)
    error = reply.get_json()["error"]
    assert (error["code"], error["param"]) == (code, "input.0.content.0.video_url")


@pytest.mark.parametrize(
    ("part", "code", "param"),
    [
        ({"type": "input_video"}, "missing_field", "input.0.content.0.video_url"),
        ({"type": "input_video", "video_url": {"url": "x"}}, "invalid_type", "input.0.content.0.video_url"),
        (
            {"type": "input_video", "video_url": "data:image/png;base64,aGk="},
            "bad_video",
            "input.0.content.0.video_url",
        ),
    ],
)
def test_responses_check_the_input_video_part(
    video_app: Flask, part: dict[str, Any], code: str, param: str
) -> None:
    body = {"input": [{"role": "user", "content": [part]}], "max_output_tokens": 2}
    reply = video_app.test_client().post("/v1/responses", json=body)
    assert reply.status_code == 400
    error = reply.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_only_user_messages_carry_an_input_video(video_app: Flask, videos: dict[str, bytes]) -> None:
    part = {"type": "input_video", "video_url": data_url(videos["mp4"])}
    body = {"input": [{"role": "system", "content": [part]}, {"role": "user", "content": "x"}]}
    reply = video_app.test_client().post("/v1/responses", json=body)
    assert reply.status_code == 400
    assert reply.get_json()["error"]["param"] == "input.0.content"


class _VideoHandler(BaseHTTPRequestHandler):
    """Serves the server's `video` at any path, as video/mp4."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body: bytes = self.server.video  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def video_site(videos: dict[str, bytes]) -> Iterator[str]:
    """A loopback server of the MP4; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VideoHandler)
    server.video = videos["mp4"]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_responses_fetch_an_input_video_url_under_the_image_url_rules(
    make_app: Callable[..., Flask], video_site: str
) -> None:
    url = video_site + "/clip.mp4"
    allowed = make_app(MAX_VIDEO_FRAMES="50", IMAGE_URL_DOMAINS="127.0.0.1", IMAGE_URL_ALLOW_PRIVATE="1")
    reply = allowed.test_client().post("/v1/responses", json=responses_body(url))
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["usage"]["input_tokens_details"]["image_tokens"] > 0
    private = make_app(IMAGE_URL_DOMAINS="127.0.0.1")  # loopback is a private address: refused
    reply = private.test_client().post("/v1/responses", json=responses_body(url))
    assert reply.status_code == 400
    error = reply.get_json()["error"]
    assert (error["code"], error["param"]) == ("image_url_blocked", "input.0.content.0.video_url")
