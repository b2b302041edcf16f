"""WSGI entry point: `gunicorn -c deploy/gunicorn.conf.py wsgi:app` (the app is glmvision.server.wsgi's)."""

from __future__ import annotations

from glmvision.server.wsgi import app

__all__ = ["app"]
