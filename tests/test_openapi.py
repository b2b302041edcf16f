"""GET /openapi.json: public, built from the models, covering every route and every documented error."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import ROOT

from glmvision.web.openapi import openapi_path

# Rows of docs/errors.md's table: | 400 | `invalid_json` | ...
ERROR_ROW = re.compile(r"^\| (\d{3}) \| `([a-z0-9_]+)` \|", re.MULTILINE)


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def page_errors() -> dict[str, int]:
    """code -> status, from docs/errors.md's table."""
    rows = ERROR_ROW.findall((ROOT / "docs" / "errors.md").read_text(encoding="utf-8"))
    return {code: int(status) for status, code in rows}


def documented_errors(document: dict[str, Any]) -> dict[str, set[int]]:
    """code -> statuses, from every operation's error responses."""
    found: dict[str, set[int]] = {}
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                schema = response["content"].get("application/json", {}).get("schema", {})
                for part in schema.get("allOf", []):
                    codes = part.get("properties", {}).get("error", {}).get("properties", {}).get("code")
                    for code in (codes or {}).get("enum", []):
                        found.setdefault(code, set()).add(int(status))
    return found


def test_document_is_openapi_3_1_with_both_key_schemes(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <key>",
    }
    assert schemes["apiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}


def test_every_route_of_the_app_is_documented(app: Flask, document: dict[str, Any]) -> None:
    served = {
        (openapi_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static" and not rule.endpoint.startswith("page.")  # the browser page is no API
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert documented == served
    assert {path for path, _ in served} >= {
        "/healthz",
        "/readyz",
        "/v1/models",
        "/v1/chat/vision",
        "/v1/chat",
        "/v1/chat/completions",
        "/openapi.json",
        "/health",
        "/v1/models/{model_id}",
        "/v1/responses",
        "/v1/responses/{response_id}",
    }


def test_every_documented_error_code_is_in_the_document(document: dict[str, Any]) -> None:
    table = page_errors()
    assert len(table) > 30  # the table was found and read
    listed = {
        item["const"]: item["description"] for item in document["components"]["schemas"]["ErrorCode"]["oneOf"]
    }
    assert set(listed) == set(table)
    for code, status in table.items():
        assert listed[code].startswith(f"{status}: "), (code, listed[code])
    # Every code a route may send has its documented status; only 404/405 for unknown paths and methods
    # belong to no route.
    per_route = documented_errors(document)
    assert set(table) - set(per_route) == {"not_found", "method_not_allowed"}
    for code, statuses in per_route.items():
        assert statuses == {table[code]}, code


def test_routes_document_their_bodies_and_stream(document: dict[str, Any]) -> None:
    paths = document["paths"]
    completions = paths["/v1/chat/completions"]["post"]
    content = completions["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    vision = document["components"]["schemas"]["VisionRequest"]
    assert vision["required"] == ["prompt"]
    assert vision["oneOf"] == [{"required": ["image"]}, {"required": ["image_url"]}, {"required": ["video"]}]
    assert paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"
    }
    # Public routes need no key; the rest inherit the document's two schemes.
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert paths[path]["get"]["security"] == []
    assert "security" not in completions
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]


def test_error_bodies_are_the_documented_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    error = schemas["ErrorObject"]
    assert error["required"] == ["message", "type", "code", "param", "errors"]
    assert schemas["NativeErrorResponse"]["properties"]["success"]["const"] is False
    vision_400 = document["paths"]["/v1/chat/vision"]["post"]["responses"]["400"]
    envelope = vision_400["content"]["application/json"]["schema"]["allOf"][0]
    assert envelope == {"$ref": "#/components/schemas/NativeErrorResponse"}
    models_401 = document["paths"]["/v1/models"]["get"]["responses"]["401"]
    assert models_401["content"]["application/json"]["schema"]["allOf"][0] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


def test_document_needs_no_key_and_is_never_rate_limited(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys="only-key", rate_limit="1/minute").test_client()
    for _ in range(3):
        response = client.get("/openapi.json")
        assert response.status_code == 200
        assert response.get_json()["openapi"].startswith("3.1")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"X-API-Key": "only-key"}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "only-key"}).status_code == 429


def test_the_responses_api_and_model_lookup_are_documented(document: dict[str, Any]) -> None:
    paths = document["paths"]
    create = paths["/v1/responses"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResponseRequest"
    }
    content = create["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponseObject"}
    assert "response.completed" in content["text/event-stream"]["schema"]["description"]
    assert "unsupported_parameter" in create["responses"]["400"]["description"]
    for method in ("get", "delete"):
        operation = paths["/v1/responses/{response_id}"][method]
        assert operation["parameters"] == [
            {
                "name": "response_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            }
        ]
        assert "response_not_found" in operation["responses"]["404"]["description"]
    retrieve = paths["/v1/models/{model_id}"]["get"]
    assert retrieve["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelCard"
    }
    assert "model_not_found" in retrieve["responses"]["404"]["description"]
    assert paths["/health"]["get"]["security"] == []
