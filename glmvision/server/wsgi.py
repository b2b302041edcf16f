"""The app gunicorn serves: `glmvision.server.wsgi:app` (wsgi.py at the repository root re-exports it)."""

from __future__ import annotations

from glmvision.web.app import create_app

app = create_app()
