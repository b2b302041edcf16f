"""Hostile but small requests (issue 19): bodies, prompt limits, the cache's scope, secrets on disk.

Each class tries one finding through the app on the demo model; the last test replays them against
real gunicorn and checks that the worker that took them is still the one answering.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from helpers import ROOT, LiveServer, image_b64, live_server, server_env, vision_body

from glmvision.core.jsontext import MAX_JSON_DEPTH, json_depth, parse_json_text
from glmvision.web.state import app_state

VISION, SEED, COMPLETIONS = "/v1/chat/vision", "/v1/chat", "/v1/chat/completions"
# One minimal valid body per POST route with a JSON body.
BODIES: dict[str, dict[str, Any]] = {
    VISION: {"image": image_b64(), "prompt": "What is this?", "max_new_tokens": 2},
    SEED: {"image_url": image_b64(), "prompt": "What is this?", "max_new_tokens": 2},
    COMPLETIONS: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}
# Where each route takes a free-form JSON value that a hostile client can nest or fill with numbers.
FREE_FIELD = {VISION: "json_schema", SEED: "json_schema", COMPLETIONS: "tools"}


def nested(depth: int) -> Any:
    """An array nested `depth` deep (depth 1 is [0])."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def deep_schema(depth: int) -> dict[str, Any]:
    """A schema whose `default` nests `depth` deep inside it."""
    return {"type": "object", "default": nested(depth)}


def with_free_value(route: str, value: Any) -> dict[str, Any]:
    """The route's body with `value` where the route takes free-form JSON."""
    body = dict(BODIES[route])
    if FREE_FIELD[route] == "tools":
        parameters = {"type": "object", "properties": {"x": {"type": "number", "default": value}}}
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    else:
        body["json_schema"] = {"type": "object", "default": value}
    return body


def post_raw(client: FlaskClient, route: str, text: str) -> Any:
    return client.post(route, data=text, content_type="application/json")


def error_of(response: Any) -> dict[str, Any]:
    return response.get_json()["error"]


