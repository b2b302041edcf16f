"""The error registry is the one list of codes: every raise uses a registered code, and the docs are it."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from helpers import ROOT, image_b64, vision_body

from glmvision.core.errors import (
    ERRORS,
    FRAMEWORK_CODES,
    APIError,
    UnregisteredErrorCode,
    api_error,
    bad_request,
    error_type,
    errors_document,
    framework_code,
    unavailable,
)
from glmvision.ops.metrics import REJECTION_REASONS

PACKAGE = ROOT / "glmvision"
# Calls that raise or build an error, and the position of their code argument.
CODE_ARGUMENT = {
    "APIError": 1,
    "api_error": 0,
    "bad_request": 0,
    "unavailable": 0,
    "rule_error": 0,
    "_unauthorized": 0,
    "SchemaRefused": 0,
    "error_object": 1,
}
# Codes that are not literals where they are raised, and where their literals are (scanned too):
# validation errors (protocol's `_error_code` returns and pydantic types mapped by it), schema refusals
# (SchemaRefused literals), the helpers' own `code` parameters, an APIError's code when it is
# rendered, and the framework's codes (from the registry itself).
DYNAMIC_CODES = {
    "first.code",
    "refused.code",
    "item['type']",
    "code",
    "exc.error_code",
    "framework_code(status)",
}


@dataclass(frozen=True)
class Site:
    """One place in the package's source that names an error code."""

    where: str
    code: str
    status: int | None = None


def _callee(node: ast.Call) -> str:
    if isinstance(node.func, ast.Name):
        return node.func.id
    return node.func.attr if isinstance(node.func, ast.Attribute) else ""


def _code_argument(node: ast.Call) -> ast.expr | None:
    for keyword in node.keywords:
        if keyword.arg == "code":
            return keyword.value
    position = CODE_ARGUMENT[_callee(node)]
    return node.args[position] if len(node.args) > position else None


