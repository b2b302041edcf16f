"""Test helpers: images, request bodies and a real gunicorn server on a free loopback port."""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Where documented examples live: each runnable block follows an `<!-- example: NAME -->` line.
DOC_PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def doc_example(name: str) -> str:
    """The code block after `<!-- example: name -->` in the README or a docs page; every copy the same."""
    pattern = re.compile(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", re.S)
    copies = [block for page in DOC_PAGES for block in pattern.findall(page.read_text(encoding="utf-8"))]
    assert copies, f"documented example {name!r} not found"
    assert all(copy == copies[0] for copy in copies), f"the copies of example {name!r} differ"
    return copies[0]


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", **save: Any) -> bytes:
    """Encode a patterned RGB image (not flat, so codecs have real work)."""
    image = Image.new("RGB", (width, height), (30, 120, 200))
    for x in range(0, width, max(1, width // 8)):
        for y in range(height):
            image.putpixel((x, y), (250, 250, 0))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


VIDEO_CODECS = {"mp4": "libx264", "webm": "libvpx"}


def make_video(
    fmt: str = "mp4",
    frames: int = 6,
    width: int = 64,
    height: int = 48,
    rate: int = 4,
    step: int | None = None,
) -> bytes:
    """A small video of solid frames; `step`: each frame's pts in 1/1000 s ticks (crammed timestamps)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(VIDEO_CODECS[fmt], rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if step is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if not frames:
            container.start_encoding()  # the header alone: a container with no frame in it
        for index in range(frames):
            pixels = np.full((height, width, 3), index * 20 % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if step is not None:
                frame.pts, frame.time_base = index * step, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def image_b64(width: int = 64, height: int = 48, fmt: str = "PNG", **save: Any) -> str:
    """A base64 image for request bodies."""
    return b64(image_bytes(width, height, fmt, **save))


def vision_body(**fields: Any) -> dict[str, Any]:
    """A valid /v1/chat/vision body, cheap to run on the demo model, with overrides."""
    body: dict[str, Any] = {"image": image_b64(), "prompt": "What is in this picture?", "max_new_tokens": 4}
    body.update(fields)
    return body


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A running gunicorn serving glmvision."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def worker_pids(self) -> set[int]:
        """PIDs of the master's live worker children (not its engine processes nor multiprocessing's
        resource tracker, which are spawned interpreters)."""
        return {pid for pid, args in self._children() if "from multiprocessing" not in args}

    def engine_pids(self) -> set[int]:
        """PIDs of the master's engine processes (GLMVISION_ENGINE=process)."""
        return {pid for pid, args in self._children() if "spawn_main" in args}

    def _children(self) -> list[tuple[int, str]]:
        result = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.process.pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        rows = (line.strip().split(None, 1) for line in result.stdout.splitlines() if line.strip())
        return [(int(row[0]), row[1] if len(row) > 1 else "") for row in rows]


def stop(process: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds; wait for it either way."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def live_server(
    tmp_path: Path,
    env: dict[str, str],
    ready_path: str = "/healthz",
    timeout: float = 90.0,
    new_session: bool = False,
) -> Iterator[LiveServer]:
    """Start `gunicorn -c deploy/gunicorn.conf.py wsgi:app` on a free loopback port; stop it after."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    full_env.update({"GLMVISION_BIND": f"127.0.0.1:{port}", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    full_env.update(env)
    log_path = tmp_path / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,  # its own process group, for tests that signal the group
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{server.log()}")
            try:
                if requests.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn not ready after {timeout}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(process, grace=30)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `predicate` every 0.1 s until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def server_env(model_dir: Path, runtime: Path, **settings: str) -> dict[str, str]:
    """Environment for live_server: the demo model on CPU, one worker, plus GLMVISION_<NAME> settings."""
    env = {
        "GLMVISION_MODEL": str(model_dir),
        "GLMVISION_DEVICE": "cpu",
        "GLMVISION_WORKERS": "1",
        "XDG_RUNTIME_DIR": str(runtime),
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.update({f"GLMVISION_{name}": value for name, value in settings.items()})
    return env


@functools.cache
def _demo_image_processor() -> Any:
    """The demo model's image processor (every demo model is built alike, so one is built here)."""
    import tempfile

    from transformers import AutoProcessor

    from glmvision.backends.local.demo import build_demo_model

    return AutoProcessor.from_pretrained(
        build_demo_model(tempfile.mkdtemp(prefix="gv-sizes-"))
    ).image_processor


def model_sees(width: int, height: int) -> list[int]:
    """[width, height] the demo model's processor turns an image of this size into (`resized_to`)."""
    processor = _demo_image_processor()
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
    return [int(grid[2]) * processor.patch_size, int(grid[1]) * processor.patch_size]


# Why a Redis test skips on a machine without Redis (the README's test command needs only Python).
NO_REDIS = "redis-server is not installed: `apt-get install redis-server` (as .ci/run does) runs this test"


def require_redis() -> None:
    """Skip the calling test where redis-server is missing; in CI (which installs it) fail instead."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the Redis tests: redis-server is missing")
        pytest.skip(NO_REDIS)


@contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """Run a throwaway redis-server on a free loopback port; yield the port (skip without Redis)."""
    import redis

    require_redis()

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        assert wait_for(answers, timeout=20), "redis-server did not answer PING"
        client.close()
        yield port
    finally:
        stop(process, grace=10)


def apart_from_reuse(usage: Any) -> Any:
    """A usage object (dict or openai model) as a dict without prompt_tokens_details.cached_tokens,
    which depends on what the engine ran before, not on the request."""
    data = dict(usage if isinstance(usage, dict) else usage.model_dump(exclude_none=True))
    details = dict(data.get("prompt_tokens_details") or {})
    details.pop("cached_tokens", None)
    data["prompt_tokens_details"] = {k: v for k, v in details.items() if v is not None}
    return data
