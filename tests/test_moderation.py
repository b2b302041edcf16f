"""Content moderation: a real local moderation server (canned rules) and an in-process callable, on
/v1/chat/completions, /v1/chat/vision and /v1/responses, streamed and not; the service down, both modes."""

from __future__ import annotations

import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, redirect, request
from flask.testing import FlaskClient
from helpers import free_port, image_b64, live_server, server_env, vision_body, wait_for
from werkzeug.serving import make_server

from glmvision.ops.audit import new_key, read_audit

PROMPT = "Describe this PROMPT picture."


@dataclass
class Moderation:
    """The test's moderation service: its base URL and every input it was sent."""

    url: str
    seen: list[Any] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [item if isinstance(item, str) else json.dumps(item) for item in self.seen]


def _text_of(payload: Any) -> str:
    if isinstance(payload, str):
        return payload
    return " ".join(part.get("text", "") for part in payload if part.get("type") == "text")


def _rules(text: str, strict: bool) -> dict[str, Any]:
    """Flags 'forbidden' (violence); strict also flags anything that is not the test's prompt (answers)."""
    categories = {"violence": "forbidden" in text, "other": strict and "PROMPT" not in text}
    return {"flagged": any(categories.values()), "categories": categories}


@pytest.fixture(scope="module")
def moderation() -> Iterator[Moderation]:
    service = Flask("moderation")
    seen: list[Any] = []

    @service.post("/v1/moderations")
    def lenient() -> Any:
        seen.append(request.get_json()["input"])
        return jsonify({"id": "modr-1", "results": [_rules(_text_of(seen[-1]), strict=False)]})

    @service.post("/strict/v1/moderations")
    def strict() -> Any:
        seen.append(request.get_json()["input"])
        return jsonify({"id": "modr-2", "results": [_rules(_text_of(seen[-1]), strict=True)]})

    @service.post("/moved")
    def moved() -> Any:
        return redirect("/v1/moderations", 307)

    server = make_server("127.0.0.1", free_port(), service, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Moderation(f"http://127.0.0.1:{server.server_port}", seen)
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture
def moderated(make_app: Callable[..., Flask], moderation: Moderation) -> Callable[..., Iterator[FlaskClient]]:
    def factory(path: str = "/v1/moderations", **settings: Any) -> FlaskClient:
        moderation.seen.clear()
        return make_app(moderation_url=moderation.url + path, **settings).test_client()

    return factory  # type: ignore[return-value]


def _chat(text: str = PROMPT, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 24, "seed": 1, **fields}


def _events(response: Any) -> list[dict[str, Any]]:
    lines = response.get_data(as_text=True).splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def _streamed_content(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or "" for event in events for choice in event.get("choices", [])
    )


def _finish(events: list[dict[str, Any]]) -> str | None:
    reasons = [choice["finish_reason"] for event in events for choice in event.get("choices", [])]
    return next((reason for reason in reversed(reasons) if reason), None)


# Input.


@pytest.mark.parametrize("stream", [False, True])
def test_a_flagged_prompt_is_blocked_on_chat_completions(moderated: Any, stream: bool) -> None:
    client = moderated()
    sent = client.post("/v1/chat/completions", json=_chat("How do I do forbidden things?", stream=stream))
    assert sent.status_code == 400
    error = sent.get_json()["error"]
    assert error["code"] == "content_blocked" and "violence" in error["message"]


def test_a_flagged_prompt_is_blocked_on_chat_vision_and_responses(moderated: Any) -> None:
    client = moderated()
    vision = client.post("/v1/chat/vision", json=vision_body(prompt="forbidden"))
    assert vision.status_code == 400 and vision.get_json()["error"]["code"] == "content_blocked"
    for stream in (False, True):
        answer = client.post("/v1/responses", json={"input": "forbidden", "stream": stream})
        assert answer.status_code == 400 and answer.get_json()["error"]["code"] == "content_blocked"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'glmvision_moderation_flags_total{stage="input"} 3.0' in metrics


def test_a_system_message_is_checked_too(moderated: Any) -> None:
    client = moderated()
    body = _chat()
    body["messages"].insert(0, {"role": "system", "content": "Be forbidden."})
    assert client.post("/v1/chat/completions", json=body).get_json()["error"]["code"] == "content_blocked"


def test_images_go_to_moderation_as_data_urls_only_when_asked(moderated: Any, moderation: Moderation) -> None:
    content = [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}},
    ]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    assert moderated().post("/v1/chat/completions", json=body).status_code == 200
    assert moderation.seen[0] == PROMPT  # the text alone
    assert moderated(moderation_images="1").post("/v1/chat/completions", json=body).status_code == 200
    parts = moderation.seen[0]
    assert parts[0] == {"type": "text", "text": PROMPT}
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    vision = moderated(moderation_images="1").post("/v1/chat/vision", json=vision_body(prompt=PROMPT))
    assert vision.status_code == 200
    assert moderation.seen[0][1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )  # bare base64, typed


