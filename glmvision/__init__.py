"""glmvision: GLM-4.6V-Flash behind a Flask + gunicorn HTTP API."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
