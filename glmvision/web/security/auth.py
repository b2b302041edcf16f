"""API-key authentication: keys from settings, compared in constant time, never logged."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, request

from glmvision.core.config import Settings, read_api_keys
from glmvision.core.errors import APIError
from glmvision.core.keys import key_digest, presented_key
from glmvision.web.route_table import PUBLIC_ENDPOINTS

log = logging.getLogger("glmvision")


class ApiKeyAuth:
    """Holds digests of the accepted keys; checks every one so timing reveals nothing."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [key_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        """Return True if `key` is one of the configured keys."""
        candidate = key_digest(key)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found


def _require_key(auth: ApiKeyAuth) -> None:
    if not auth.enabled or request.endpoint in PUBLIC_ENDPOINTS:
        return
    key = presented_key(request.headers)
    if key is None:
        raise _unauthorized("missing_api_key", "An API key is required (Authorization: Bearer <key>).")
    if not auth.accepts(key):
        raise _unauthorized("invalid_api_key", "The API key is not valid.")


def _unauthorized(code: str, message: str) -> APIError:
    return APIError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="glmvision"'})


def init_app(app: Flask, settings: Settings) -> ApiKeyAuth:
    """Install the key check in front of every endpoint but the health probes."""
    auth = ApiKeyAuth(read_api_keys(settings))
    if not auth.enabled:
        log.warning("no API keys configured (GLMVISION_API_KEYS): authentication is OFF")
    app.before_request(lambda: _require_key(auth))
    return auth
