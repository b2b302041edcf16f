"""The application factory."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import auth, errors, limits, vram
from .api import bp as api_bp
from .config import ConfigError, load_settings
from .model import holder_for
from .openai_api import bp as openai_bp
from .urlfetch import FetchPolicy

log = logging.getLogger("glmvision")


def _configure_logging(level: str) -> None:
    log.setLevel(level.upper())
    # Under gunicorn nothing configures the root logger: give ours a handler of its own.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
        log.addHandler(handler)


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings from defaults, then `GLMVISION_*` environment, then `overrides`."""
    settings = load_settings(overrides)
    _configure_logging(settings["GLMVISION_LOG_LEVEL"])
    app = Flask(__name__)
    app.config.update(settings)
    app.config["GLMVISION_STARTED"] = time.time()
    app.config["MAX_CONTENT_LENGTH"] = int(settings["GLMVISION_MAX_BODY_MB"] * 1024 * 1024)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["glmvision.model"] = holder_for(settings)
    try:
        app.extensions["glmvision.fetch_policy"] = FetchPolicy.from_settings(settings)
    except ValueError as exc:
        raise ConfigError(f"GLMVISION_IMAGE_URL_DOMAINS: {exc}") from None
    errors.init_app(app)
    auth.init_app(app)  # before the limiter, so unauthenticated calls never count against a key
    app.extensions["glmvision.limiter"] = limits.init_app(app)
    vram.init_app(app)
    app.register_blueprint(api_bp)
    app.register_blueprint(openai_bp)
    return app
