"""The catch-all 500 handler: a fixed JSON error for clients, the whole trace only in the log."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

SECRET = "db-password=hunter2 at /opt/glmvision/secret_module.py"


class _Boom(Exception):
    """An exception no handler of ours knows about."""


def _raise() -> str:
    raise _Boom(SECRET)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The real app with two extra routes that fail unexpectedly: one native, one OpenAI-style."""
    app = make_app()
    app.add_url_rule("/boom", "boom", _raise)
    app.add_url_rule("/v1/models/boom", "openai_boom", _raise)
    return app


@pytest.mark.parametrize(
    ("path", "openai"),
    [("/boom", False), ("/v1/models/boom", True)],
)
def test_unexpected_errors_are_a_plain_500_without_their_text(
    app: Flask, path: str, openai: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("ERROR", logger="glmvision")
    response = app.test_client().get(path)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    body = response.get_json()
    expected = {
        "message": "The server failed to process the request.",
        "type": "server_error",
        "code": "internal_error",
        "param": None,
    }
    expected["errors"] = [{"code": "internal_error", "param": None, "message": expected["message"]}]
    assert body == ({"error": expected} if openai else {"success": False, "error": expected})
    text = response.get_data(as_text=True)
    for leak in ("hunter2", "secret_module", "_Boom", "Traceback", 'File "'):
        assert leak not in text
    for value in response.headers.values():
        assert "hunter2" not in value
    # Operators still get the trace.
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.levelname == "ERROR"
    assert isinstance(record.exc_info[1], _Boom)
    assert SECRET in caplog.text and "Traceback" in caplog.text


def test_an_http_error_raised_by_a_view_keeps_its_status(app: Flask) -> None:
    """Werkzeug's HTTP errors are not swallowed by the catch-all: a 404 stays a 404."""
    from werkzeug.exceptions import NotFound

    def missing() -> str:
        raise NotFound("no such thing")

    app.add_url_rule("/missing", "missing", missing)
    response = app.test_client().get("/missing")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
