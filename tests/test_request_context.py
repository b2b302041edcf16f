"""The pipeline decides from the RequestContext it is handed, never from `flask.g`; one typed app state."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask, g, has_request_context
from helpers import image_b64

from glmvision.core.generation import GenerationParams
from glmvision.ops.record import ImageStat, RequestRecord
from glmvision.serving import pipeline
from glmvision.serving.context import RequestContext, admit
from glmvision.serving.pipeline import ImageRef, Turn
from glmvision.serving.service import Service
from glmvision.web.state import AppState, app_state

PACKAGE = Path(__file__).resolve().parent.parent / "glmvision"
TURNS = [Turn("user", [ImageRef(image_b64(64, 48), "image"), "What is in the picture?"])]
GREEDY = GenerationParams(4, temperature=0)


def loaded(app: Flask) -> Service:
    """The app's Service, its demo model loaded."""
    service = app_state(app).service
    service.backend.holder.get(timeout=60)  # type: ignore[attr-defined]
    return service


def direct(service: Service, request_id: str = "direct") -> RequestContext:
    """A context for a call made without any HTTP request."""
    return RequestContext.of(service, RequestRecord(request_id, "POST", "direct", "127.0.0.1"))


def test_the_pipeline_answers_a_context_outside_any_flask_request(make_app: Callable[..., Flask]) -> None:
    service = loaded(make_app(cache=False))
    context = direct(service)
    assert not has_request_context()
    admit(context)
    chat, answer = pipeline.answer(context, TURNS, GREEDY)
    result = answer.finish(service.settings)
    assert result.finish_reason in {"stop", "length"} and result.completion_tokens > 0
    assert [(image.width, image.height) for image in chat.images] == [(64, 48)]
    # The record is only written: the log and metrics find what the pipeline did.
    assert context.record.completion_tokens == result.completion_tokens
    assert context.record.images == [ImageStat(64, 48, 64, 48)]
    assert not context.fallback and not context.degraded


def test_a_pipeline_call_needs_a_place_taken_first(make_app: Callable[..., Flask]) -> None:
    context = direct(app_state(make_app()).service)
    with pytest.raises(RuntimeError, match="admit"):
        pipeline.answer(context, TURNS, GREEDY)


def test_the_fallback_comes_from_the_context_not_from_g(make_app: Callable[..., Flask]) -> None:
    app = make_app(fallback_message="Later, please.", cache=False)
    service = loaded(app)
    with app.test_request_context("/v1/chat/vision", method="POST"):
        # What middleware left on g says the opposite of the context each time; the context wins.
        g.glmvision_record = RequestRecord("g", "POST", "/v1/chat/vision", None, fallback=False)
        told = direct(service, "told")
        admit(told)
        told.fall_back()
        _, answer = pipeline.answer(told, TURNS, GREEDY)
        result = answer.finish(service.settings)
        assert (result.text, result.finish_reason) == ("Later, please.", "fallback")
        assert told.record.fallback and not g.glmvision_record.fallback

        g.glmvision_record = RequestRecord("g", "POST", "/v1/chat/vision", None, fallback=True, degraded=True)
        untold = direct(service, "untold")
        admit(untold)
        _, answer = pipeline.answer(untold, TURNS, GREEDY)
        result = answer.finish(service.settings)
        assert result.finish_reason != "fallback" and result.text != "Later, please."
        assert untold.record.images == [ImageStat(64, 48, 64, 48)]  # not shrunk: the context is not degraded


def test_a_degraded_context_shrinks_images_and_caps_tokens(make_app: Callable[..., Flask]) -> None:
    service = loaded(make_app(degrade_image_side=32, degrade_max_new_tokens=2, cache=False))
    context = direct(service)
    admit(context)
    context.degrade()
    chat, answer = pipeline.answer(context, TURNS, GenerationParams(8, temperature=0))
    result = answer.finish(service.settings)
    assert chat.params.max_new_tokens == 2 and result.completion_tokens <= 2
    assert context.record.images == [ImageStat(64, 48, 32, 24)] and context.record.degraded


def test_the_cache_key_is_made_once_per_context_and_scoped_by_its_key_id(
    make_app: Callable[..., Flask],
) -> None:
    service = loaded(make_app())
    first, again, other = direct(service), direct(service), direct(service)
    other.key_id = "abc"
    for context in (first, again, other):
        admit(context)
        pipeline.answer(context, TURNS, GREEDY)[1].finish(service.settings)
    assert first.cache_key is not None and first.record.cache == "miss"
    assert again.record.cache == "hit"  # the exact repeat, found by its image's bytes
    assert other.record.cache == "miss"  # another key's answers are not its own
    assert other.cache_key is not None and other.cache_key.exact != first.cache_key.exact


def test_one_typed_state_per_app(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limit="5/minute")
    state = app_state(app)
    assert isinstance(state, AppState)
    assert [name for name in app.extensions if name.startswith("glmvision")] == ["glmvision"]
    assert state.metrics is not None and state.limiter is not None
    assert state.service.settings.rate_limit == "5/minute"
    plain = app_state(make_app(metrics=False))
    assert plain.metrics is None and plain.limiter is None and not plain.auth.enabled


def _imports(path: Path) -> set[str]:
    """Every name the module imports, as `module.name` (and `module` for a plain import)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("module", ["serving/pipeline.py", "serving/service.py"])
def test_the_pipeline_and_service_never_import_g_or_the_current_record(module: str) -> None:
    imported = _imports(PACKAGE / module)
    assert imported, "the AST walk found the module's imports"
    assert "flask.g" not in imported and "flask" not in imported
    assert "glmvision.ops.record.current_record" not in imported


def test_only_the_context_teardown_touches_g_in_serving_and_web() -> None:
    users = {
        str(path.relative_to(PACKAGE))
        for layer in ("serving", "web")
        for path in (PACKAGE / layer).rglob("*.py")
        if "flask.g" in _imports(path)
    }
    assert users == {"serving/context.py"}
    tree = ast.parse((PACKAGE / "serving/context.py").read_text())
    where = {
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Name) and node.id == "g"
    }
    # The context left for the teardown, and its place given back there; no decision reads g.
    assert where == {"new_context", "_abandon_unsubmitted"}


def test_the_views_read_no_record_to_decide() -> None:
    for module in ("web/native/routes.py", "web/openai/routes.py"):
        assert "glmvision.ops.record.current_record" not in _imports(PACKAGE / module), module
