"""The route table is the one source of route facts, and every consumer follows it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Blueprint, Flask
from flask.testing import FlaskClient

from glmvision.server.workers import PROBE_PATHS, is_probe
from glmvision.web.openapi import openapi_document, openapi_path
from glmvision.web.route_table import BY_ENDPOINT, ROUTES, route


def test_the_table_and_the_app_serve_the_same_routes(app: Flask) -> None:
    served = {
        rule.endpoint: (rule.rule, sorted(rule.methods - {"HEAD", "OPTIONS"}))  # type: ignore[operator]
        for rule in app.url_map.iter_rules()
    }
    listed = {facts.endpoint: (facts.path, [facts.method]) for facts in ROUTES}
    assert served == listed


def test_the_document_lists_every_route_but_the_page() -> None:
    paths = openapi_document()["paths"]
    documented = {(path, method.upper()) for path, operations in paths.items() for method in operations}
    expected = {(openapi_path(facts.path), facts.method) for facts in ROUTES if not facts.page}
    assert documented == expected


def test_public_routes_answer_without_a_key_and_the_rest_do_not(make_app: Callable[..., Flask]) -> None:
    app = make_app(api_keys="s3cret-key")
    client = app.test_client()
    for facts in ROUTES:
        if facts.method != "GET" or "<" in facts.path:
            continue
        status = client.get(facts.path).status_code
        if facts.public:
            assert status != 401, facts.path
        else:
            assert status == 401, facts.path
    assert client.post("/v1/chat/vision", json={}).status_code == 401


def test_only_liveness_is_outside_the_allowlist(make_app: Callable[..., Flask]) -> None:
    client = make_app(allowed_ips="10.0.0.0/8").test_client()  # the test client comes from 127.0.0.1
    for facts in ROUTES:
        if facts.method != "GET" or "<" in facts.path:
            continue
        status = client.get(facts.path).status_code
        assert (status == 403) == facts.allowlisted, facts.path


def test_openai_routes_answer_errors_in_openai_envelope(client: FlaskClient) -> None:
    for facts in ROUTES:
        if facts.method != "POST":
            continue
        body = client.post(facts.path, data="{", content_type="application/json").get_json()
        assert ("success" in body) != facts.openai, facts.path
        assert body["error"]["code"] == "invalid_json"


def test_the_probe_lane_takes_the_probe_paths_only() -> None:
    assert {path.decode() for path in PROBE_PATHS} == {"/healthz", "/health", "/readyz"}
    for facts in ROUTES:
        head = f"GET {facts.path} HTTP/1.1\r\n".encode()
        assert is_probe(head) == facts.probe, facts.path


def test_a_view_registers_only_on_its_own_blueprint() -> None:
    with pytest.raises(ValueError, match="belongs to blueprint 'api'"):
        route(Blueprint("openai", __name__), "api.healthz")
    assert BY_ENDPOINT["api.healthz"].path == "/healthz"


def test_the_security_facts_are_the_documented_ones() -> None:
    """A route that stops needing a key, or slips past the allowlist, is a change to review here."""
    public = {facts.path for facts in ROUTES if facts.public}
    assert public == {
        "/healthz",
        "/health",
        "/readyz",
        "/openapi.json",
        "/metrics",
        "/",
        "/static/<path:filename>",
    }
    assert [facts.path for facts in ROUTES if not facts.allowlisted] == ["/healthz", "/health"]
    assert {facts.path for facts in ROUTES if facts.openai} == {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/<path:model_id>",
        "/v1/responses",
        "/v1/responses/<response_id>",
        "/v1/usage",
    }


def test_route_registers_the_tables_path_method_and_name() -> None:
    bp = Blueprint("openai", __name__)

    @route(bp, "openai.chat_completions")
    def view() -> str:
        return "ok"

    app = Flask(__name__)
    app.register_blueprint(bp)
    (rule,) = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]
    assert (rule.rule, rule.endpoint) == ("/v1/chat/completions", "openai.chat_completions")
    assert sorted(rule.methods - {"OPTIONS"}) == ["POST"]  # type: ignore[operator]
    assert app.test_client().post("/v1/chat/completions").get_data(as_text=True) == "ok"
