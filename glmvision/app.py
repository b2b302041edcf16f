"""The application factory."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import auth, errors, limits, service
from .api import bp as api_bp
from .config import ConfigError, Settings, load_settings, warn_unknown_variables
from .local.backend import LocalBackend
from .local.loading import check_source
from .openai_api import bp as openai_bp
from .openapi import bp as openapi_bp
from .service import Service
from .urlfetch import FetchPolicy

log = logging.getLogger("glmvision")


def _configure_logging(level: str) -> None:
    log.setLevel(level)
    # Under gunicorn nothing configures the root logger: give ours a handler of its own.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
        log.addHandler(handler)


def _fetch_policy(settings: Settings) -> FetchPolicy:
    try:
        return FetchPolicy.from_settings(settings)
    except ValueError as exc:
        raise ConfigError(f"GLMVISION_IMAGE_URL_DOMAINS: {exc}") from None


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings from defaults, then `GLMVISION_*` environment, then `overrides`."""
    settings = load_settings(overrides)
    _configure_logging(settings.log_level)
    warn_unknown_variables()
    check_source(settings.model)
    app = Flask(__name__)
    app.config.update(
        {key: value for key, value in (overrides or {}).items() if not key.startswith("GLMVISION_")}
    )
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * 1024 * 1024)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["glmvision"] = Service(
        settings, LocalBackend(settings), _fetch_policy(settings), time.time()
    )
    errors.init_app(app)
    service.init_app(app)
    auth.init_app(app, settings)  # before the limiter, so unauthenticated calls never count against a key
    limits.init_app(app, settings)
    app.register_blueprint(api_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(openapi_bp)
    return app