class TestBodies:
    """Non-finite numbers and deep nesting are the client's 400, on every route with a body."""

    @pytest.mark.parametrize("route", list(BODIES))
    @pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1.5e400"])
    def test_non_finite_literals_are_invalid_json(
        self, client: FlaskClient, route: str, literal: str
    ) -> None:
        text = json.dumps(with_free_value(route, "PLACEHOLDER")).replace('"PLACEHOLDER"', literal)
        response = post_raw(client, route, text)
        assert response.status_code == 400
        assert error_of(response)["code"] == "invalid_json"
        assert "NaN, Infinity" in error_of(response)["message"]

    @pytest.mark.parametrize("route", list(BODIES))
    def test_a_sampling_field_cannot_be_nan(self, client: FlaskClient, route: str) -> None:
        text = json.dumps({**BODIES[route], "temperature": 0.5}).replace("0.5", "NaN")
        assert error_of(post_raw(client, route, text))["code"] == "invalid_json"

    @pytest.mark.parametrize("route", list(BODIES))
    def test_a_body_nested_900_deep_is_refused(self, client: FlaskClient, route: str) -> None:
        response = client.post(route, json=with_free_value(route, nested(900)))
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "json_too_deep"
        assert str(MAX_JSON_DEPTH) in error["message"] and "GLMVISION_MAX_JSON_DEPTH" in error["message"]

    @pytest.mark.parametrize("route", list(BODIES))
    def test_deeper_than_the_parser_itself_goes_is_refused(self, client: FlaskClient, route: str) -> None:
        # Past Python's recursion limit json.loads raises RecursionError: still the same 400.
        text = json.dumps(BODIES[route])[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        response = post_raw(client, route, text)
        assert (response.status_code, error_of(response)["code"]) == (400, "json_too_deep")
        assert f"more than {MAX_JSON_DEPTH} deep" in error_of(response)["message"]

    def test_the_depth_limit_is_exact_and_a_setting(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(max_json_depth=8).test_client()
        # The body is depth 1, json_schema 2: an array nested 6 deep in it fills 3 to exactly 8.
        assert client.post(VISION, json=with_free_value(VISION, nested(6))).status_code == 200
        response = client.post(VISION, json=with_free_value(VISION, nested(7)))
        assert (response.status_code, error_of(response)["code"]) == (400, "json_too_deep")
        assert "8 deep" in error_of(response)["message"]

    def test_earlier_tool_call_arguments_are_parsed_strictly(self, client: FlaskClient) -> None:
        where = "messages.1.tool_calls.0.function.arguments"
        cases = {
            json.dumps({"a": nested(900)}): "nested more than",
            '{"a": NaN}': "NaN is not a JSON value",
            '{"a": Infinity}': "Infinity is not a JSON value",
            '{"a": 1e999}': "1e999 is too large a number",
        }
        for arguments, reason in cases.items():
            call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
            messages = [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ]
            response = client.post(COMPLETIONS, json={"messages": messages, "max_tokens": 2})
            assert response.status_code == 400, arguments
            assert (error_of(response)["code"], error_of(response)["param"]) == ("invalid_value", where)
            assert reason in error_of(response)["message"]

    def test_json_depth_counts_arrays_and_objects(self) -> None:
        assert json_depth(1, 10) == 0
        assert json_depth([], 10) == 1
        assert json_depth({"a": [1, {"b": []}]}, 10) == 4
        assert json_depth([[[0]], 1], 10) == 3  # a scalar met first does not end the walk
        assert json_depth(nested(50), 10) == 11  # stops counting just past the limit
        with pytest.raises(ValueError):
            parse_json_text('{"a": [[1]]}', 2)
        assert parse_json_text('{"a": [[1]]}', 3) == {"a": [[1]]}
        for text in ("[NaN]", "[1e999]", "[-Infinity]"):
            with pytest.raises(ValueError):
                parse_json_text(text, 3)
        assert parse_json_text("[1e308, 12345678901234567890]", 3) == [1e308, 12345678901234567890]


class TestPromptLimits:
    """The prompt is counted in tokens after the chat template, image tokens included."""

    def test_messages_are_capped(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(max_messages=4).test_client()
        messages = [{"role": "user", "content": "x"}] * 5
        response = client.post(COMPLETIONS, json={"messages": messages, "max_tokens": 2})
        assert response.status_code == 400
        assert (error_of(response)["code"], error_of(response)["param"]) == ("too_many_messages", "messages")
        assert "5 messages" in error_of(response)["message"]
        assert client.post(COMPLETIONS, json={"messages": messages[:4], "max_tokens": 2}).status_code == 200

    def test_fifteen_thousand_one_character_messages_are_refused_at_once(self, client: FlaskClient) -> None:
        messages = [{"role": "user", "content": "x"}] * 15_001  # 15,001 characters pass the 16,000 limit
        response = client.post(COMPLETIONS, json={"messages": messages, "max_tokens": 2})
        assert (response.status_code, error_of(response)["code"]) == (400, "too_many_messages")

    def test_the_token_limit_is_exact_and_names_both_numbers(self, make_app: Callable[..., Flask]) -> None:
        body = vision_body(max_new_tokens=2, temperature=0)
        measured = make_app(cache=False).test_client().post(VISION, json=body).get_json()
        tokens = measured["usage"]["prompt_tokens"]
        at_limit = make_app(max_prompt_tokens=tokens, cache=False).test_client()
        assert at_limit.post(VISION, json=body).status_code == 200
        response = make_app(max_prompt_tokens=tokens - 1, cache=False).test_client().post(VISION, json=body)
        assert response.status_code == 400
        error = error_of(response)
        assert (error["code"], error["param"]) == ("prompt_too_long", "prompt")
        assert f"{tokens} tokens" in error["message"] and f"at most {tokens - 1}" in error["message"]

    def test_image_tokens_count(self, make_app: Callable[..., Flask]) -> None:
        small = vision_body(max_new_tokens=2, image=image_b64(28, 28))
        large = vision_body(max_new_tokens=2, image=image_b64(512, 512))
        tokens = make_app().test_client().post(VISION, json=small).get_json()["usage"]["prompt_tokens"]
        client = make_app(max_prompt_tokens=tokens).test_client()
        assert client.post(VISION, json=small).status_code == 200
        assert error_of(client.post(VISION, json=large))["code"] == "prompt_too_long"

    def test_by_default_the_context_must_hold_prompt_and_answer(self, make_app: Callable[..., Flask]) -> None:
        client = make_app(max_new_tokens=70_000).test_client()
        messages = [{"role": "user", "content": "Hi"}]
        # The demo model's context is 65,536 tokens: an answer of 65,530 leaves 6 for the prompt.
        response = client.post(COMPLETIONS, json={"messages": messages, "max_tokens": 65_530})
        assert response.status_code == 400
        error = error_of(response)
        assert (error["code"], error["param"]) == ("prompt_too_long", "messages")
        assert "at most 6 " in error["message"] and "65536" in error["message"]


class TestCacheScope:
    """One API key never gets another key's cached answer unless the operator says so."""

    @staticmethod
    def loaded(app: Flask) -> FlaskClient:
        """A client of `app` with its model loaded: before that, nothing is cached (sizes are unknown)."""
        client = app.test_client()
        warm_up = vision_body(prompt="Loading?", max_new_tokens=1)
        assert client.post(VISION, json=warm_up, headers={"Authorization": "Bearer alpha"}).status_code == 200
        return client

    @staticmethod
    def ask(client: FlaskClient, key: str) -> str:
        body = vision_body(temperature=0, max_new_tokens=3)
        response = client.post(VISION, json=body, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        return response.headers["X-Cache"]

    def test_scoped_to_the_key_by_default(self, make_app: Callable[..., Flask]) -> None:
        client = self.loaded(make_app(api_keys="alpha,beta"))
        assert self.ask(client, "alpha") == "miss"
        assert self.ask(client, "alpha") == "hit"
        assert self.ask(client, "beta") == "miss"
        assert self.ask(client, "beta") == "hit"

    def test_global_scope_shares_answers(self, make_app: Callable[..., Flask]) -> None:
        client = self.loaded(make_app(api_keys="alpha,beta", cache_scope="global"))
        assert self.ask(client, "alpha") == "miss"
        assert self.ask(client, "beta") == "hit"

    def test_perceptual_matches_are_scoped_too(self, make_app: Callable[..., Flask]) -> None:
        client = self.loaded(make_app(api_keys="alpha,beta", cache_phash_distance=8))
        png = vision_body(temperature=0, max_new_tokens=3, image=image_b64(128, 96))
        jpeg = {**png, "image": image_b64(128, 96, "JPEG", quality=90)}
        assert client.post(VISION, json=png, headers={"Authorization": "Bearer alpha"}).status_code == 200
        near = client.post(VISION, json=jpeg, headers={"Authorization": "Bearer alpha"})
        assert near.headers["X-Cache"] == "hit"  # the same key finds the close image
        other = client.post(VISION, json=jpeg, headers={"Authorization": "Bearer beta"})
        assert other.headers["X-Cache"] == "miss"


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    return subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0o022); from glmvision.cli.main import main; "
         "sys.exit(main(sys.argv[1:]))", "audit-keygen", *args],
        capture_output=True, text=True, env=environ, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_audit_keygen_writes_its_key_for_the_owner_only(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    path = tmp_path / "audit.key"
    made = keygen("--out", str(path))
    assert made.returncode == 0, made.stderr
    assert made.stdout == ""  # the key is in the file, not on the terminal
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    Fernet(path.read_text().strip())
    again = keygen("--out", str(path))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, API_KEYS="alpha,beta")
    with live_server(tmp_path_factory.mktemp("hardening"), env, ready_path="/readyz") as live:
        yield live


def test_on_gunicorn_each_hostile_body_is_a_400_and_the_worker_stays(server: LiveServer) -> None:
    """The reproductions of findings 3, 6, 7 and 8 and a row's dead end on real gunicorn, then answers."""
    alpha, beta = ({"Authorization": f"Bearer {key}"} for key in ("alpha", "beta"))
    json_headers = {**alpha, "Content-Type": "application/json"}
    workers = server.worker_pids()
    assert workers
    tools_default_nan = json.dumps(with_free_value(COMPLETIONS, "X")).replace('"X"', "NaN")
    temperature_inf = json.dumps({**BODIES[VISION], "temperature": 1.5}).replace("1.5", "Infinity")
    for route, data in ((COMPLETIONS, tools_default_nan), (VISION, temperature_inf)):
        response = requests.post(server.url + route, data=data, headers=json_headers, timeout=60)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_json")
    for route in BODIES:
        response = requests.post(
            server.url + route, json=with_free_value(route, nested(900)), headers=alpha, timeout=60
        )
        assert (response.status_code, response.json()["error"]["code"]) == (400, "json_too_deep")
    messages = [{"role": "user", "content": "x"}] * 15_001
    response = requests.post(
        server.url + COMPLETIONS, json={"messages": messages, "max_tokens": 2}, headers=alpha, timeout=60
    )
    assert (response.status_code, response.json()["error"]["code"]) == (400, "too_many_messages")

    # A schema that recurses with no way out (it grew a worker to 22 GB) and one the vocabulary cannot
    # spell (a row that fails alone): each is its own 400, and the worker goes on.
    recursive = {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}
    for schema in (recursive, TestGrammarDeadEnd.SCHEMA):
        constrained = {**BODIES[VISION], "json_schema": schema, "temperature": 0}
        response = requests.post(server.url + VISION, json=constrained, headers=alpha, timeout=60)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "schema_unsupported")

    body = vision_body(temperature=0, max_new_tokens=3)
    first = requests.post(server.url + VISION, json=body, headers=alpha, timeout=60)
    repeat = requests.post(server.url + VISION, json=body, headers=alpha, timeout=60)
    other = requests.post(server.url + VISION, json=body, headers=beta, timeout=60)
    assert [r.status_code for r in (first, repeat, other)] == [200, 200, 200]
    assert [r.headers["X-Cache"] for r in (first, repeat, other)] == ["miss", "hit", "miss"]
    assert server.worker_pids() == workers
    assert "Traceback" not in server.log()


class TestGrammarDeadEnd:
    """A schema the vocabulary cannot spell (the fuzz test found one) is that request's 400, not a 503."""

    # U+D7FF is ED 9F BF in UTF-8: the vocabulary's lone 0xED token is barred (it may begin a
    # surrogate), and the demo vocabulary has no merged token for it. Nothing can follow the quote.
    SCHEMA: dict[str, Any] = {"enum": ["\ud7ff"]}

    @pytest.mark.parametrize("scheduler", ["continuous", "static"])
    def test_the_request_gets_schema_unsupported(
        self, make_app: Callable[..., Flask], scheduler: str
    ) -> None:
        client = make_app(scheduler=scheduler, cache=False).test_client()
        body = {**BODIES[VISION], "json_schema": self.SCHEMA, "temperature": 0, "max_new_tokens": 8}
        response = client.post(VISION, json=body)
        assert response.status_code == 400, response.get_json()
        error = error_of(response)
        assert (error["code"], error["param"]) == ("schema_unsupported", "json_schema")
        assert "vocabulary" in error["message"]
        fine = client.post(VISION, json={**body, "json_schema": {"enum": ["ok", 3]}})
        assert fine.status_code == 200 and json.loads(fine.get_json()["result"]) in ("ok", 3)

    def test_streamed_it_ends_with_the_error_event(self, client: FlaskClient) -> None:
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": self.SCHEMA}}
        body = {**BODIES[COMPLETIONS], "response_format": response_format, "stream": True, "temperature": 0}
        events = [line[6:] for line in client.post(COMPLETIONS, json=body).get_data(as_text=True).splitlines()
                  if line.startswith("data: ")]  # fmt: skip
        errors = [json.loads(event)["error"] for event in events if event != "[DONE]" and "error" in event]
        assert [error["code"] for error in errors] == ["schema_unsupported"]

    def test_the_closing_walk_counts_a_dead_end_as_no_way_to_close(
        self, make_app: Callable[..., Flask]
    ) -> None:
        import torch

        from glmvision.backends.local.grammar import LONGEST_CLOSING, DeadEnd
        from glmvision.core.generation import Constraint

        app = make_app()
        app.test_client().post(VISION, json=BODIES[VISION])  # loads the model
        loaded = app_state(app).service.backend.holder.loaded
        compiled = loaded.grammars().compile(Constraint(json.dumps(self.SCHEMA)))
        row = compiled.start(budget=64, after_thinking=False)
        quote = loaded.processor.tokenizer.convert_tokens_to_ids('"')
        assert row._length_to_close(row._matcher) == LONGEST_CLOSING
        row.accept(quote)
        with pytest.raises(DeadEnd):
            row.constrain(torch.zeros(1, compiled.book.vocab_size), generated=1)
