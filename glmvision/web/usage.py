"""`GET /v1/usage`: every named key's usage by day, for admin keys."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.wrappers import Response
from pydantic import BaseModel

from glmvision.core.errors import api_error
from glmvision.core.keys import KeySpec, presented_key
from glmvision.web.route_table import route
from glmvision.web.state import app_state, service

bp = Blueprint("usage", __name__)


class KeyUsage(BaseModel):
    """One named key's totals on one UTC day."""

    key: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    images: int
    errors: int


class KeyLimits(BaseModel):
    """A named key's limits from the keys file (never the key)."""

    requests_per_minute: int | None
    tokens_per_day: int | None
    images_per_day: int | None
    models: list[str] | None
    admin: bool


class UsageReport(BaseModel):
    """Per-key totals by day, newest first; `shared`: counted across workers (Redis), else this worker's."""

    object: str = "usage"
    shared: bool
    data: list[KeyUsage]
    limits: dict[str, KeyLimits]


@route(bp, "usage.get_usage")
def get_usage() -> Response:
    """Every named key's usage by day; 403 admin_required unless the caller's key is an admin key."""
    key = presented_key(request.headers)  # already accepted by the key check; found again for its flags
    spec: KeySpec | None = None if key is None else app_state().auth.find(key)
    if spec is None or not spec.admin:
        raise api_error("admin_required")
    quotas = service().quotas
    if quotas is None:  # unreachable: an admin key is a named key, and named keys make quotas
        raise api_error("admin_required")
    rows = [KeyUsage(key=row.key, day=row.day, **row.totals) for row in quotas.usage()]
    limits = {name: KeyLimits(**limit) for name, limit in quotas.limits().items()}
    report = UsageReport(shared=quotas.shared, data=rows, limits=limits)
    return jsonify(report.model_dump())
