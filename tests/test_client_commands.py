"""`glmvision ask` and `glmvision batch`, run as real subprocesses against real gunicorn on the demo model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import ROOT, LiveServer, b64, free_port, image_bytes, live_server, server_env, wait_for

SCREENSHOT = ROOT / "tests" / "data" / "screenshot.png"
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir)
    with live_server(tmp_path_factory.mktemp("client"), env, ready_path="/readyz") as live:
        yield live


def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env["PYTHONIOENCODING"] = "utf-8"  # the demo model writes any character at all
    return env


def glmvision(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "glmvision.cli.main", *args],
        cwd=cwd,
        env=command_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
        check=False,
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ask_streams_the_answer_the_server_gives(server: LiveServer) -> None:
    common = ("--server", server.url, "--max-tokens", "6", "--temperature", "0")
    streamed = glmvision("ask", str(SCREENSHOT), "What is shown?", *common)
    assert streamed.returncode == 0, streamed.stderr
    whole = glmvision("ask", str(SCREENSHOT), "What is shown?", *common, "--json")
    assert whole.returncode == 0, whole.stderr
    answer = json.loads(whole.stdout)
    assert streamed.stdout == answer["answer"] + "\n"
    assert answer["usage"]["completion_tokens"] == 6 and answer["finish_reason"] == "length"
    assert answer["reasoning"] is None and isinstance(answer["latency_ms"], float)
    # The same question asked directly: the command sent the image and the settings as given.
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(SCREENSHOT.read_bytes())}},
        {"type": "text", "text": "What is shown?"},
    ]
    direct = requests.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0},
        timeout=60,
    ).json()
    assert direct["choices"][0]["message"]["content"] == answer["answer"]
    plain = glmvision("ask", str(SCREENSHOT), "What is shown?", *common, "--no-stream")
    assert plain.returncode == 0 and plain.stdout == streamed.stdout


def test_ask_with_think_sends_thinking_and_keeps_reasoning_off_stdout(server: LiveServer) -> None:
    result = glmvision(
        "ask", str(SCREENSHOT), "Think.", "--server", server.url, "--max-tokens", "4", "--think", "--json"
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) >= {"answer", "reasoning", "usage", "finish_reason", "latency_ms"}


def test_ask_failures_are_one_line_with_an_exit_code(server: LiveServer, tmp_path: Path) -> None:
    missing = glmvision("ask", str(tmp_path / "nope.png"), "Hi?", "--server", server.url)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [f"glmvision ask: no such file: {tmp_path / 'nope.png'}"]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image_bytes(64, 48)[:80])  # a PNG cut short
    refused = glmvision("ask", str(corrupt), "Hi?", "--server", server.url)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "(HTTP 400, invalid_image)" in refused.stderr
    nobody = glmvision("ask", str(SCREENSHOT), "Hi?", "--server", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 1 and "cannot reach the server" in nobody.stderr
    bad_url = glmvision("ask", str(SCREENSHOT), "Hi?", "--server", "ftp://example")
    assert bad_url.returncode == 2 and "must start with http://" in bad_url.stderr
    for result in (missing, refused, nobody, bad_url):
        assert "Traceback" not in result.stderr


def test_ask_reads_server_and_key_from_the_environment(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    env = server_env(demo_model_dir, runtime_dir, API_KEYS="sesame")
    with live_server(tmp_path, env, ready_path="/readyz") as keyed:
        base = [
            sys.executable,
            "-m",
            "glmvision.cli.main",
            "ask",
            str(SCREENSHOT),
            "Hi?",
            "--max-tokens",
            "2",
            "--json",
        ]
        run: dict[str, Any] = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": RUN_TIMEOUT}
        without = subprocess.run(
            base, env={**command_env(), "GLMVISION_SERVER": keyed.url}, **run, check=False
        )
        assert without.returncode == 1 and "(HTTP 401, missing_api_key)" in without.stderr
        with_key = {**command_env(), "GLMVISION_SERVER": keyed.url, "GLMVISION_KEY": "sesame"}
        answered = subprocess.run(base, env=with_key, **run, check=False)
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout)["usage"]["completion_tokens"] >= 1
    assert "GLMVISION_KEY" not in keyed.log() and "sesame" not in keyed.log()


def make_folder(root: Path, count: int) -> list[Path]:
    """`count` small PNGs of different sizes (one in a subfolder), plus a text file to be ignored."""
    root.mkdir()
    (root / "nested").mkdir()
    paths = []
    for index in range(count):
        folder = root / "nested" if index == 0 else root
        path = folder / f"shot-{index:02d}.png"
        path.write_bytes(image_bytes(40 + 4 * index, 30 + 2 * index))
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return paths


def test_batch_answers_a_folder_and_records_a_corrupt_image(server: LiveServer, tmp_path: Path) -> None:
    images = make_folder(tmp_path / "shots", 4)
    broken = tmp_path / "shots" / "broken.jpg"
    broken.write_bytes(image_bytes(64, 48, "JPEG")[:200])  # a JPEG cut short
    out = tmp_path / "results.jsonl"
    args = ("batch", str(tmp_path / "shots"), "--prompt", "Any defect?", "--out", str(out))
    settings = ("--server", server.url, "--max-tokens", "4", "--temperature", "0", "--concurrency", "2")
    result = glmvision(*args, *settings)
    assert result.returncode == 1, result.stderr  # not everything succeeded
    records = {record["path"]: record for record in lines(out)}
    assert set(records) == {str(path) for path in [*images, broken]}
    failed = records[str(broken)]
    assert failed["answer"] is None and failed["error"]["code"] == "invalid_image"
    assert failed["error"]["status"] == 400
    for path in images:
        record = records[str(path)]
        assert record["error"] is None and isinstance(record["answer"], str)
        assert record["usage"]["completion_tokens"] == 4 and record["latency_ms"] > 0
    assert "Traceback" not in result.stderr

    # Again: the answered ones are skipped, the failed one tried again (and its old line replaced).
    again = glmvision(*args, *settings)
    assert again.returncode == 1
    assert "resuming: 4 of 5 already in" in again.stderr
    assert sorted(record["path"] for record in lines(out)) == sorted(records)


def test_batch_resumes_after_an_interrupt(server: LiveServer, tmp_path: Path) -> None:
    images = make_folder(tmp_path / "many", 10)
    out = tmp_path / "results.jsonl"
    command = [
        sys.executable, "-m", "glmvision.cli.main", "batch", str(tmp_path / "many"), "--prompt", "Describe.",
        "--out", str(out), "--server", server.url, "--max-tokens", "24", "--temperature", "0.7",
        "--concurrency", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=command_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: out.exists() and out.read_text().count("\n") >= 2, timeout=RUN_TIMEOUT)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130, stderr
    assert "run again to resume" in stderr and "Traceback" not in stderr
    first = lines(out)  # every line whole
    assert 2 <= len(first) < len(images)

    resumed = glmvision(*command[3:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(first)} of {len(images)}" in resumed.stderr
    final = lines(out)
    assert final[: len(first)] == first  # what was there stays as it was
    assert sorted(record["path"] for record in final) == sorted(str(path) for path in images)
    assert all(record["error"] is None for record in final)


def test_batch_retries_after_a_503(tmp_path: Path, demo_model_dir: Path, runtime_dir: Path) -> None:
    # Room for two requests at once: the other four of six concurrent ones are refused with 503.
    env = server_env(demo_model_dir, runtime_dir, MAX_BATCH_SIZE="1", MAX_QUEUE="1", CACHE="0")
    images = make_folder(tmp_path / "six", 6)
    out = tmp_path / "results.jsonl"
    with live_server(tmp_path, env, ready_path="/readyz") as small:
        result = glmvision(
            "batch", str(tmp_path / "six"), "--prompt", "Describe.", "--out", str(out), "--server", small.url,
            "--max-tokens", "16", "--concurrency", "6", "--retries", "30",
        )  # fmt: skip
        log = small.log()
    assert result.returncode == 0, result.stderr
    records = lines(out)
    assert sorted(record["path"] for record in records) == sorted(str(path) for path in images)
    assert all(record["error"] is None for record in records)
    logged = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    refused = [line for line in logged if line["route"] == "/v1/chat/completions" and line["status"] == 503]
    assert refused, "no request was refused: the retry path was not exercised"
    assert {line["code"] for line in refused} <= {"overloaded", "preprocessing_busy", "queue_timeout"}


def test_batch_usage_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = glmvision("batch", str(empty), "--prompt", "Hi?", "--out", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2 and result.stderr.strip() == f"glmvision batch: no images found at {empty}"
    missing = glmvision("batch", str(empty))
    assert missing.returncode == 2 and "--prompt" in missing.stderr


def test_ask_draws_the_answers_boxes_over_the_image(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    from PIL import Image
    from test_upstream import Scripted, chunk

    canned = Scripted()  # the model's words, chosen: a box on the left half, labelled
    canned.events = [
        chunk(content='Here: {"bbox_2d": [0, 0, 500, 1000], "label": "left"}'),
        chunk("stop", {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
    ]
    photo = tmp_path / "photo.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(photo)
    env = server_env(demo_model_dir, runtime_dir, BACKEND="openai", UPSTREAM_URL=canned.url, CACHE="0")
    try:
        with live_server(tmp_path, env, ready_path="/readyz") as front:
            for stream in ([], ["--no-stream"]):
                out = tmp_path / f"boxes{len(stream)}.png"
                result = glmvision(
                    "ask", str(photo), "Where?", "--server", front.url, "--boxes", str(out), *stream
                )
                assert result.returncode == 0, result.stderr
                assert f"1 box drawn -> {out}" in result.stderr
                drawn = Image.open(out).convert("RGB")
                assert drawn.size == (200, 100)
                assert drawn.getpixel((0, 60)) == (224, 49, 49)  # the box's left edge, in the first colour
                assert drawn.getpixel((150, 60)) == (255, 255, 255)  # outside it, as it was
    finally:
        canned.server.shutdown()
        canned.server.server_close()
    url = glmvision("ask", "https://127.0.0.1/x.png", "Where?", "--boxes", str(tmp_path / "x.png"))
    assert url.returncode == 2 and "--boxes needs a local image file" in url.stderr
