"""GET /health (vLLM's liveness path) and GET /v1/models/{id} (the official client's models.retrieve)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient

DEMO = "glm-4.6v-flash-demo"


def client_of(app: Flask, key: str = "unused") -> openai.OpenAI:
    transport = httpx.Client(transport=httpx.WSGITransport(app=app))
    return openai.OpenAI(base_url="http://test/v1", api_key=key, max_retries=0, http_client=transport)


def test_health_answers_as_healthz_without_a_key_or_the_allowlist(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys="s3cret", allowed_ips="10.0.0.0/8").test_client()
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json() == client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 403  # the allowlist holds for readiness, not liveness


def test_retrieve_answers_the_listed_entry(client: FlaskClient) -> None:
    listed = client.get("/v1/models").get_json()["data"][0]
    found = client.get(f"/v1/models/{listed['id']}")
    assert found.status_code == 200
    assert found.get_json() == listed


def test_retrieve_an_unknown_model_names_the_served_ones(client: FlaskClient) -> None:
    missing = client.get("/v1/models/no-such-model")
    assert missing.status_code == 404
    error = missing.get_json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("model_not_found", "not_found_error", "model")
    assert DEMO in error["message"] and "no-such-model" in error["message"]
    assert "success" not in missing.get_json()  # OpenAI's envelope


def test_a_slash_in_the_id_is_one_id(client: FlaskClient) -> None:
    missing = client.get("/v1/models/org/name")
    assert missing.status_code == 404
    assert "'org/name'" in missing.get_json()["error"]["message"]


def test_an_alias_is_retrieved_under_its_own_name(make_app: Callable[..., Flask]) -> None:
    client = make_app(model_aliases="my-vision").test_client()
    found = client.get("/v1/models/my-vision")
    assert found.status_code == 200
    assert found.get_json()["id"] == "my-vision"
    assert found.get_json()["object"] == "model"


def test_the_openai_client_retrieves_and_misses(app: Flask) -> None:
    with client_of(app) as oai:
        model = oai.models.retrieve(DEMO)
        assert (model.id, model.object, model.owned_by) == (DEMO, "model", "glmvision")
        with pytest.raises(openai.NotFoundError) as caught:
            oai.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_retrieve_needs_the_key_like_the_list(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys="s3cret").test_client()
    assert client.get(f"/v1/models/{DEMO}").status_code == 401
    assert client.get(f"/v1/models/{DEMO}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
