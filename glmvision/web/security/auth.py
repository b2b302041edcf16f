"""API-key authentication: keys from settings, compared in constant time, never logged."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, request
from flask.wrappers import Response

from glmvision.core.config import Settings
from glmvision.core.errors import APIError
from glmvision.core.keys import KeySpec, key_digest, load_keys, presented_key
from glmvision.ops.record import current_record
from glmvision.serving.quotas import Quotas
from glmvision.web.route_table import PUBLIC_ENDPOINTS

log = logging.getLogger("glmvision")


class ApiKeyAuth:
    """Holds digests of the accepted keys; checks every one so timing reveals nothing."""

    def __init__(self, keys: list[str] | list[KeySpec]) -> None:
        self.specs = [KeySpec(key_digest(key)) if isinstance(key, str) else key for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.specs)

    def find(self, key: str) -> KeySpec | None:
        """The accepted key `key` is, if any; every digest is compared, so timing reveals nothing."""
        candidate = key_digest(key)
        found: KeySpec | None = None
        for spec in self.specs:
            if hmac.compare_digest(candidate, spec.digest) and found is None:
                found = spec
        return found

    def accepts(self, key: str) -> bool:
        """Return True if `key` is one of the configured keys."""
        return self.find(key) is not None


def _require_key(auth: ApiKeyAuth, quotas: Quotas | None) -> None:
    if not auth.enabled or request.endpoint in PUBLIC_ENDPOINTS:
        return
    key = presented_key(request.headers)
    if key is None:
        raise _unauthorized("missing_api_key", "An API key is required (Authorization: Bearer <key>).")
    spec = auth.find(key)
    if spec is None:
        raise _unauthorized("invalid_api_key", "The API key is not valid.")
    record = current_record()
    if spec.name is not None and record is not None:
        # The name, never the key, is what the log, the audit log, the metrics and the usage carry.
        record.key_id = record.key_name = spec.name
        if quotas is not None:
            quotas.check_rate(spec, record)


def _quota_headers(response: Response) -> Response:
    record = current_record()
    if record is not None:
        for kind, left in record.quota_remaining.items():
            response.headers.setdefault(f"X-Quota-Remaining-{kind}", str(left))
    return response


def _unauthorized(code: str, message: str) -> APIError:
    return APIError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="glmvision"'})


def init_app(app: Flask, settings: Settings, quotas: Quotas | None = None) -> ApiKeyAuth:
    """Install the key check in front of every endpoint but the health probes."""
    auth = ApiKeyAuth(list(quotas.specs) if quotas is not None else load_keys(settings))
    if not auth.enabled:
        log.warning("no API keys configured (GLMVISION_API_KEYS): authentication is OFF")
    app.before_request(lambda: _require_key(auth, quotas))
    if quotas is not None:
        app.after_request(_quota_headers)
    return auth
