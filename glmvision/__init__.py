"""glmvision: GLM-4.6V-Flash behind a Flask + gunicorn HTTP API."""

from __future__ import annotations

from .app import create_app

# The one place the version is written: setup.cfg reads it (attr:), and `glmvision --version` prints it.
__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]
