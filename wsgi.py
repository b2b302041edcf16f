"""WSGI entry point: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`."""

from __future__ import annotations

from glmvision import create_app

app = create_app()
