"""Units of the client commands: retries and their waits, resuming an output file, finding images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmvision.client.batch import answered, find_images
from glmvision.client.http import ClientError, Server, image_url, with_retries


def failure(status: int | None, code: str = "overloaded", retry_after: float | None = None) -> ClientError:
    error = ClientError("busy", code, status)
    error.retry_after = retry_after
    return error


def test_retries_wait_retry_after_or_backoff_whichever_is_longer() -> None:
    waits: list[float] = []
    outcomes: list[object] = [
        failure(503, retry_after=3),
        failure(429),
        failure(None, "unreachable"),
        failure(None, "stream_broken"),
        failure(502),
        "done",
    ]

    def call() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, ClientError):
            raise outcome
        return outcome

    assert with_retries(call, retries=5, sleep=waits.append, base=0.1) == "done"
    assert len(waits) == 5
    assert waits[0] == 3  # Retry-After beats the first backoff (0.05..0.1 s)
    # Without Retry-After: 0.1 * 2**attempt, with jitter down to half of it.
    for attempt, wait in enumerate(waits[1:], start=1):
        assert 0.1 * 2**attempt / 2 <= wait <= 0.1 * 2**attempt, (attempt, wait)


def test_retries_give_up_after_their_count_and_never_retry_a_client_mistake() -> None:
    calls: list[int] = []

    def busy() -> None:
        calls.append(1)
        raise failure(503)

    with pytest.raises(ClientError):
        with_retries(busy, retries=2, sleep=lambda _: None)
    assert len(calls) == 3
    calls.clear()

    def refused() -> None:
        calls.append(1)
        raise failure(400, "invalid_image")

    with pytest.raises(ClientError):
        with_retries(refused, retries=5, sleep=lambda _: None)
    assert len(calls) == 1


def test_resuming_keeps_answers_and_drops_failures_and_broken_lines(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    good = {"path": "a.png", "answer": "x", "usage": None, "latency_ms": 1.0, "error": None}
    bad = {"path": "b.png", "answer": None, "usage": None, "latency_ms": 1.0, "error": {"code": "overloaded"}}
    twice = {**good, "answer": "again"}
    other = {**good, "path": "d.png"}
    lines = [json.dumps(good), json.dumps(bad), json.dumps(twice), json.dumps(other), '{"path": "c.p']
    out.write_text("\n".join(lines) + "\n")
    assert answered(out) == {"a.png", "d.png"}
    assert out.read_text() == json.dumps(good) + "\n" + json.dumps(other) + "\n"  # one line per image
    assert answered(tmp_path / "none.jsonl") == set()
    untouched = tmp_path / "clean.jsonl"
    untouched.write_text(json.dumps(good) + "\n")
    before = untouched.stat().st_mtime_ns
    assert answered(untouched) == {"a.png"} and untouched.stat().st_mtime_ns == before


def test_images_are_found_in_folders_and_globs(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "sub/c.webp", "notes.txt", "sub/d.gif.txt"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    assert find_images(str(tmp_path)) == [str(tmp_path / n) for n in ("a.jpg", "b.PNG", "sub/c.webp")]
    assert find_images(str(tmp_path / "*.jpg")) == [str(tmp_path / "a.jpg")]
    assert find_images(str(tmp_path / "**" / "*.webp")) == [str(tmp_path / "sub" / "c.webp")]
    assert find_images(str(tmp_path / "nothing")) == []


def test_image_urls_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert image_url("https://example.test/a.png") == "https://example.test/a.png"  # the server fetches it
    jpeg = tmp_path / "photo.bin"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0rest")
    assert image_url(str(jpeg)).startswith("data:image/jpeg;base64,")  # by its bytes, not its name
    with pytest.raises(ClientError, match="no such file") as raised:
        image_url(str(tmp_path / "missing.png"))
    assert raised.value.code == "file_not_found"
    monkeypatch.setenv("GLMVISION_SERVER", "http://127.0.0.9:9000/")
    monkeypatch.setenv("GLMVISION_KEY", "from-env")
    assert Server.from_args(None, None) == Server("http://127.0.0.9:9000", "from-env")
    assert Server.from_args("http://127.0.0.1:1", "flag").key == "flag"
    with pytest.raises(ClientError, match="must start with"):
        Server.from_args("127.0.0.1:8080", None)


@pytest.mark.parametrize(
    ("name", "head", "mime"),
    [
        ("a.bin", b"\x89PNG\r\n\x1a\nrest", "image/png"),
        ("a.bin", b"\xff\xd8\xffrest", "image/jpeg"),
        ("a.bin", b"GIF89arest", "image/gif"),
        ("a.bin", b"BMrest", "image/bmp"),
        ("a.bin", b"RIFF\x00\x00\x00\x00WEBPrest", "image/webp"),
        ("a.png", b"unknown", "image/png"),  # by its name when its bytes say nothing
        ("a.qqq", b"unknown", "application/octet-stream"),
    ],
)
def test_a_file_becomes_a_data_url_of_its_own_bytes(
    tmp_path: Path, name: str, head: bytes, mime: str
) -> None:
    import base64

    path = tmp_path / name
    path.write_bytes(head)
    url = image_url(str(path))
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix) and base64.b64decode(url[len(prefix) :]) == head


def test_urls_pass_through_and_bad_sources_say_why(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1/a.png", "https://127.0.0.1/a.png", "data:image/png;base64,AAAA"):
        assert image_url(url) == url
    with pytest.raises(ClientError, match="is a directory") as raised:
        image_url(str(tmp_path))
    assert raised.value.code == "file_not_found" and raised.value.status is None
    missing = ClientError("gone", "file_not_found")
    assert missing.as_dict() == {"code": "file_not_found", "message": "gone", "status": None}


def test_server_defaults_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLMVISION_SERVER", raising=False)
    monkeypatch.delenv("GLMVISION_KEY", raising=False)
    local = Server.from_args(None, None)
    assert local == Server("http://127.0.0.1:8080", None, 300.0) and local.headers() == {}
    keyed = Server.from_args("https://127.0.0.9/", "k", timeout=5)
    assert keyed == Server("https://127.0.0.9", "k", 5) and keyed.headers() == {"Authorization": "Bearer k"}
    monkeypatch.setenv("GLMVISION_KEY", "")
    assert Server.from_args(None, None).key is None