def _strings(node: ast.AST) -> Iterator[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def _scan(path: Path) -> tuple[list[Site], list[Site], list[str]]:
    """Raised codes, codes listed in `*_CODES`/`*_REASONS` tables, and non-literal code arguments."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = str(path.relative_to(ROOT))
    raised: list[Site] = []
    listed: list[Site] = []
    dynamic: list[str] = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and _callee(node) in CODE_ARGUMENT:
            argument = _code_argument(node)
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                status = None
                if _callee(node) in ("APIError", "error_object") and node.args:
                    first = node.args[0]
                    status = first.value if isinstance(first, ast.Constant) else None
                raised.append(Site(where, argument.value, status))
            elif argument is not None:
                dynamic.append(ast.unparse(argument))
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("_code"):
            for returned in ast.walk(node):
                if isinstance(returned, ast.Return) and returned.value is not None:
                    value = returned.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        raised.append(Site(where, value.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
            if node.value is not None and any(n.endswith(("_CODES", "_REASONS")) for n in names):
                value = node.value
                keys = value.keys if isinstance(value, ast.Dict) else [value]
                listed += [Site(where, code) for key in keys if key is not None for code in _strings(key)]
    return raised, listed, dynamic


@pytest.fixture(scope="module")
def source() -> tuple[list[Site], list[Site], list[str]]:
    raised: list[Site] = []
    listed: list[Site] = []
    dynamic: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found = _scan(path)
        raised += found[0]
        listed += found[1]
        dynamic += found[2]
    return raised, listed, dynamic


def test_every_code_the_source_raises_is_registered(source: tuple[list[Site], list[Site], list[str]]) -> None:
    raised, listed, dynamic = source
    assert len(raised) > 80 and len({site.code for site in raised}) > 40  # the scan found the raises
    unregistered = [site for site in [*raised, *listed] if site.code not in ERRORS]
    assert not unregistered, f"codes missing from glmvision/core/errors.py: {unregistered}"
    # A code that is not a literal must come from somewhere the scan reads (see DYNAMIC_CODES).
    assert set(dynamic) <= DYNAMIC_CODES, sorted(set(dynamic) - DYNAMIC_CODES)


def test_every_status_the_source_passes_is_the_registrys(
    source: tuple[list[Site], list[Site], list[str]],
) -> None:
    raised = source[0]
    with_status = [site for site in raised if site.status is not None]
    assert len(with_status) > 10
    wrong = [
        (site, ERRORS[site.code].status) for site in with_status if site.status != ERRORS[site.code].status
    ]
    assert not wrong, wrong


def test_no_registered_code_is_dead(source: tuple[list[Site], list[Site], list[str]]) -> None:
    raised = {site.code for site in source[0]}
    framework = {code for code, spec in ERRORS.items() if spec.framework}
    assert framework == {
        "bad_request",
        "not_found",
        "method_not_allowed",
        "request_too_large",
        "unsupported_media_type",
        "rate_limit_exceeded",
    }
    dead = set(ERRORS) - raised - framework
    assert not dead, f"registered but never raised: {sorted(dead)}"


def test_every_spec_is_consistent() -> None:
    for code, spec in ERRORS.items():
        assert spec.code == code
        assert spec.type == error_type(spec.status), code
        assert spec.retryable == (spec.status in (429, 503, 504)), code
        assert spec.message and spec.meaning and spec.action, code
        assert "|" not in spec.meaning + spec.action, code  # a cell of the Markdown tables
    # One framework code per status, so the status says which it is.
    assert len(FRAMEWORK_CODES) == len([spec for spec in ERRORS.values() if spec.framework])
    assert framework_code(404) == "not_found" and framework_code(416) == "http_416"
    assert set(REJECTION_REASONS) == {code for code, spec in ERRORS.items() if spec.rejection}


def test_an_unregistered_code_fails_in_tests_and_falls_back_in_production(caplog: Any) -> None:
    with pytest.raises(UnregisteredErrorCode, match="no_such_code"):
        APIError(400, "no_such_code", "x")
    with pytest.raises(UnregisteredErrorCode, match="registered as 503"):
        APIError(400, "overloaded", "x")
    # Production has no error filter: the client still gets an answer, and the log says what is wrong.
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level(logging.ERROR, logger="glmvision"):
        warnings.simplefilter("ignore")
        assert APIError(400, "no_such_code", "x").code == 400
        assert api_error("no_such_code").code == 500
        assert APIError(400, "overloaded", "x").code == 503  # the registry wins
    assert sum("no_such_code" in record.getMessage() for record in caplog.records) == 2


def test_the_registry_sets_status_message_and_headers() -> None:
    timeout = api_error("request_timeout")
    assert (timeout.code, timeout.description) == (504, ERRORS["request_timeout"].message)
    busy = unavailable("grammar_busy", "Busy.", 3)
    assert (busy.code, busy.headers["Retry-After"]) == (503, "3")
    too_large = bad_request("image_too_large", "Too many pixels.", "image")
    assert (too_large.code, too_large.param) == (413, "image")
    with_fields = api_error("circuit_open", param="x", retry_after=7, headers={"X-A": "1"})
    assert with_fields.code == 429 and with_fields.headers == {"X-A": "1", "Retry-After": "7"}


def _post(client: Any, path: str, body: Any, **kwargs: Any) -> Any:
    return client.post(path, data=json.dumps(body) if not isinstance(body, str) else body, **kwargs)


# Real requests, and the code each must answer with.
SAMPLES: dict[str, Callable[[Any], Any]] = {
    "invalid_json": lambda c: _post(c, "/v1/chat/vision", "{", content_type="application/json"),
    "invalid_body": lambda c: _post(c, "/v1/chat/vision", [1], content_type="application/json"),
    "missing_field": lambda c: _post(c, "/v1/chat/vision", {"prompt": "hi"}, content_type="application/json"),
    "invalid_type": lambda c: _post(
        c, "/v1/chat/vision", vision_body(prompt=3), content_type="application/json"
    ),
    "invalid_base64": lambda c: _post(
        c, "/v1/chat/vision", vision_body(image="@@@"), content_type="application/json"
    ),
    "unsupported_media_type": lambda c: _post(c, "/v1/chat/vision", "x", content_type="text/plain"),
    "not_found": lambda c: c.get("/v1/nothing"),
    "method_not_allowed": lambda c: c.get("/v1/chat/vision"),
    "model_not_found": lambda c: _post(
        c,
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
    ),
}


@pytest.mark.parametrize("code", sorted(SAMPLES))
def test_the_app_answers_each_code_with_its_registered_status(
    make_app: Callable[..., Flask], code: str
) -> None:
    client = make_app().test_client()
    response = SAMPLES[code](client)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert (response.status_code, error["type"]) == (ERRORS[code].status, ERRORS[code].type)


def test_the_framework_and_key_errors_have_their_registered_status(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys="only-key", rate_limit="1/minute", max_body_mb=0.05).test_client()
    answers = {
        "missing_api_key": client.get("/v1/models"),
        "invalid_api_key": client.get("/v1/models", headers={"X-API-Key": "wrong"}),
        "request_too_large": _post(
            client,
            "/v1/chat/vision",
            vision_body(image=image_b64(400, 400, "BMP")),
            content_type="application/json",
            headers={"X-API-Key": "only-key"},
        ),
    }
    client.get("/v1/models", headers={"X-API-Key": "only-key"})
    answers["rate_limit_exceeded"] = client.get("/v1/models", headers={"X-API-Key": "only-key"})
    for code, response in answers.items():
        error = response.get_json()["error"]
        assert (error["code"], response.status_code, error["type"]) == (
            code,
            ERRORS[code].status,
            ERRORS[code].type,
        )
    assert "Retry-After" in answers["rate_limit_exceeded"].headers


def test_the_openapi_document_lists_the_registry(client: Any) -> None:
    document = client.get("/openapi.json").get_json()
    listed = document["components"]["schemas"]["ErrorCode"]["oneOf"]
    assert [item["const"] for item in listed] == list(ERRORS)
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                schema = answer["content"].get("application/json", {}).get("schema", {})
                for part in schema.get("allOf", [])[1:]:
                    error = part["properties"]["error"]["properties"]
                    for code in error["code"]["enum"]:
                        assert ERRORS[code].status == int(status)
                        assert ERRORS[code].type == error["type"]["const"]


def test_the_committed_docs_are_generated_from_the_registry() -> None:
    committed = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    assert committed == errors_document(), "docs/errors.md is stale: run scripts/gen_docs.py"
    assert all(f"`{code}`" in committed for code in ERRORS)
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    gen_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_docs)
    # docs/errors.md is the one table of codes: no other page keeps a copy that could go stale.
    row = re.compile(r"^\| \d{3} \| `(\w+)` \|", re.M)
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    tables = {page.name: row.findall(page.read_text(encoding="utf-8")) for page in pages}
    assert {name for name, codes in tables.items() if codes} == {"errors.md"}
    assert sorted(tables["errors.md"]) == sorted(ERRORS)
    assert gen_docs.main(["--check"]) == 0


def test_every_code_is_registered_once() -> None:
    """Two entries for one code would leave only the last in ERRORS, its docs silently lost."""
    from glmvision.core import errors

    codes = [spec.code for spec in errors._SPECS]
    assert len(codes) == len(set(codes)) == len(errors.ERRORS)