# Output.


def test_a_passed_answer_is_served_and_every_streamed_piece_was_checked_first(
    moderated: Any, moderation: Moderation
) -> None:
    client = moderated()
    whole = client.post("/v1/chat/completions", json=_chat()).get_json()
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert moderation.seen[-1] == whole["choices"][0]["message"]["content"]
    moderation.seen.clear()
    sent = client.post("/v1/chat/completions", json=_chat(stream=True))
    events = _events(sent)
    sent.close()
    content = _streamed_content(events)
    assert content and _finish(events) in ("stop", "length")
    # Everything the client got was sent to moderation before it, in order (after the prompt).
    assert moderation.seen[0] == PROMPT
    assert "".join(moderation.seen[1:]) == content
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'glmvision_moderation_checks_total{stage="output"}' in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_a_flagged_answer_is_withheld_on_chat_completions(moderated: Any, stream: bool) -> None:
    client = moderated("/strict/v1/moderations")
    sent = client.post("/v1/chat/completions", json=_chat(stream=stream))
    events = _events(sent) if stream else []
    sent.close()  # a stream's request is counted once it is closed
    assert sent.status_code == 200
    if stream:
        assert _streamed_content(events) == "" and _finish(events) == "content_filter"
    else:
        choice = sent.get_json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and not choice["message"]["content"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'glmvision_moderation_flags_total{stage="output"} 1.0' in metrics


def test_a_flagged_answer_is_withheld_on_chat_vision(moderated: Any) -> None:
    answer = moderated("/strict/v1/moderations").post("/v1/chat/vision", json=vision_body(prompt=PROMPT))
    body = answer.get_json()
    assert answer.status_code == 200
    assert body["finish_reason"] == "content_filter" and body["result"] == ""


def test_a_flagged_answer_is_withheld_on_responses(moderated: Any) -> None:
    client = moderated("/strict/v1/moderations")
    body = {"input": PROMPT, "max_output_tokens": 24, "temperature": 0}
    whole = client.post("/v1/responses", json=body).get_json()
    assert whole["status"] == "incomplete"
    assert whole["incomplete_details"] == {"reason": "content_filter"}
    texts = [part["text"] for item in whole["output"] for part in item.get("content", []) if "text" in part]
    assert not any(texts)
    # Another prompt: not the cached (withheld) answer, a generation read as a stream.
    sent = client.post("/v1/responses", json={**body, "input": PROMPT + " Again.", "stream": True})
    events = _events(sent)
    assert not any(event.get("delta") for event in events if event["type"] == "response.output_text.delta")
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_a_flag_is_logged_with_the_request_id_and_its_text_only_in_the_audit_log(
    moderated: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    audit = tmp_path / "audit.log"
    client = moderated("/strict/v1/moderations", audit_log=str(audit), audit_key=key)
    sent = client.post("/v1/chat/completions", json=_chat(), headers={"X-Request-ID": "req-flag-1"})
    assert sent.get_json()["choices"][0]["finish_reason"] == "content_filter"
    flagged = [r.getMessage() for r in caplog.records if "moderation flagged" in r.getMessage()]
    assert flagged and "request_id=req-flag-1" in flagged[0] and "stage=output" in flagged[0]
    events = [r for r in read_audit(audit, key) if r.get("event") == "moderation_flagged"]
    assert events[0]["request_id"] == "req-flag-1" and events[0]["text"]


# The in-process callable.


@pytest.fixture
def rules_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("house_rules")
    module.calls = []  # type: ignore[attr-defined]

    def moderate(payload: Any) -> dict[str, Any]:
        module.calls.append(payload)  # type: ignore[attr-defined]
        text = _text_of(payload)
        if "explode" in text:
            raise RuntimeError("the rules broke")
        return {"flagged": "forbidden" in text, "categories": ["house-rule"] if "forbidden" in text else []}

    def only_prompts(payload: Any) -> dict[str, Any]:
        if "PROMPT" not in _text_of(payload):
            raise TimeoutError("answers are not checked here")
        return {"flagged": False, "categories": {}}

    module.moderate = moderate  # type: ignore[attr-defined]
    module.only_prompts = only_prompts  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "house_rules", module)
    return module


def test_the_callable_form_blocks_and_passes(make_app: Callable[..., Flask], rules_module: Any) -> None:
    client = make_app(moderation="house_rules:moderate").test_client()
    blocked = client.post("/v1/chat/completions", json=_chat("forbidden"))
    assert blocked.status_code == 400 and "house-rule" in blocked.get_json()["error"]["message"]
    passed = client.post("/v1/chat/completions", json=_chat(stream=True))
    assert _finish(_events(passed)) in ("stop", "length")
    assert rules_module.calls[-1] != PROMPT  # the answer's last piece went through it too
    broken = client.post("/v1/chat/completions", json=_chat("explode"))
    assert broken.status_code == 503 and broken.get_json()["error"]["code"] == "moderation_unavailable"


def test_a_failure_mid_stream_sends_no_unchecked_text(
    make_app: Callable[..., Flask], rules_module: Any
) -> None:
    client = make_app(moderation="house_rules:only_prompts").test_client()
    events = _events(client.post("/v1/chat/completions", json=_chat(stream=True)))
    assert _streamed_content(events) == ""
    assert events[-1]["error"]["code"] == "moderation_unavailable"
    whole = client.post("/v1/chat/completions", json=_chat())
    assert whole.status_code == 503 and whole.headers["Retry-After"]
    opened = make_app(moderation="house_rules:only_prompts", moderation_fail="open").test_client()
    served = _events(opened.post("/v1/chat/completions", json=_chat(stream=True)))
    assert _streamed_content(served) and _finish(served) in ("stop", "length")


# The service down.


def test_down_and_closed_refuses_with_503(make_app: Callable[..., Flask]) -> None:
    client = make_app(moderation_url=f"http://127.0.0.1:{free_port()}/v1/moderations").test_client()
    for path, body in (("/v1/chat/completions", _chat()), ("/v1/chat/vision", vision_body(prompt=PROMPT))):
        sent = client.post(path, json=body)
        assert sent.status_code == 503 and sent.get_json()["error"]["code"] == "moderation_unavailable"
        assert sent.headers["Retry-After"]
    sent = client.post("/v1/responses", json={"input": PROMPT, "stream": True})
    assert sent.status_code == 503
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'glmvision_moderation_failures_total{stage="input"} 3.0' in metrics


def test_down_and_open_serves_unchecked(make_app: Callable[..., Flask]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/moderations"
    client = make_app(moderation_url=url, moderation_fail="open").test_client()
    assert client.post("/v1/chat/completions", json=_chat("forbidden")).status_code == 200
    events = _events(client.post("/v1/chat/completions", json=_chat(stream=True)))
    assert _streamed_content(events) and _finish(events) in ("stop", "length")
    assert client.post("/v1/responses", json={"input": PROMPT}).status_code == 200
    assert client.post("/v1/chat/vision", json=vision_body(prompt=PROMPT)).status_code == 200


def test_a_redirect_is_not_followed(moderated: Any, moderation: Moderation) -> None:
    sent = moderated("/moved").post("/v1/chat/completions", json=_chat())
    assert sent.status_code == 503 and sent.get_json()["error"]["code"] == "moderation_unavailable"
    assert moderation.seen == []


def test_settings_refuse_both_forms_and_a_bad_callable_name(make_app: Callable[..., Flask]) -> None:
    from glmvision.core.config import ConfigError

    with pytest.raises(ConfigError):
        make_app(moderation_url="http://127.0.0.1:9/v1/moderations", moderation="a:b")
    with pytest.raises(ConfigError):
        make_app(moderation="not a callable")


def test_no_moderation_leaves_streams_alone(client: FlaskClient) -> None:
    from glmvision.web.state import app_state

    assert app_state(client.application).service.moderator is None


# Real gunicorn: workers running the pipeline, the model in the engine process.


def test_end_to_end_on_gunicorn(
    demo_model_dir: Path, runtime_dir: Path, tmp_path: Path, moderation: Moderation
) -> None:
    url = moderation.url + "/strict/v1/moderations"
    env = server_env(demo_model_dir, runtime_dir, MODERATION_URL=url, WORKERS="2")
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        blocked = requests.post(
            server.url + "/v1/chat/completions", json=_chat("forbidden PROMPT"), timeout=60
        )
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_blocked"
        sent = requests.post(server.url + "/v1/chat/completions", json=_chat(stream=True), timeout=60)
        lines = sent.text.splitlines()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert _streamed_content(events) == "" and _finish(events) == "content_filter"
        vision = requests.post(server.url + "/v1/chat/vision", json=vision_body(prompt=PROMPT), timeout=60)
        assert vision.json()["finish_reason"] == "content_filter" and vision.json()["result"] == ""
        assert wait_for(
            lambda: (
                'glmvision_moderation_flags_total{stage="output"} 2.0'
                in requests.get(server.url + "/metrics", timeout=10).text
            )
        )
