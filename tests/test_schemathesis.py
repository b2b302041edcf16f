"""A bounded schemathesis run against real gunicorn: no 5xx, and every answer is what /openapi.json says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from helpers import LiveServer, live_server, server_env
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from glmvision.web.openapi import ROUTES

# What every response is held to: never a 5xx, and status, content type and body as documented.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    """The demo model on one worker, answers of at most 4 tokens, image URLs refused (no outside traffic)."""
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS="4", IMAGE_URL_DOMAINS="")
    with live_server(tmp_path_factory.mktemp("schemathesis"), env, ready_path="/readyz") as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: LiveServer) -> schemathesis.BaseSchema:
    """The document as the live server serves it."""
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json", timeout=30)


# Bounded: a few generated cases per operation (and its documented example) keep the file under a minute.
BOUNDED = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,  # the same sample on every CI run
    database=None,
    suppress_health_check=list(HealthCheck),
)
# schemathesis leaves out the operation that serves the document it read; the rest are all fuzzed.
DOCUMENT = ("GET", "/openapi.json")
OPERATIONS = [
    (route.method.upper(), route.path) for route in ROUTES if (route.method.upper(), route.path) != DOCUMENT
]


def call_and_check(case: schemathesis.Case, server: LiveServer) -> int:
    """Send `case` to the loopback server only, hold the answer to CHECKS and return its status."""
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: only the loopback server is reached
        response = case.call(base_url=server.url, session=session, timeout=60)
    assert response.request.url.startswith(server.url + "/"), response.request.url
    case.validate_response(response, checks=CHECKS)
    return response.status_code


def test_the_live_document_has_every_operation(api_schema: schemathesis.BaseSchema) -> None:
    operations = {
        (result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()
    }
    assert operations == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_the_document(
    api_schema: schemathesis.BaseSchema, fuzzed_server: LiveServer, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    statuses: list[int] = []

    # The documented example first: it must be answered, with the documented 200 body.
    for strategy in api_schema.get_strategies_from_examples(operation):

        @given(case=strategy)
        @settings(BOUNDED, max_examples=1)
        def example(case: schemathesis.Case) -> None:
            statuses.append(call_and_check(case, fuzzed_server))

        example()
    if method == "POST":
        assert statuses and set(statuses) == {200}, statuses

    # Valid bodies, and for operations that take one, bodies that break the schema (a 4xx, never a 5xx).
    modes = [schemathesis.GenerationMode.POSITIVE]
    if method == "POST":
        modes.append(schemathesis.GenerationMode.NEGATIVE)
    for mode in modes:

        @given(case=operation.as_strategy(mode))
        @BOUNDED
        def generated(case: schemathesis.Case) -> None:
            statuses.append(call_and_check(case, fuzzed_server))

        generated()
    assert statuses  # cases were sent and checked
    if method == "POST":
        assert any(400 <= status < 500 for status in statuses), statuses  # the negative cases were refused
