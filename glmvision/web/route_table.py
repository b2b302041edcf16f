"""Every route's facts in one table: its path and method, who may call it, its error envelope.

The views register through `route()`, so their paths come from here; authentication, the rate
limiter, the IP allowlist, the page's headers, the error renderer, the probe lane of the worker and
the OpenAPI document all read these facts instead of lists of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from flask import Blueprint


@dataclass(frozen=True)
class RouteFacts:
    """One route: where it is, who may call it, and how it answers errors."""

    endpoint: str  # Flask's name for it: blueprint.function
    method: Literal["GET", "POST", "DELETE"]
    path: str
    public: bool = False  # no API key and no rate limit (the probes, the document, the page, /metrics)
    allowlisted: bool = True  # refused outside GLMVISION_ALLOWED_IPS (every route but liveness)
    openai: bool = False  # errors in OpenAI's {"error": ...} envelope instead of the native one
    probe: bool = False  # served by the worker's probe lane, never queued behind model work
    page: bool = False  # the browser page and its files: the page's strict headers


ROUTES = (
    RouteFacts("api.healthz", "GET", "/healthz", public=True, allowlisted=False, probe=True),
    # vLLM's name for liveness, probed by its clients, guidellm and many load balancers.
    RouteFacts("api.health", "GET", "/health", public=True, allowlisted=False, probe=True),
    RouteFacts("api.readyz", "GET", "/readyz", public=True, probe=True),
    RouteFacts("api.list_models", "GET", "/v1/models", openai=True),
    # A model id may hold a slash (an organisation's prefix): the path converter keeps it whole.
    RouteFacts("api.retrieve_model", "GET", "/v1/models/<path:model_id>", openai=True),
    RouteFacts("api.chat_vision", "POST", "/v1/chat/vision"),
    RouteFacts("api.chat_seed", "POST", "/v1/chat"),
    RouteFacts("openai.chat_completions", "POST", "/v1/chat/completions", openai=True),
    RouteFacts("responses.create_response", "POST", "/v1/responses", openai=True),
    RouteFacts("responses.get_response", "GET", "/v1/responses/<response_id>", openai=True),
    RouteFacts("responses.delete_response", "DELETE", "/v1/responses/<response_id>", openai=True),
    RouteFacts("usage.get_usage", "GET", "/v1/usage", openai=True),  # admin keys only (a TOML keys file)
    RouteFacts("openapi.openapi_json", "GET", "/openapi.json", public=True),
    RouteFacts("ops.metrics", "GET", "/metrics", public=True),  # its own key: GLMVISION_METRICS_KEY
    RouteFacts("page.index", "GET", "/", public=True, page=True),
    RouteFacts("static", "GET", "/static/<path:filename>", public=True, page=True),
)
BY_ENDPOINT = {facts.endpoint: facts for facts in ROUTES}
PUBLIC_ENDPOINTS = frozenset(facts.endpoint for facts in ROUTES if facts.public)
UNLISTED_ENDPOINTS = frozenset(facts.endpoint for facts in ROUTES if not facts.allowlisted)
PAGE_ENDPOINTS = frozenset(facts.endpoint for facts in ROUTES if facts.page)
OPENAI_PATHS = tuple(facts.path for facts in ROUTES if facts.openai)
PROBE_PATHS = tuple(facts.path for facts in ROUTES if facts.probe)


def route(bp: Blueprint, endpoint: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated view at the table's path and method for `endpoint`."""
    facts = BY_ENDPOINT[endpoint]
    blueprint, _, name = endpoint.partition(".")
    if blueprint != bp.name:
        raise ValueError(f"{endpoint} belongs to blueprint {blueprint!r}, not {bp.name!r}")
    return bp.route(facts.path, methods=[facts.method], endpoint=name)
